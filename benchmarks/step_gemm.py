"""A decoding step's GEMMs: the VNNI kernel against oneDNN's int8 GEMM, same operands.

    python -m benchmarks.step_gemm                 # 32 rows, SmolLM2-135M's shapes
    python -m benchmarks.step_gemm --rows 8 --threads 1

Prints, per weight shape (inner x outputs) of SmolLM2-135M (fused q/k/v, o, fused
gate/up, down, lm_head), the best of 5 x 10 calls of each kernel on random int8
operands in ms and G multiply-adds/s, and the sum over one step (30 layers + lm_head).
The operands stay in cache between calls, unlike a real step, whose weights come from
memory: compare the kernels with each other, not with a step's profile.  Each result
is checked against the other first.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from llmarc.inference import vnni

#: (inner, outputs) of SmolLM2-135M's GEMMs and how often a step runs each.
SHAPES = [((576, 960), 30), ((576, 576), 30), ((576, 3072), 30), ((1536, 576), 30),
          ((576, 49152), 1)]


def best_of(call, repeats: int = 5, calls: int = 10) -> float:
    call()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(calls):
            call()
        best = min(best, (time.perf_counter() - start) / calls)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    args = parser.parse_args()
    if not vnni.available():
        raise SystemExit("this CPU has no AVX-512 VNNI (or LLMARC_VNNI=off): nothing to compare")
    import numba

    torch.set_num_threads(args.threads)
    numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    kernel = vnni.kernel()
    rng = np.random.default_rng(0)
    totals = {"vnni": 0.0, "onednn": 0.0}
    print(f"{args.rows} rows, {args.threads} threads")
    print(f"{'inner x outputs':>16} {'VNNI ms':>9} {'GMAC/s':>7} {'oneDNN ms':>10} {'GMAC/s':>7}")
    for (inner, outputs), per_step in SHAPES:
        q = rng.integers(-127, 128, (args.rows, inner)).astype(np.int8)
        weight = rng.integers(-127, 128, (outputs, inner)).astype(np.int8)
        packed = vnni.pack(weight)
        ours, theirs = np.empty((args.rows, outputs), np.int32), torch.empty(
            args.rows, outputs, dtype=torch.int32)
        q_tensor, w_tensor = torch.from_numpy(q), torch.from_numpy(weight).t()
        kernel(q, *packed, ours)
        torch._int_mm(q_tensor, w_tensor, out=theirs)
        if not np.array_equal(ours, theirs.numpy()):
            raise SystemExit(f"the kernels disagree on {inner} x {outputs}")
        mine = best_of(lambda q=q, packed=packed, ours=ours: kernel(q, *packed, ours))
        other = best_of(lambda a=q_tensor, w=w_tensor, out=theirs: torch._int_mm(a, w, out=out))
        work = args.rows * inner * outputs
        totals["vnni"] += per_step * mine
        totals["onednn"] += per_step * other
        print(f"{inner:>7} x {outputs:<6} {mine * 1e3:9.3f} {work / mine / 1e9:7.0f} "
              f"{other * 1e3:10.3f} {work / other / 1e9:7.0f}")
    print(f"one step (30 layers + lm_head): VNNI {totals['vnni'] * 1e3:.1f} ms, "
          f"oneDNN {totals['onednn'] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
