"""Many small files: llmarc ``--codec zstd`` against ``tar | zstd -19``, and ``list`` time.

    python -m benchmarks.small_files            # 10,000 files; list of 20,000 entries
    python -m benchmarks.small_files --files 2000 --list-files 4000   # quicker

Why: a source tree or a mail folder is thousands of small files, where a per-entry index
cost (114 bytes per entry in format 1.0) outweighs the data. The files are fixed slices
(20 to 140 bytes, a seeded generator) of the text files of ``../shared/corpus``, 100 per
directory. Two mtime variants are measured: as written (nanosecond mtimes, what a fresh
checkout has; tar's default format keeps whole seconds only) and whole seconds (what a
tree extracted from a tarball has). Every llmarc archive is extracted in a fresh process
and compared byte for byte; the tar stream is decompressed and compared too. Wall times
are of whole processes (``llmarc`` started as ``python -m llmarc.cli``), on a shared
machine: treat them as indications.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .inputs import CORPUS

TEXTS = ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt", "fields.c", "xargs.1",
         "grammar.lsp", "cp.html", "html", "urls.10K", "text8_first1MB", "enwik8_first1MB")


def make_tree(root: Path, n: int, *, whole_seconds: bool, seed: int = 11) -> int:
    """``n`` small files below ``root`` (fixed content); returns their total size."""
    rng = random.Random(seed)
    blobs = []
    for name in TEXTS:
        path = CORPUS / name
        if not path.exists():
            raise SystemExit(f"benchmark input {path} is missing (../shared/corpus)")
        blobs.append((name, path.read_bytes()))
    pos = dict.fromkeys(TEXTS, 0)
    total = 0
    for i in range(n):
        name, blob = blobs[i % len(blobs)]
        size = rng.randint(20, 140)
        start = pos[name] if pos[name] + size <= len(blob) else 0
        data = blob[start:start + size]
        pos[name] = start + size
        d = root / name.replace(".", "_") / f"{(i // len(blobs)) // 100:03d}"
        d.mkdir(parents=True, exist_ok=True)
        f = d / f"part{i:05d}.txt"
        f.write_bytes(data)
        if whole_seconds:
            os.utime(f, (1_700_000_000 + i, 1_700_000_000 + i))
        total += len(data)
    return total


def timed(cmd: list[str], **kw) -> tuple[float, subprocess.CompletedProcess]:
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, check=True, **kw)
    return time.perf_counter() - t, proc


LLMARC = [sys.executable, "-m", "llmarc.cli"]


def same_tree(a: Path, b: Path) -> bool:
    cmp = filecmp.dircmp(a, b)
    stack = [cmp]
    while stack:
        c = stack.pop()
        if c.left_only or c.right_only or c.funny_files:
            return False
        _, mismatch, errors = filecmp.cmpfiles(c.left, c.right, c.common_files, shallow=False)
        if mismatch or errors:
            return False
        stack.extend(c.subdirs.values())
    return True


def pack_row(work: Path, n: int, whole_seconds: bool) -> dict:
    src = work / f"src-{n}-{'s' if whole_seconds else 'ns'}"
    size = make_tree(src, n, whole_seconds=whole_seconds)
    arc = work / f"{src.name}.llma"
    t_llmarc, _ = timed([*LLMARC, "pack", str(src), str(arc), "--codec", "zstd", "-q"])
    out = work / f"{src.name}-out"
    timed([*LLMARC, "extract", str(arc), "-C", str(out), "-q"])
    assert same_tree(src, out), "llmarc roundtrip differs"
    tar = work / f"{src.name}.tar.zst"
    t_tar, _ = timed(["sh", "-c", f"tar -C '{src}' -cf - . | zstd -19 -q -c > '{tar}'"])
    check = work / f"{src.name}-tar"
    check.mkdir()
    timed(["sh", "-c", f"zstd -dc '{tar}' | tar -C '{check}' -xf -"])
    assert same_tree(src, check), "tar roundtrip differs"
    return {"files": n, "bytes": size, "mtimes": "whole s" if whole_seconds else "ns",
            "llmarc": arc.stat().st_size, "tar": tar.stat().st_size,
            "t_llmarc": t_llmarc, "t_tar": t_tar}


def list_row(work: Path, n: int) -> dict:
    src = work / f"list-{n}"
    make_tree(src, n, whole_seconds=False, seed=12)
    arc = work / f"list-{n}.llma"
    timed([*LLMARC, "pack", str(src), str(arc), "--codec", "zstd", "-q"])
    entries = int(subprocess.run([*LLMARC, "info", str(arc)], capture_output=True, text=True,
                                 check=True).stdout.split("members:")[1].split()[0])
    t_table, proc = timed([*LLMARC, "list", str(arc)])
    t_json, _ = timed([*LLMARC, "list", "--json", str(arc)])
    t_start, _ = timed([*LLMARC, "version"])
    rows = len(proc.stdout.splitlines()) - 1
    return {"files": entries, "entries": rows, "index": arc.stat().st_size,
            "t_table": t_table, "t_json": t_json, "t_start": t_start}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--list-files", type=int, default=20_000)
    args = ap.parse_args(argv)
    work = Path(tempfile.mkdtemp(prefix="llmarc-small-"))
    try:
        rows = [pack_row(work, args.files, ws) for ws in (False, True)]
        lst = list_row(work, args.list_files)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print("| files | bytes | mtimes | llmarc zstd | tar \\| zstd -19 | llmarc / tar "
          "| llmarc pack s | tar \\| zstd s |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {r['files']:,} | {r['bytes']:,} | {r['mtimes']} | {r['llmarc']:,} | "
              f"{r['tar']:,} | {r['llmarc'] / r['tar']:.3f} | {r['t_llmarc']:.1f} | "
              f"{r['t_tar']:.1f} |")
    print()
    print("| archive | list rows | `list` s | `list --json` s | process start s |")
    print("|---|---:|---:|---:|---:|")
    print(f"| {lst['files']:,} files + dirs | {lst['entries']:,} | {lst['t_table']:.2f} | "
          f"{lst['t_json']:.2f} | {lst['t_start']:.2f} |")


if __name__ == "__main__":
    main()
