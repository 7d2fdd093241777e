"""Issue 25's rows: the torch-free CPU engine against another build, side by side in one run.

    python -m benchmarks.lean --build new=. --build old=/tmp/oldbuild [--text-bytes 16384]

For each build (a checkout of llmarc, run with this interpreter and that checkout first on
the path) and the embedded SmolLM2, in this order, one process each: ``llmarc --version``
and a refused pack (an existing OUT) — start-up latency; a pack of 200 bytes — time to the
first coded token, model load included; a pack and an extract of five texts (the first
``--text-bytes`` of each benchmark text, batch width 32) — tokens/s; a pack and an extract
of 8,000 bytes of asyoulik.txt as one file — wall time.  Each process's peak RSS comes
from ``wait4``.  Every extract is compared byte for byte, and every member's coded bytes
(its packed size and SHA-256, from ``llmarc list --json`` of each build's own archive:
builds may write different container versions) must be the same in all builds.  Prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import filecmp
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.inputs import CORPUS

TEXTS = ("alice29.txt", "asyoulik.txt", "lcet10.txt", "plrabn12.txt", "cp.html")


def measure(build: Path, *args: str) -> tuple[float, float, int]:
    """(wall seconds, peak RSS in MB, exit status) of ``llmarc ARGS`` run from ``build``."""
    env = {**os.environ, "PYTHONPATH": str(build)}
    started = time.perf_counter()
    process = subprocess.Popen([sys.executable, "-m", "llmarc.cli", *args], cwd=build,
                               env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    assert process.stderr is not None
    process.stderr.read()
    return seconds, usage.ru_maxrss / 1024, os.waitstatus_to_exitcode(status)


def coded(build: Path, archive: Path) -> list[tuple]:
    """(name, codec, packed size, SHA-256) of every member, as ``build`` lists them."""
    import json

    out = subprocess.run([sys.executable, "-m", "llmarc.cli", "list", "--json", str(archive)],
                         cwd=build, env={**os.environ, "PYTHONPATH": str(build)},
                         capture_output=True, text=True, check=True).stdout
    return sorted((m["name"], m["codec"], m["packed_size"], m["sha256"])
                  for m in json.loads(out))


def tokens_of(folder: Path) -> int:
    """The LLM tokens of every file in ``folder`` (the embedded model's lossless
    tokenization: what pack codes)."""
    from benchmarks.stages import _model_and_tokens

    return sum(len(_model_and_tokens(str(path))[1]) for path in sorted(folder.iterdir()))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--build", action="append", required=True,
                        help="LABEL=PATH of a llmarc checkout (repeat)")
    parser.add_argument("--text-bytes", type=int, default=16384)
    args = parser.parse_args()
    builds = [(label, Path(path).resolve()) for label, path in
              (item.split("=", 1) for item in args.build)]
    rows: list[tuple[str, ...]] = []
    archives: dict[str, list[list[tuple]]] = {}
    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory(prefix="llmarc-lean-") as tmp:
        work = Path(tmp)
        five, single, tiny = work / "five", work / "single", work / "tiny"
        for folder in (five, single, tiny):
            folder.mkdir()
        for name in TEXTS:
            (five / name).write_bytes((CORPUS / name).read_bytes()[: args.text_bytes])
        (single / "asyoulik.txt").write_bytes((CORPUS / "asyoulik.txt").read_bytes()[:8000])
        (tiny / "a.txt").write_bytes((CORPUS / "alice29.txt").read_bytes()[:200])
        outs = {label: work / label for label, _ in builds}
        results: dict[str, list[tuple]] = {label: [] for label, _ in builds}
        for out in outs.values():
            out.mkdir()
            (out / "exists.llma").write_bytes(b"keep")

        def each(what: str, *args: str, tokens: int = 0, src: Path | None = None) -> None:
            """One run per build, the builds one after another (a load that comes and
            goes falls on both alike)."""
            for label, build in builds:
                out = outs[label]
                filled = [arg.replace("{out}", str(out)) for arg in args]
                result = measure(build, *filled)
                same = src is None or not filecmp.dircmp(src, out / f"{src.name}-out").diff_files
                results[label].append((what, result, tokens, same))

        each("--version", "--version")
        each("refusal (existing OUT)", "pack", "-q", str(tiny), "{out}/exists.llma")
        each("pack 200 B (first token)", "pack", "-q", "--codec", "llm", str(tiny),
             "{out}/t.llma")
        for name, src in (("five texts", five), ("8,000 B file", single)):
            tokens = counts.setdefault(src.name, tokens_of(src))
            each(f"pack {name}", "pack", "-q", "--codec", "llm", "--batch-width", "32",
                 str(src), f"{{out}}/{src.name}.llma", tokens=tokens)
            each(f"extract {name}", "extract", "-q", f"{{out}}/{src.name}.llma", "-C",
                 f"{{out}}/{src.name}-out", "--batch-width", "32", tokens=tokens, src=src)
            for label, build in builds:
                archives.setdefault(label, []).append(
                    coded(build, outs[label] / f"{src.name}.llma"))
        for label, _ in builds:
            for what, (seconds, rss, code), tokens, same in results[label]:
                rate = f"{tokens / seconds:.0f}" if tokens else ""
                rows.append((label, what, f"{seconds:.2f}", rate, f"{rss:.0f}",
                             f"{code}{'' if same else ' DIFFERS'}"))
    print("| build | run | wall s | tokens/s | peak RSS MB | exit |")
    print("|---|---|---:|---:|---:|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    first = next(iter(archives.values()))
    same = all(packed == first for packed in archives.values())
    print(f"\nevery member coded to the same bytes in every build: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
