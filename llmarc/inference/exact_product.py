"""Exact integer products on the CPU with NumPy and the compiled kernels (no torch).

The integer engines' linear layers need ``sum_k q[m, k] * w[n, k]`` for int8 q and w,
exactly.  Every kernel that returns that integer gives the same archive, so the fastest
one this host can run is used, chosen by the shape of the work:

* the AVX-512 VNNI tiles of :mod:`llmarc.inference.vnni` on CPUs that have them (exact
  by integer arithmetic; measured on the 2-core host at 330-400 G multiply-adds/s from
  256 rows on, against 210-410 for oneDNN's int8 GEMM, which this module replaced along
  with torch);
* elsewhere ``int8_rows`` (:mod:`llmarc.inference.kernels`) for one or two rows: each
  weight row read once at memory speed, the decoder's step with few segments;
* and float32 GEMMs through NumPy's BLAS over chunks of the inner dimension of at
  most :data:`FP32_EXACT_CHUNK`: every product is an integer of at most 127 * 127 and
  every partial sum an integer below 2^24, exactly representable, so any BLAS, any
  order of addition and any fused multiply-add give the exact sum.

Results are int32 (|sum| <= 127 * 127 * K < 2^31 for K <= 131,072; the engine's widest
inner dimension is far below).  :func:`batched_int8_product` runs int-v2's attention sums
the same way; :func:`float_product` is int-v1's (16-bit operands, one float64 GEMM per
matrix, exact below 2^53).  Both loop over the leading axes with one 2-D GEMM each:
NumPy's stacked matmul did not reach the BLAS here (1.7 G multiply-adds/s against 50-60
for the same matrices one at a time).
"""

from __future__ import annotations

import numpy as np

from llmarc.inference import vnni
from llmarc.inference.kernels import DOT_BLOCK, _kernels

#: Inner-dimension chunk for which an fp32 GEMM of int8 values is exact: 127*127*1040 < 2^24.
FP32_EXACT_CHUNK = 1040
#: Up to this many rows a product runs on ``int8_rows`` where there is no VNNI kernel.
SMALL_GEMM_ROWS = 2
#: Output columns widened to float32 at a time by the BLAS path: its temporaries stay at
#: a few MB even for a 49,152-row lm_head.
FLOAT_COLUMNS = 2048
#: Multiply-adds from which a VNNI product runs on the kernels' threads: below, waking
#: the second thread costs more than it saves, and on a loaded machine a time slice
#: (12-16 ms measured for a 0.24 ms product while other processes held both cores).
PARALLEL_MACS = 1 << 26


class Int8Matrix:
    """int8 weights [outputs, inner] and their exact products with int8 rows.

    On a CPU with the VNNI kernel the weights are kept in its layout only (one copy:
    keeping the plain one too for ``int8_rows`` cost SmolLM2 +134 MB, for a kernel that
    is faster only for one or two rows on one thread); elsewhere as they are."""

    def __init__(self, rows: np.ndarray) -> None:
        if rows.dtype != np.int8 or rows.ndim != 2:
            raise ValueError("Int8Matrix takes int8 [outputs, inner] weights")
        self.outputs, self.inner = (int(n) for n in rows.shape)
        self.rows: np.ndarray | None = None
        self.packed: tuple[np.ndarray, np.ndarray] | None = None
        if vnni.available() and self.inner <= vnni.MAX_INNER:
            self.packed = vnni.pack(rows)
        else:
            self.rows = np.ascontiguousarray(rows)

    def product(self, q: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
        """out [M, outputs] (int32) = q [M, inner] (int8, |q| <= 127) times the weights."""
        count = q.shape[0]
        if out is None:
            out = np.empty((count, self.outputs), dtype=np.int32)
        if count == 0:
            return out
        if self.packed is not None:
            big = count * self.outputs * self.inner >= PARALLEL_MACS
            parallel = big and _kernels(1 << 30).parallel  # False with one thread
            vnni.kernel(parallel)(q, *self.packed, out)
            return out
        assert self.rows is not None
        if count <= SMALL_GEMM_ROWS and self.inner % DOT_BLOCK == 0:
            _kernels().int8_rows(q, self.rows, out)
        else:
            blas_product(q, self.rows, out)
        return out


def blas_product(q: np.ndarray, rows: np.ndarray, out: np.ndarray) -> None:
    """out = q @ rows.T exactly (int32) by float32 GEMMs over inner chunks of at most
    :data:`FP32_EXACT_CHUNK` and output blocks of :data:`FLOAT_COLUMNS` (each chunk's
    result is an exact integer below 2^24; chunks are added in int32)."""
    inner = rows.shape[1]
    widened = q.astype(np.float32)
    for first in range(0, rows.shape[0], FLOAT_COLUMNS):
        block = rows[first : first + FLOAT_COLUMNS]
        target = out[:, first : first + block.shape[0]]
        for begin in range(0, inner, FP32_EXACT_CHUNK):
            end = min(inner, begin + FP32_EXACT_CHUNK)
            part = widened[:, begin:end] @ block[:, begin:end].T.astype(np.float32)
            if begin == 0:
                target[...] = part
            else:
                target += part.astype(np.int32)


def batched_int8_product(a: np.ndarray, b_rows: np.ndarray) -> np.ndarray:
    """out[..., m, n] = sum_k a[..., m, k] * b_rows[..., n, k] exactly (int32), for int8
    operands over the same leading axes: one :class:`Int8Matrix` product per matrix."""
    lead = a.shape[:-2]
    out = np.empty((*lead, a.shape[-2], b_rows.shape[-2]), dtype=np.int32)
    for index in np.ndindex(*lead):
        Int8Matrix(b_rows[index]).product(np.ascontiguousarray(a[index]), out[index])
    return out


def float_product(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """a @ b exactly for float64 arrays holding integers whose products are below 2^30
    (int-v1's attention), over the same leading axes: one float64 GEMM per matrix, exact
    while every partial sum stays below 2^53 (at most 2^23 terms)."""
    lead = a.shape[:-2]
    out = np.empty((*lead, a.shape[-2], b.shape[-1]), dtype=np.float64)
    a, b = a.astype(np.float64, copy=False), b.astype(np.float64, copy=False)
    for index in np.ndindex(*lead):
        np.matmul(a[index], b[index], out=out[index])
    return out
