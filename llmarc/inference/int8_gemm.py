"""Whether this host's int8 GEMM (``torch._int_mm``) returns exact integer sums.

The integer engines' linear layers (and int-v2's attention) need the exact sum of int8 x
int8 products.  Any kernel that returns it gives the same numbers, so the fastest exact
one may be used: on a CPU with AVX-512 VNNI, oneDNN's int8 GEMM is about three times an
fp32 GEMM and reads a quarter of the bytes.  But that kernel is not exact everywhere:
without VNNI, oneDNN multiplies u8 x s8 pairs with ``vpmaddubsw``, whose int16 pair sums
saturate (measured here with ``ONEDNN_MAX_CPU_ISA=AVX2``: wrong sums even on random
data).  So the kernel is *proven* on this host before it is used: for every GEMM shape
the model has and several row counts, worst-case operands (every product at +-127*127,
the patterns that saturate an int16 pair sum) and random ones are compared with the
exact product.  A host that fails any probe uses the fp32 path (float64 for the
attention; exact by construction); the logits are the same either way, only the speed
differs.  ``LLMARC_INT8_GEMM=off`` forces the fp32 path.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterable

import torch

#: Row counts probed for each shape: the kernels oneDNN picks differ with M (GEMV at 1,
#: small-M and blocked GEMMs above).
PROBE_ROWS = (1, 3, 17, 64)
#: Largest inner dimension whose int32 sums cannot overflow with u8-shifted operands
#: (oneDNN adds 128 to s8 sources): 255 * 127 * 65536 < 2^31.
MAX_INNER = 65536
ENVIRONMENT_SWITCH = "LLMARC_INT8_GEMM"
#: Columns of the random operands' product checked against float64 (the extreme
#: operands are checked on every column).
RANDOM_COLUMNS = 4096


def int8_gemm_is_exact(shapes: Iterable[tuple[int, int]]) -> bool:
    """True when ``torch._int_mm(a, w)`` (a int8 [M, K], w an int8 [K, N] view of [N, K]
    storage) equals the exact product for every (K, N) in ``shapes`` on this CPU."""
    if os.environ.get(ENVIRONMENT_SWITCH, "").lower() in ("0", "off", "no", "false"):
        return False
    return _probe(tuple(sorted(set(shapes))), torch.get_num_threads())


@functools.cache
def _probe(shapes: tuple[tuple[int, int], ...], _threads: int) -> bool:
    if not hasattr(torch, "_int_mm"):
        return False
    generator = torch.Generator().manual_seed(20261130)
    for inner, outer in shapes:
        if inner > MAX_INNER:
            return False
        for a, w, exact in _operands(inner, outer, generator):
            try:
                got = torch._int_mm(a, w)
            except RuntimeError:
                return False
            if not torch.equal(got[:, : exact.shape[1]], exact):
                return False
    return True


def _operands(inner: int, outer: int, generator: torch.Generator):
    """(a [M, inner], w [inner, outer] as a view of [outer, inner] storage, exact a @ w)
    for each M of :data:`PROBE_ROWS`: extreme operands (every product +-16129, which
    saturates an int16 pair sum at once), an alternating-sign row, and random values
    checked against a float64 GEMM (exact: every partial sum is an integer below 2^53)."""
    full = 127 * 127
    positive = torch.full((outer, inner), 127, dtype=torch.int8).t()
    negative = torch.full((outer, inner), -127, dtype=torch.int8).t()
    alternating = torch.where(torch.arange(inner) % 2 == 0, 127, -127).to(torch.int8)
    block = torch.randint(-127, 128, (min(outer, 1024), inner), generator=generator,
                          dtype=torch.int8)  # tiled: random enough, cheap at 49152 rows
    random_w = block.repeat(-(-outer // block.shape[0]), 1)[:outer].t()
    # the float64 check of random values on the first columns only (a 49,152-column
    # float64 copy would be 226 MB while the float model is still in memory)
    checked = min(outer, RANDOM_COLUMNS)
    random_wide = random_w[:, :checked].to(torch.float64)
    for rows in PROBE_ROWS:
        for sign_a in (1, -1):
            a = torch.full((rows, inner), 127 * sign_a, dtype=torch.int8)
            for sign_w, w in ((1, positive), (-1, negative)):
                value = sign_a * sign_w * full * inner
                yield a, w, torch.full((rows, outer), value, dtype=torch.int32)
        a = alternating.expand(rows, inner).contiguous()
        yield a, positive, torch.full((rows, outer), full * (inner % 2), dtype=torch.int32)
        a = torch.randint(-127, 128, (rows, inner), generator=generator, dtype=torch.int8)
        exact = torch.matmul(a.to(torch.float64), random_wide).to(torch.int32)
        yield a, random_w, exact
