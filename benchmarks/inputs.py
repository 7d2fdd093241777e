"""The benchmark inputs: fixed slices of ``../shared/corpus`` (sizes are part of the method).

Why slices?  The model codes about 200 tokens/s on this machine's 2 CPU cores, so the
full run codes about 64 KB per text input to stay under 30 minutes; the classic
compressors see exactly the same bytes, so every row of a column compares like with like.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

CORPUS = Path(__file__).resolve().parents[1].parent / "shared" / "corpus"


@dataclass(frozen=True)
class Input:
    """One benchmark input: a name, its bytes and what it is."""

    name: str
    data: bytes
    kind: str  # "text" (LLM rows) or "binary" (fallback path)
    description: str

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


@dataclass(frozen=True)
class Sizes:
    """Everything the two modes differ in; fixed in code so results are comparable."""

    text_bytes: int  # prefix of each text input
    segment_length: int  # the llmarc run's L (the product default is 1024)
    sweep_bytes: int  # prefix of text8 for the segment-length sweep
    sweep_lengths: tuple[int, ...]
    batch_widths: tuple[int, ...]
    batch_steps: int  # tokens per row in the batch-width sweep
    binaries: tuple[str, ...]


FULL = Sizes(
    text_bytes=65536,
    segment_length=1024,
    sweep_bytes=32768,
    sweep_lengths=(64, 128, 256, 512, 1024, 2048),
    batch_widths=(1, 2, 4, 8, 16, 32, 64),
    batch_steps=128,
    binaries=("fireworks.jpeg", "kennedy.xls", "geo.protodata", "paper-100k.pdf", "sum", "ptt5"),
)
QUICK = Sizes(
    text_bytes=3072,
    segment_length=256,
    sweep_bytes=4096,
    sweep_lengths=(64, 256, 1024),
    batch_widths=(1, 4, 16),
    batch_steps=32,
    binaries=("fireworks.jpeg", "sum"),
)

MIXED = ("fields.c", "grammar.lsp", "xargs.1", "html")  # C, Lisp, troff, HTML
_NON_LETTERS = re.compile(rb"[^a-z]+")


def text8_filter(data: bytes) -> bytes:
    """Lowercase a-z and single spaces only, as the LLMZip paper preprocesses text8.

    Close to Mahoney's wikifil.pl for plain text: letters are lowercased, every run of
    anything else becomes one space (digits are dropped rather than spelled out: our
    inputs are prose, not Wikipedia markup)."""
    return _NON_LETTERS.sub(b" ", data.lower()).strip(b" ")


def _read(name: str) -> bytes:
    path = CORPUS / name
    if not path.is_file():
        raise SystemExit(f"benchmark input {path} is missing (../shared/corpus, beside the "
                         "project)")
    return path.read_bytes()


def text_inputs(sizes: Sizes) -> list[Input]:
    """The LLM-coded inputs: English prose, a play, text8-style prose, real text8, code."""
    n = sizes.text_bytes
    # cp.html would be the classic choice, but its one Latin-1 byte (0xFC) is not in
    # SmolLM2's vocabulary, which sends the whole entry to zstd (README, "auto").
    mixed = b"".join(_read(name) for name in MIXED)
    return [
        Input("alice29.txt", _read("alice29.txt")[:n], "text",
              f"English prose, first {n:,} bytes of alice29.txt"),
        Input("asyoulik.txt", _read("asyoulik.txt")[:n], "text",
              f"Shakespeare's As You Like It (verse and prose), first {n:,} bytes"),
        Input("alice29.text8", text8_filter(_read("alice29.txt"))[:n], "text",
              f"text8-style alice29.txt (a-z and single spaces), first {n:,} bytes"),
        Input("text8", _read("text8_first100KB")[:n], "text",
              f"real text8 (Wikipedia, the LLMZip benchmark), first {n:,} bytes"),
        Input("code+markup", mixed[:n], "text",
              f"{' + '.join(MIXED)} concatenated, first {n:,} bytes"),
    ]


def binary_inputs(sizes: Sizes) -> list[Input]:
    """Binaries for the fallback path (zstd or stored), whole files."""
    return [Input(name, _read(name), "binary", f"{name} (whole file)") for name in sizes.binaries]


def sweep_input(sizes: Sizes) -> Input:
    """The segment-length sweep's input: real text8, the paper's benchmark."""
    n = sizes.sweep_bytes
    return Input("text8", _read("text8_first100KB")[:n], "text", f"text8, first {n:,} bytes")


def write_inputs(folder: Path, inputs: list[Input]) -> None:
    folder.mkdir(parents=True)
    for item in inputs:
        (folder / item.name).write_bytes(item.data)


def check_extracted(folder: Path, inputs: list[Input]) -> None:
    """Every extracted file must equal its input byte for byte."""
    for item in inputs:
        got = hashlib.sha256((folder / item.name).read_bytes()).hexdigest()
        if got != item.sha256:
            raise SystemExit(f"bench: {item.name} did not roundtrip through llmarc")
