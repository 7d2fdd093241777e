"""Whole-archive bytes of small LLM archives, format 1.1 against 3.0 (issue 24 item 4).

    OMP_NUM_THREADS=1 python -m benchmarks.small_archives          # prints, writes results/
    python -m benchmarks.small_archives --no-write                  # prints only

Why: a one-file archive of a 700-byte English text was 72 % container in format 1.1.
Each text (fixed slices of ``../shared/corpus``: the first 700 bytes of lcet10.txt,
plrabn12.txt and asyoulik.txt, the issue's 700-byte texts; the first 8,000 bytes of
lcet10.txt and plrabn12.txt, the issue's two held-out 8,000-byte texts, none of them
among the make-bench inputs) is packed alone with the embedded SmolLM2 and default
options (``llmarc.pack(file, out)``: int-v2, L = 1024, P = 24), once as 1.1 and once as
3.0, and extracted back; the table gives whole-archive bytes and bits per byte (archive
bytes x 8 / input bytes) and where the bytes of the 3.0 archive go.
"""

from __future__ import annotations

import argparse
import json
import struct
import tempfile
from pathlib import Path

import llmarc
from llmarc.codecs.llm_options import LLMOptions
from llmarc.container import writer
from llmarc.container.index import disassemble
from llmarc.container.small import encode_model

from .inputs import CORPUS
from .stages import stamp

TEXTS = (("lcet10.txt", 700), ("plrabn12.txt", 700), ("asyoulik.txt", 700),
         ("lcet10.txt", 8000), ("plrabn12.txt", 8000))
RESULTS = Path(__file__).resolve().parent / "results"


def pack(path: Path, out: Path, small: bool, threads: int) -> int:
    """Pack ``path`` alone (default options) as 3.0 or 1.1; check it; return its size."""
    writer.WRITE_SMALL = small
    try:
        options = LLMOptions(model="smollm2", device="cpu", threads=threads)
        members = llmarc.pack(path, out, llm=options, warn=lambda m: None, overwrite=True)
    finally:
        writer.WRITE_SMALL = True
    assert members[0].codec == "llm", members[0].codec
    with llmarc.open(out, model="smollm2", device="cpu") as ar:
        assert ar.read(path.name) == path.read_bytes(), "roundtrip failed"
    return out.stat().st_size


def breakdown(archive: bytes) -> dict[str, int]:
    """Where the bytes of a 3.0 archive of one llm member go (spec/format.md §12)."""
    data, index = disassemble(archive)
    (size,) = struct.unpack("<I", archive[-8:-4])
    model = len(encode_model(index.models[0]))
    return {"header": 12, "llm payload": len(data), "index": size, "model record": model,
            "trailer": 8}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, n in TEXTS:
            text = (CORPUS / name).read_bytes()[:n]
            path = Path(tmp) / f"{Path(name).stem}_{n}.txt"
            path.write_bytes(text)
            old = pack(path, Path(tmp) / "old.llma", False, args.threads)
            new = pack(path, Path(tmp) / "new.llma", True, args.threads)
            parts = breakdown((Path(tmp) / "new.llma").read_bytes())
            rows.append({"text": f"{name}[:{n}]", "bytes": n, "format_1_1": old,
                         "format_3_0": new, "bpb_1_1": round(old * 8 / n, 3),
                         "bpb_3_0": round(new * 8 / n, 3), **parts})
    lines = ["| text | bytes | 1.1 archive | 3.0 archive | 1.1 bits/byte | 3.0 bits/byte | "
             "LLM payload | 3.0 container |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['text']} | {r['bytes']:,} | {r['format_1_1']:,} | "
                     f"{r['format_3_0']:,} | {r['bpb_1_1']} | {r['bpb_3_0']} | "
                     f"{r['llm payload']:,} | {r['format_3_0'] - r['llm payload']} |")
    eight = [r for r in rows if r["bytes"] == 8000]
    total_in = sum(r["bytes"] for r in eight)
    for key in ("format_1_1", "format_3_0"):
        total = sum(r[key] for r in eight)
        lines.append(f"\nTwo 8,000-byte texts together, {key}: {total:,} bytes, "
                     f"{total * 8 / total_in:.3f} bits/byte")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        RESULTS.mkdir(exist_ok=True)
        meta = stamp()
        (RESULTS / "small_archives.json").write_text(
            json.dumps({"stamp": meta, "rows": rows}, indent=1) + "\n")
        (RESULTS / "small_archives.md").write_text(
            "# Small LLM archives, format 1.1 against 3.0\n\n"
            "`OMP_NUM_THREADS=1 python -m benchmarks.small_archives` "
            f"({meta.get('date', '')}, {meta.get('machine', '')})\n\n{table}\n")


if __name__ == "__main__":
    main()
