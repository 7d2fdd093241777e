"""An exact int8 GEMM on CPUs with AVX-512 VNNI: every linear layer's product, and
int-v2's prefill attention sums (:mod:`llmarc.inference.exact_product`).

Written first for the decoder's step (32 rows, where oneDNN's int8 GEMM reached 110-180
G multiply-adds/s on the 2-core host against 450 at 256 rows), it turned out as fast as
oneDNN at any row count (330-400 G from 256 rows on, measured side by side), so it
replaced it and torch with it.  A tile of 4 rows x 64 output columns is kept in 16
vector registers, one ``vpdpbusd`` (64 multiply-adds) per register and group of 4 inner
indexes, the weights' column block read once per call and reused from cache by every
tile of rows.

Exactness does not depend on the CPU's rounding, only on integer arithmetic:
``vpdpbusd`` multiplies unsigned by signed bytes, so the int8 inputs q are offset to
q + 128 (in [1, 255]; a byte XOR 0x80), and 128 * sum_k w[k, n] (the compensation,
computed once per layer) is subtracted from each column's sum.  Every int32 sum is below
255 * 127 * K < 2^31 for K <= 65,536 (:data:`MAX_INNER`), and vpdpbusd wraps, never
saturates (that is vpdpbusds).  So the result is the same integer sum the other exact
paths return, and nothing in an archive changes.

It is used only where numba generates code for this host's CPU and that CPU has
AVX-512 VNNI (numba's cache is keyed on the CPU, so a cached kernel never runs on
another); ``LLMARC_VNNI=off`` disables it.  Written as an LLVM intrinsic because numba
has no vector types: the 16 accumulators must live in registers across the inner loop.
"""

from __future__ import annotations

import functools
import os
from typing import Any

import numpy as np

#: Output columns of a tile (4 vectors of 16 int32) and rows of a tile.
TILE_COLUMNS = 64
TILE_ROWS = 4
#: Inner indexes per vpdpbusd lane.
GROUP = 4
#: Groups of inner indexes per pass over the tiles of rows: 32 x 256 bytes of weights.
CHUNK_GROUPS = 32
#: Below this many blocks of columns, each block's rows are split between two tasks.
FEW_BLOCKS = 32
ENVIRONMENT_SWITCH = "LLMARC_VNNI"
#: Largest inner dimension whose offset sums stay below 2^31 (255 * 127 * 65536).
MAX_INNER = 65536


@functools.cache
def available() -> bool:
    """Whether the compiled kernels target a CPU with AVX-512 VNNI (this host's, unless
    ``NUMBA_CPU_NAME`` names another) and the switch does not turn the kernel off."""
    if os.environ.get(ENVIRONMENT_SWITCH, "").lower() in ("0", "off", "no", "false"):
        return False
    try:
        import llvmlite.binding as llvm
        from numba.core import config
    except ImportError:  # pragma: no cover - numba is in the llm extra
        return False
    if config.CPU_NAME not in (None, "host"):
        return False
    features = llvm.get_host_cpu_features()
    return all(features.get(flag, False) for flag in ("avx512f", "avx512bw", "avx512vnni"))


def pack(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(packed, compensation) of int8 weights [N, K] (output rows, as the GEMM stores
    them): packed [ceil(N/64), ceil(K/4), 64, 4] int8, zero-padded (a block of 64
    columns is one run of memory, 4 inner indexes of a column side by side: the lanes of
    vpdpbusd), and compensation int32 [N] = 128 * sum_k w[n, k]."""
    outputs, inner = weight.shape
    blocks = -(-outputs // TILE_COLUMNS)
    groups = -(-inner // GROUP)
    padded = np.zeros((blocks * TILE_COLUMNS, groups * GROUP), dtype=np.int8)
    padded[:outputs, :inner] = weight
    packed = np.ascontiguousarray(
        padded.reshape(blocks, TILE_COLUMNS, groups, GROUP).transpose(0, 2, 1, 3))
    compensation = (weight.sum(axis=1, dtype=np.int64) * 128).astype(np.int32)
    return packed, compensation


def dot_instruction(builder: Any) -> Any:
    """The LLVM function of ``vpdpbusd`` on 512 bits in ``builder``'s module: (int32 x 16
    accumulator, 64 unsigned bytes, 64 signed bytes), in its LLVM 14-era form (vectors
    of i32), which newer LLVMs upgrade."""
    from llvmlite import ir
    from numba.core import cgutils

    lanes = ir.VectorType(ir.IntType(32), 16)
    return cgutils.get_or_insert_function(builder.module, ir.FunctionType(lanes, [lanes] * 3),
                                          "llvm.x86.avx512.vpdpbusd.512")


def _tile_intrinsic() -> Any:
    """``tile(a, ia, stride, w, iw, groups, out)``: out[r * 64 + c] (int32, r < 4, c < 64)
    = sum over g < groups of the 4 unsigned bytes a[ia + r * stride + 4g ..] times the
    4 signed bytes w[iw + g * 256 + 4c ..]."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    i32 = ir.IntType(32)
    lanes = ir.VectorType(i32, 16)
    vectors = TILE_COLUMNS // 16

    @intrinsic
    def tile(typingctx, a, ia, stride, w, iw, groups, out):  # pragma: no cover - codegen
        def codegen(context, builder, signature, args):
            a_data = context.make_array(signature.args[0])(context, builder, args[0]).data
            w_data = context.make_array(signature.args[3])(context, builder, args[3]).data
            out_data = context.make_array(signature.args[6])(context, builder, args[6]).data
            a_start, a_stride, w_start = args[1], args[2], args[4]
            dot = dot_instruction(builder)
            index_type = a_start.type

            def out_vector(r: int, v: int) -> Any:
                at = ir.Constant(index_type, r * TILE_COLUMNS + v * 16)
                return builder.bitcast(builder.gep(out_data, [at]), lanes.as_pointer())

            accumulators = [
                cgutils.alloca_once_value(builder, builder.load(out_vector(r, v), align=4))
                for r in range(TILE_ROWS) for v in range(vectors)]
            with cgutils.for_range(builder, args[5]) as loop:
                g = loop.index
                weights = []
                for v in range(vectors):
                    at = builder.add(w_start, builder.add(
                        builder.mul(g, ir.Constant(index_type, GROUP * TILE_COLUMNS)),
                        ir.Constant(index_type, v * 64)))
                    pointer = builder.bitcast(builder.gep(w_data, [at]), lanes.as_pointer())
                    weights.append(builder.load(pointer, align=1))
                for r in range(TILE_ROWS):
                    at = builder.add(builder.add(a_start, builder.mul(
                        ir.Constant(index_type, r), a_stride)),
                        builder.mul(g, ir.Constant(index_type, GROUP)))
                    word = builder.load(builder.bitcast(builder.gep(a_data, [at]),
                                                        i32.as_pointer()), align=1)
                    splat = builder.insert_element(ir.Constant(lanes, None), word,
                                                   ir.Constant(i32, 0))
                    splat = builder.shuffle_vector(
                        splat, splat, ir.Constant(ir.VectorType(i32, 16), [0] * 16))
                    for v in range(vectors):
                        slot = accumulators[r * vectors + v]
                        builder.store(builder.call(
                            dot, [builder.load(slot), splat, weights[v]]), slot)
            for r in range(TILE_ROWS):
                for v in range(vectors):
                    builder.store(builder.load(accumulators[r * vectors + v]),
                                  out_vector(r, v), align=4)
            return context.get_dummy_value()

        return types.void(a, ia, stride, w, iw, groups, out), codegen

    return tile


