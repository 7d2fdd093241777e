"""The ``llmarc`` command line: a thin typer layer over the API.

Every LlmarcError, OS error or usage mistake becomes exactly one ``llmarc: error: ...``
line on stderr (exit 1, or 2 for usage); Ctrl-C exits 130 with one line.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import stat
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from . import __version__
from . import open as open_archive
from .codecs.llm import DEFAULT_SEGMENT_LENGTH
from .codecs.llm_pipeline import LLMOptions
from .errors import LlmarcError
from .packer import CODEC_CHOICES, SkippedEntryWarning, pack
from .progress import ByteProgress

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="llmarc: a lossless archiver whose text codec is a language model.")


ModelOption = Annotated[str | None, typer.Option(
    help="LLM: 'smollm2' (embedded), a Hugging Face model folder, or a .gguf file "
         "(default: $LLMARC_MODEL, else smollm2).")]
DeviceOption = Annotated[str, typer.Option(help="LLM: auto, cpu or cuda[:N].")]


def _open(archive: Path, model: str | None = None, device: str = "auto"):
    return open_archive(archive, model=model, device=device, warn=_warn)


def _progress(quiet: bool) -> ByteProgress | None:
    return None if quiet else ByteProgress(Console(stderr=True))


def _warn(message: str) -> None:
    print(f"llmarc: warning: {message}", file=sys.stderr)


@app.command("pack")
def pack_cmd(
    src: Annotated[Path, typer.Argument(help="Directory to archive (its contents).")],
    out: Annotated[Path, typer.Argument(help="Archive to create (.llma).")],
    codec: Annotated[str, typer.Option(help=f"One of: {', '.join(CODEC_CHOICES)}.")] = "auto",
    level: Annotated[int, typer.Option(help="zstd level (1-22).")] = 19,
    solid: Annotated[bool, typer.Option(help="Share one zstd frame among small files.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    verify: Annotated[bool, typer.Option(
        help="Decode the finished archive and check every SHA-256 before keeping it.")] = False,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    dtype: Annotated[str | None, typer.Option(
        help="float32|bfloat16|float16 (default: float32 on CPU, bfloat16 on CUDA).")] = None,
    segment_length: Annotated[int, typer.Option(
        help="Maximum tokens per independently coded segment.")] = DEFAULT_SEGMENT_LENGTH,
    batch_width: Annotated[int | None, typer.Option(
        help="Rows stepped together (default: sized from memory and the input).")] = None,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for the model (recorded; extraction uses the same).")] = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Archive the contents of SRC into OUT."""
    options = LLMOptions(model=model, device=device, dtype=dtype, threads=threads,
                         segment_length=segment_length, batch_width=batch_width)
    members = pack(src, out, codec=codec, level=level, progress=_progress(quiet),
                   overwrite=overwrite, solid=solid, warn=_warn, llm=options, verify=verify)
    if not quiet:
        size = sum(m.size for m in members)
        packed = os.path.getsize(out)
        Console(stderr=True).print(
            f"{len(members)} members, {size} bytes -> {packed} bytes"
            + (f" ({8 * packed / size:.3f} bits/byte)" if size else ""), highlight=False)


