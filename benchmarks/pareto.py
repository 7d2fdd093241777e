"""Ratio against speed for the settings a user can choose (issue 24 item 5, first rows).

    python -m benchmarks.pareto [--input alice29.txt lcet10.txt:100000:8192 llmarc/ ...]
                                [--settings 1024 2048 1024:256:8 1024/nosolid]

For each input and each setting (a segment length L with the pack's defaults, context
carry ``auto`` included; L:0 without carry; L:C:G for context carry of C tokens in
chains of G segments, with the default mixing; L:C:G:K with n-gram mixing of orders
0..K, 0 for none; ``/nosolid`` after any: ``--no-solid``, each small
file its own member instead of sharing an LLM solid block), with the
embedded SmolLM2 and int-v2 on this machine's CPUs: one ``llmarc pack --codec llm`` and
one ``llmarc extract`` in fresh processes; prints whole-archive bits per byte (archive
bytes x 8 / input bytes), pack and extract tokens/s (model load included, so short
inputs understate the rate) and peak RSS, as a Markdown table.  Every extract is
compared with its input.  zstd -19 and xz -9 of the same bytes are printed beside.

An input is a file of ../shared/corpus, whole or as NAME:OFFSET:SIZE (a slice, e.g. the
held-out 8 KB texts of ratio_options.py), such a slice cut into files of PIECE bytes as
NAME:OFFSET:SIZE/PIECE (a folder of small texts), or a folder ending in ``/`` (relative
to the repository): its ``*.py`` files, flattened into one folder of files, a source
tree; the classic compressors then see the files concatenated in name order; or
``bench-texts``: the five 64 KiB texts of ``make bench`` (benchmarks/inputs.py), whose
extraction rate issue 24 bounds.
"""

from __future__ import annotations

import argparse
import lzma
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import zstandard

from benchmarks.inputs import CORPUS, FULL, text_inputs
from benchmarks.lean import tokens_of
from benchmarks.small_files import same_tree
from llmarc.codecs.llm import AUTO_MIX

ROOT = Path(__file__).resolve().parents[1]
BENCH_TEXTS = "bench-texts"


def run(*args: str) -> tuple[float, float]:
    """(wall seconds, peak RSS MB) of ``llmarc ARGS``; a failure ends the benchmark."""
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "llmarc.cli", *args], cwd=ROOT,
                               stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    assert process.stderr is not None
    error = process.stderr.read().decode(errors="replace")
    if os.waitstatus_to_exitcode(status):
        raise SystemExit(f"llmarc {' '.join(args)} failed: {error}")
    return time.perf_counter() - started, usage.ru_maxrss / 1024


def input_files(name: str) -> dict[str, bytes]:
    """{file name: bytes} of an input (see the module's docstring)."""
    if name == BENCH_TEXTS:
        return {item.name: item.data for item in text_inputs(FULL)}
    if name.endswith("/"):
        folder = ROOT / name
        return {"_".join(path.relative_to(folder).parts): path.read_bytes()
                for path in sorted(folder.rglob("*.py"))}
    name, _, piece = name.partition("/")
    file_name, *cut = name.split(":")
    data = (CORPUS / file_name).read_bytes()
    if cut:
        offset, size = map(int, cut)
        data = data[offset:offset + size]
    if not piece:
        return {file_name: data}
    step = int(piece)
    return {f"{file_name}.{i // step:04d}": data[i:i + step] for i in range(0, len(data), step)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--input", nargs="+", default=["alice29.txt"])
    parser.add_argument("--settings", nargs="+", default=["1024", "1024:0", "1024:256:8"],
                        help="L (the defaults), L:0 (no carry), L:C:G (context carry C in "
                             "chains of G), L:C (G: the pack's default), or L:C:G:K "
                             "(mixing of orders 0..K)")
    args = parser.parse_args()
    print("| input | setting | whole-archive bits/byte | pack tokens/s | extract tokens/s "
          "| pack / extract peak RSS MB |")
    print("|---|---|---:|---:|---:|---|")
    with tempfile.TemporaryDirectory(prefix="llmarc-pareto-") as tmp:
        work = Path(tmp)
        for name in args.input:
            src = work / name.replace("/", "_").replace(":", "_")
            src.mkdir()
            for file_name, content in input_files(name).items():
                (src / file_name).write_bytes(content)
            data = b"".join(path.read_bytes() for path in sorted(src.iterdir()))
            tokens = tokens_of(src)
            for label, packed in (("zstd -19", zstandard.ZstdCompressor(level=19).compress(data)),
                                  ("xz -9", lzma.compress(data, preset=9))):
                print(f"| {name} | {label} | {len(packed) * 8 / len(data):.3f} | | | |")
            for setting in args.settings:
                coding, _, solid = setting.partition("/")
                length, carry, chain, mix = [*coding.split(":"), "", "", ""][:4]
                options = ["--segment-length", length]
                label = f"L = {length}"
                if solid == "nosolid":
                    options.append("--no-solid")
                    label += ", no LLM blocks"
                if not carry:
                    label += ", defaults (carry auto)"
                elif carry == "0":
                    options += ["--carry", "0"]
                    label += ", no carry"
                else:
                    options += ["--carry", carry, *(["--chain", chain] if chain else [])]
                    options += ["--mix", mix] if mix else []
                    label += (f", carry {carry}, chain {chain or 'auto'}, "
                              f"{'no mix' if mix == '0' else f'mix {mix or AUTO_MIX}'}")
                archive = work / f"{src.name}-{setting.replace('/', '_').replace(':', '_')}.llma"
                pack, pack_rss = run("pack", "-q", "--codec", "llm", *options, str(src),
                                     str(archive))
                out = work / f"{src.name}-{setting.replace('/', '_').replace(':', '_')}-out"
                extract, extract_rss = run("extract", "-q", str(archive), "-C", str(out))
                same = same_tree(src, out)
                bits = archive.stat().st_size * 8 / len(data)
                print(f"| {name} | int-v2, {label} | {bits:.3f} | {tokens / pack:.0f} "
                      f"| {tokens / extract:.0f}{'' if same else ' DIFFERS'} "
                      f"| {pack_rss:.0f} / {extract_rss:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
