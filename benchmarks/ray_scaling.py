"""The same pack in one process and on 1 and 2 local Ray actors: wall time and tokens/s.

    python -m benchmarks.ray_scaling                       # tiny fixture model, 64 KiB
    python -m benchmarks.ray_scaling --model smollm2 --kib 4 --segment-length 256

Every run packs the same bytes (the first KiB of ``../shared/corpus/alice29.txt``) with
the same settings and one thread per coder, checks that the archives are identical byte
for byte, and prints a Markdown table plus the per-segment cost that the 1 GB estimate
in benchmarks/README.md is computed from.  Ray's runtime is started once (``num_cpus=2``)
and not counted; actor start-up (each actor imports torch and loads the model) is.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_NUM_THREADS", "1")  # before torch: one thread per coder
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT.parent / "shared" / "corpus"
TINY = ROOT / "fixtures" / "tiny-llama-bpe"


class Clock:
    """A progress sink that times the LLM coding: from the token bar's creation (after
    the driver's model load and tokenization) to its close (every segment coded)."""

    def __init__(self) -> None:
        self.tokens = 0
        self.began = self.ended = 0.0

    def start(self, total: int, description: str) -> None: ...
    def advance(self, n: int) -> None: ...  # bytes
    def close(self) -> None: ...
    def note(self, message: str) -> None: ...

    def token_task(self, total: int, description: str) -> Clock.Tokens:
        self.began = time.perf_counter()
        return Clock.Tokens(self)

    class Tokens:
        def __init__(self, clock: Clock) -> None:
            self.clock = clock

        def advance(self, n: int) -> None:
            self.clock.tokens += n

        def close(self) -> None:
            self.clock.ended = time.perf_counter()


def pack_once(src: Path, out: Path, options: Any) -> dict[str, Any]:
    """Pack ``src`` once: wall time of the whole pack, of its LLM coding, and (on Ray)
    of the actors' start-up and of the coding once they were all up."""
    import llmarc
    from llmarc.distributed import ray_coder

    made: list[Any] = []

    class Recording(ray_coder.RayCoder):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            made.append(self)

    original, ray_coder.RayCoder = ray_coder.RayCoder, Recording
    clock = Clock()
    try:
        started = time.perf_counter()
        llmarc.pack(src, out, codec="llm", progress=clock, llm=options)
        wall = time.perf_counter() - started
    finally:
        ray_coder.RayCoder = original
    coding = clock.ended - clock.began
    steady = made[0].last_run.coding_s if made else coding
    return {"wall_s": wall, "coding_s": coding, "tokens": clock.tokens,
            "startup_s": made[0].last_run.startup_s if made else 0.0,
            "steady_s": steady, "tokens_per_s": clock.tokens / steady if steady else 0.0,
            "archive_bytes": out.stat().st_size}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=str(TINY), help="model (default: tiny fixture)")
    parser.add_argument("--kib", type=int, default=64, help="KiB of alice29.txt to pack")
    parser.add_argument("--corpus", type=Path, default=CORPUS, help="folder of alice29.txt")
    parser.add_argument("--segment-length", type=int, default=256)
    parser.add_argument("--batch-width", type=int, default=8)
    parser.add_argument("--engine", default="int-v2")
    parser.add_argument("--json", type=Path, help="also write the figures here")
    args = parser.parse_args(argv)

    import ray

    from llmarc.codecs.llm_options import LLMOptions
    from llmarc.distributed import ray_coder

    data = (args.corpus / "alice29.txt").read_bytes()[: args.kib * 1024]
    work = Path(tempfile.mkdtemp(prefix="llmarc-ray-bench-"))
    src = work / "src"
    src.mkdir()
    (src / "alice29.txt").write_bytes(data)
    settings = {"model": args.model, "threads": 1, "engine": args.engine,
                "segment_length": args.segment_length, "batch_width": args.batch_width}
    ray.init(num_cpus=2, include_dashboard=False, namespace=ray_coder.NAMESPACE,
             log_to_driver=False)
    rows: list[dict[str, Any]] = []
    archives: dict[str, bytes] = {}
    for label, workers in (("one process", None), ("Ray, 1 actor", 1), ("Ray, 2 actors", 2)):
        if workers is not None:
            os.environ[ray_coder.WORKERS_ENV] = str(workers)
        options = LLMOptions(ray=None if workers is None else "local", **settings)
        out = work / f"{label.replace(' ', '_').replace(',', '')}.llma"
        row = {"run": label, **pack_once(src, out, options)}
        rows.append(row)
        archives[label] = out.read_bytes()
        print(f"bench: {label}: {row}", file=sys.stderr, flush=True)
    ray.shutdown()
    identical = len(set(archives.values())) == 1
    segments = -(-rows[0]["tokens"] // args.segment_length)
    per_segment = rows[0]["coding_s"] / max(1, segments)
    print(f"\n{args.kib} KiB of alice29.txt, model {Path(args.model).name}, engine "
          f"{args.engine}, L={args.segment_length}, B={args.batch_width}, threads=1; "
          f"{rows[0]['tokens']} tokens in {segments} segments; archives identical: "
          f"{identical}\n")
    print("| run | pack wall s | LLM coding s | actor start-up s | coding after start-up s "
          "| tokens/s after start-up | speed-up |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for row in rows:
        print(f"| {row['run']} | {row['wall_s']:.1f} | {row['coding_s']:.1f} | "
              f"{row['startup_s']:.1f} | {row['steady_s']:.1f} | {row['tokens_per_s']:.0f} | "
              f"{rows[0]['steady_s'] / row['steady_s']:.2f} |")
    print(f"\nper segment of {args.segment_length} tokens, one process: {per_segment:.3f} s; "
          f"bytes per token: {len(data) / max(1, rows[0]['tokens']):.2f}")
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "identical": identical,
                                         "segments": segments, "per_segment_s": per_segment,
                                         "bytes": len(data), **settings}, indent=1))
    return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