@app.command("list")
def list_cmd(
    archive: Annotated[Path, typer.Argument(help="Archive to list.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the members of ARCHIVE (reads only its index)."""
    with open_archive(archive) as ar:
        members = ar.members()
    if as_json:
        rows = [{"name": m.name, "type": m.type, "mode": m.mode, "mtime_ns": m.mtime_ns,
                 "size": m.size, "packed_size": m.packed_size, "codec": m.codec,
                 "bits_per_byte": round(m.bits_per_byte, 4), "sha256": m.sha256}
                for m in members]
        print(json.dumps(rows, indent=1, ensure_ascii=False))
        return
    table = Table(box=None, header_style="bold")
    for col in ("mode", "size", "packed", "codec", "bits/byte", "name"):
        table.add_column(col, justify="right" if col in ("size", "packed", "bits/byte")
                         else "left")
    for m in members:
        kind = stat.S_IFDIR if m.is_dir() else stat.S_IFREG
        table.add_row(stat.filemode(kind | m.mode), str(m.size),
                      str(m.packed_size), m.codec if m.is_file() else "",
                      f"{m.bits_per_byte:.3f}" if m.size else "",
                      m.name + ("/" if m.is_dir() else ""))
    Console(highlight=False, soft_wrap=True).print(table)


@app.command("extract")
def extract_cmd(
    archive: Annotated[Path, typer.Argument(help="Archive to extract.")],
    members: Annotated[list[str] | None, typer.Argument(help="Members (default: all).")] = None,
    dest: Annotated[Path, typer.Option("-C", "--directory", help="Destination.")] = Path("."),
    overwrite: Annotated[bool, typer.Option(help="Replace existing files.")] = False,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Extract ARCHIVE (or the named MEMBERS) below DEST."""
    with _open(archive, model, device) as ar:
        ar.extract(dest, members or None, overwrite=overwrite, progress=_progress(quiet))


@app.command("test")
def test_cmd(
    archive: Annotated[Path, typer.Argument(help="Archive to test.")],
    model: ModelOption = None,
    device: DeviceOption = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Decode every member of ARCHIVE and verify every checksum (writes nothing)."""
    with _open(archive, model, device) as ar:
        n = len(ar.test(progress=_progress(quiet)))
    print(f"{archive}: OK ({n} members)")


@app.command("info")
def info_cmd(archive: Annotated[Path, typer.Argument(help="Archive to describe.")]) -> None:
    """Show archive-level information: version, creator, models, totals."""
    with open_archive(archive) as ar:
        members = ar.members()
        print(f"archive:      {archive}")
        print(f"format:       {ar.version[0]}.{ar.version[1]}")
        print(f"creator:      {ar.creator}")
        files = [m for m in members if m.is_file()]
        size = sum(m.size for m in files)
        packed = os.path.getsize(archive)
        print(f"members:      {len(files)} files, {len(members) - len(files)} directories")
        print(f"size:         {size} bytes -> {packed} bytes"
              + (f" ({8 * packed / size:.3f} bits/byte)" if size else ""))
        codecs: dict[str, int] = {}
        for m in files:
            codecs[m.codec] = codecs.get(m.codec, 0) + 1
        print("codecs:       " + (", ".join(f"{k} x{v}" for k, v in sorted(codecs.items()))
                                  or "none"))
        print(f"models:       {len(ar.models)}")
        for i, model in enumerate(ar.models):
            print(f"  [{i}] {model.name}  fingerprint {model.fingerprint.hex()}")
            print(f"      profile {model.profile}")


@app.command("version", hidden=True)
def version_cmd() -> None:
    """Print the version."""
    print(f"llmarc {__version__}")


def _click_classes(name: str) -> tuple[type[BaseException], ...]:
    """The click exception class ``name`` from typer's vendored click (typer >= 0.26) and
    from click itself when it is installed (older typer depends on it). click is not a
    declared dependency, so neither import may be required."""
    found = [getattr(typer, name, None) if name in ("Abort", "Exit") else None]
    for module in ("typer._click.exceptions", "click.exceptions"):
        with contextlib.suppress(ImportError):
            found.append(getattr(importlib.import_module(module), name, None))
    return tuple(c for c in found if isinstance(c, type))


_ABORT = _click_classes("Abort")
_EXIT = _click_classes("Exit")
_USAGE = _click_classes("UsageError")
_NO_ARGS = _click_classes("NoArgsIsHelpError")
_CLICK = _click_classes("ClickException")


def _error(message: str, code: int) -> int:
    message = " ".join(str(message).split()) or "unknown error"
    print(f"llmarc: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns (and exits with) the process exit code."""
    code = run(argv)
    sys.exit(code)


def run(argv: list[str] | None = None) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedEntryWarning)
            result = app(args=argv, prog_name="llmarc", standalone_mode=False)
        code = result if isinstance(result, int) else 0
        if code == 130:  # typer turns Ctrl-C into exit code 130
            print("llmarc: interrupted", file=sys.stderr)
        return code
    except (KeyboardInterrupt, *_ABORT):  # click turns Ctrl-C into Abort
        print("llmarc: interrupted", file=sys.stderr)
        return 130
    except _EXIT as exc:
        code = int(getattr(exc, "exit_code", 0) or 0)
        if code == 130:  # typer turns Ctrl-C into Exit(130)
            print("llmarc: interrupted", file=sys.stderr)
        return code
    except _NO_ARGS as exc:  # bare "llmarc": the help text, as a usage error
        print(exc.format_message(), file=sys.stderr)
        return 2
    except _USAGE as exc:
        return _error(exc.format_message(), 2)
    except _CLICK as exc:
        return _error(exc.format_message(), 1)
    except LlmarcError as exc:
        return _error(str(exc), 1)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        return _error(f"{exc.strerror or exc}{where}", 1)
    except BrokenPipeError:
        return 1


if __name__ == "__main__":  # pragma: no cover
    main()
