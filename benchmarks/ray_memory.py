"""The ``--ray`` driver's memory against the corpus size (issue 22): does it stay flat?

    python -m benchmarks.ray_memory [--mib 4 16] [--model fixtures/tiny-llama-bpe] [--nodes 2]

For each size, a corpus of text files (slices of ../shared/corpus/enwik8_first1MB, each
file 1 MiB, each slice rotated so no two files are equal) is packed with ``--ray`` (a
local runtime: two actors on this machine; with ``--nodes N``, a cluster of N nodes of
one CPU each started on this machine by Ray's ``cluster_utils.Cluster``, which the
driver joins by its address) and extracted with ``--ray``; the driver's own
peak RSS (VmHWM, read in the driver as it exits: the actors are other processes) and the
wall time are printed, every extract is compared with its input, and the archive is
compared byte for byte with a pack of the same corpus in one process.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from benchmarks.inputs import CORPUS
from benchmarks.small_files import same_tree

ROOT = Path(__file__).resolve().parents[1]

#: Runs the CLI, then prints the process's own peak RSS in MiB on its last stderr line.
DRIVER = r"""
import sys
from llmarc.cli import run
code = run(sys.argv[1:])
peak = next(int(line.split()[1]) for line in open("/proc/self/status")
            if line.startswith("VmHWM"))
print(f"PEAK {peak / 1024:.0f}", file=sys.stderr)
sys.exit(code)
"""


def driver(*args: str) -> tuple[float, int]:
    """(wall seconds, the driver's peak RSS in MiB) of ``llmarc ARGS``."""
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-c", DRIVER, *args], cwd=ROOT,
                            capture_output=True, text=True, check=False,
                            env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    seconds = time.perf_counter() - started
    if result.returncode:
        raise SystemExit(f"llmarc {' '.join(args)} failed: {result.stderr[-2000:]}")
    peak = int(result.stderr.strip().splitlines()[-1].split()[1])
    return seconds, peak


def make_corpus(folder: Path, mib: int) -> None:
    text = (CORPUS / "enwik8_first1MB").read_bytes()[: 1 << 20]
    folder.mkdir()
    for i in range(mib):
        cut = (i * 104_729) % len(text)
        (folder / f"part{i:04d}.txt").write_bytes(text[cut:] + text[:cut])


@contextlib.contextmanager
def ray_option(nodes: int) -> Iterator[list[str]]:
    """The ``--ray`` arguments: a local runtime (``nodes`` 1), else the address of a
    cluster of ``nodes`` raylets of one CPU each, shut down when the block ends."""
    if nodes == 1:
        yield ["--ray", "--"]
        return
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True,
                      head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        for _ in range(nodes - 1):
            cluster.add_node(num_cpus=1)
        cluster.wait_for_nodes()
        yield ["--ray", cluster.address, "--"]
    finally:
        cluster.shutdown()


def print_row(mib: int, what: str, wall: float, peak: int, check: str) -> None:
    """One table row, printed as soon as it is measured: a long run keeps what it did."""
    print(f"| {mib} MiB | {what} | {wall:.1f} | {peak} | {check} |", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mib", nargs="+", type=int, default=[4, 16])
    parser.add_argument("--model", default=str(ROOT / "fixtures" / "tiny-llama-bpe"))
    parser.add_argument("--nodes", type=int, default=1,
                        help="1: a local runtime; N: a cluster of N one-CPU nodes")
    args = parser.parse_args()
    print("| corpus | run | wall s | driver peak RSS MiB | check |")
    print("|---|---|---:|---:|---|")
    with tempfile.TemporaryDirectory(prefix="llmarc-ray-memory-") as tmp, \
            ray_option(args.nodes) as ray:
        work = Path(tmp)
        for mib in args.mib:
            src = work / f"src{mib}"
            make_corpus(src, mib)
            common = ["--codec", "llm", "--model", args.model, "-q"]
            ray_archive, local_archive = work / f"ray{mib}.llma", work / f"local{mib}.llma"
            where = "" if args.nodes == 1 else f", {args.nodes} nodes"
            row = functools.partial(print_row, mib)
            row(f"pack --ray{where}", *driver("pack", *common, *ray, str(src),
                                               str(ray_archive)), "")
            seconds = driver("pack", *common, str(src), str(local_archive))
            same = ray_archive.read_bytes() == local_archive.read_bytes()
            row("pack, one process", *seconds,
                "same archive as --ray" if same else "ARCHIVES DIFFER")
            out = work / f"out{mib}"
            extracted = driver("extract", "--model", args.model, "-q", "-C", str(out), *ray,
                               str(ray_archive))
            row(f"extract --ray{where}", *extracted,
                "exact" if same_tree(src, out) else "DIFFERS")
    return 0


if __name__ == "__main__":
    sys.exit(main())