@functools.cache
def kernel(parallel: bool = True) -> Any:
    """The compiled ``rows(q, packed, compensation, out)``: out = q @ w exactly, for q
    int8 [M, K] (|q| <= 127), (packed, compensation) from :func:`pack`, out int32 [M, N].
    ``parallel=False`` runs on the calling thread (``--threads 1``)."""
    import types

    import numba

    global _tile
    _tile = _tile_intrinsic()  # a module global, not a closure cell: see _compile
    rows_per_tile, columns, chunk_groups = TILE_ROWS, TILE_COLUMNS, CHUNK_GROUPS
    few_blocks = FEW_BLOCKS

    def rows(q, packed, compensation, out):  # pragma: no cover - compiled
        count, inner = q.shape
        outputs = out.shape[1]
        blocks, groups = packed.shape[0], packed.shape[1]
        stride = groups * GROUP
        row_tiles = -(-count // rows_per_tile)
        # q + 128 as unsigned bytes (XOR 0x80), zero past the inner dimension and the rows
        shifted = np.zeros((row_tiles * rows_per_tile, stride), dtype=np.uint8)
        for r in range(count):
            source, target = q[r].view(np.uint8), shifted[r]  # rows as 1-D views: vectorized
            for k in range(inner):
                target[k] = source[k] ^ np.uint8(0x80)
        flat_a = shifted.reshape(-1)
        flat_w = packed.reshape(-1)
        block_bytes = groups * GROUP * columns
        tile_size = rows_per_tile * columns
        # tasks: a block of columns for a share of the row tiles (two shares when there
        # are few blocks, so that 9 blocks do not leave one thread a block short)
        shares = 2 if blocks < few_blocks and row_tiles > 1 else 1
        per_share = -(-row_tiles // shares)
        for task in numba.prange(blocks * shares):
            block = task // shares
            tiles_begin = (task % shares) * per_share
            tiles_end = min(row_tiles, tiles_begin + per_share)
            sums = np.zeros(per_share * tile_size, dtype=np.int32)
            # a chunk of the block's inner groups (8 KB) serves every tile of rows from L1
            for begin in range(0, groups, chunk_groups):
                size = min(chunk_groups, groups - begin)
                for tile in range(tiles_begin, tiles_end):
                    _tile(flat_a, tile * rows_per_tile * stride + begin * GROUP, stride,
                          flat_w, block * block_bytes + begin * GROUP * columns, size,
                          sums[(tile - tiles_begin) * tile_size:])
            last_column = min(columns, outputs - block * columns)
            offsets = compensation[block * columns:block * columns + last_column]
            for r in range(tiles_begin * rows_per_tile, min(count, tiles_end * rows_per_tile)):
                target = out[r, block * columns:]
                tile_row = sums[(r - tiles_begin * rows_per_tile) * columns:]
                for c in range(last_column):
                    target[c] = tile_row[c] - offsets[c]

    # one copy per flavour, named apart, so numba's disk cache keeps both
    flavour = types.FunctionType(rows.__code__, rows.__globals__, rows.__name__,
                                 rows.__defaults__, rows.__closure__)
    flavour.__qualname__ = f"rows_{'parallel' if parallel else 'serial'}"
    return numba.njit(parallel=parallel, fastmath=False, error_model="numpy", nogil=True,
                      cache=True)(flavour)


_tile: Any = None
