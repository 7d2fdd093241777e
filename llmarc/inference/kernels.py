"""The integer engines' compiled CPU kernels: numba functions and LLVM IR intrinsics
(llvmlite) that compute the operations of spec/llm-codec.md §5 in its order, bit for bit
the torch ops of :mod:`llmarc.inference.integer_torch`, one row at a time and in cache.

:func:`_kernels` hands out the compiled set (a serial and a multi-threaded flavour, the
same values); the intrinsics :func:`_int8_dot_blocks`, :func:`_pair_dots` and
:func:`_quad_dots` are the exact integer dot products inside them.  The kernels take
NumPy arrays; of the engine they know only the spec's numbers
(:mod:`llmarc.inference.constants`) and whether this CPU has VNNI
(:mod:`llmarc.inference.vnni`), never the model or the stepper that call them: each
kernel states the layout it expects.
"""

from __future__ import annotations

import functools
import threading
from typing import Any

from llmarc.entropy.quantize import LOG2E_SCALED, WEIGHTS
from llmarc.errors import ModelError
from llmarc.inference import vnni
from llmarc.inference.constants import (
    EXP_ONE,
    LINEAR_LEVELS,
    MAX_EXP_INDEX,
    NORM_BITS,
    RESIDUAL_BITS,
)
from llmarc.inference.threads import set_openmp_waiting, thread_count

# ---------------------------------------------------------------------- fused kernels
# The attention of one query row and the SwiGLU product with its quantizer, compiled with
# numba (fastmath off: no FMA contraction, no reassociation; LLVM keeps every binary64
# operation as written).  They compute exactly the operations of spec/llm-codec.md §5 in
# its order, one row at a time and in cache, instead of a dozen passes over [heads, T, T]
# tensors.  Integer sums (q.k, u.v, the exponential weights) are int64: exact, so their
# order is free and LLVM may vectorize them.  What keeps a loop from vectorizing, and
# how it is avoided without changing a value:
# * numba's Python error model tests every float divisor for zero (to raise
#   ZeroDivisionError), a branch per element: error_model="numpy" (no divisor here can
#   be zero: each is a peak > 0, 2^31 + w, a weight sum >= 2^31 or a count);
# * a lookup in the exponential table (LLVM emits no gathers here, and a hand-written
#   vpgatherqq was 2x slower than scalar loads): it gets a loop of its own, the arithmetic
#   around it goes in loops without one, and its index is cast to unsigned (a signed one
#   costs a test and a select per element for NumPy's negative indexes);
# * a float max (not reorderable without fast-math): the max of the int64 bit patterns,
#   whose order is the numbers' (_peak, _top).
_NUMBA: Any = None
#: Guards what is made once on first use (the kernels, VNNI's packed weights) when several
#: threads step at once (:mod:`llmarc.inference.threads`).
_LAZY = threading.RLock()
_pairs: Any = None  # the intrinsics and helpers of _compile
_listed_pairs: Any = None
_dot8: Any = None
_peak: Any = None
_top: Any = None
_weigh: Any = None
_norm_row: Any = None


#: Below this many elements of work a kernel runs on the calling thread: waking worker
#: threads costs more than it saves (milliseconds on a busy machine).
PARALLEL_WORK = 1 << 16


def start_threading_layer() -> None:
    """Start numba's OpenMP threading layer now, before the process sets its thread count.

    Starting it sets OpenMP's thread count, torch's included where torch is loaded, to
    every CPU: started lazily by the first parallel kernel, it silently undid
    ``--threads 1`` (two workers ran).  Without numba there is nothing to start."""
    set_openmp_waiting()
    try:
        import numba
    except ImportError:  # pragma: no cover - numba is in the llm extra
        return
    numba.get_num_threads()


def _kernels(work: int = PARALLEL_WORK) -> Any:
    """The compiled kernels (compiled on first use, cached on disk by numba): the
    multi-threaded flavour for ``work`` elements or more when this thread may use
    several (:func:`llmarc.inference.threads.thread_count`), else the single-threaded
    one.  Both compute the same values (rows are independent)."""
    global _NUMBA
    if _NUMBA is None:  # the lock only until they exist: this runs per kernel call
        with _LAZY:
            if _NUMBA is None:
                set_openmp_waiting()  # before a parallel kernel loads the OpenMP runtime
                try:
                    import numba
                except ImportError as exc:  # pragma: no cover - numba is in the llm extra
                    raise ModelError("int-v1/v2 need numba: pip install 'numba>=0.61'") from exc
                _NUMBA = _compile(numba)
    serial, parallel = _NUMBA
    if work < PARALLEL_WORK:
        return serial
    threads = min(thread_count(), parallel.numba.config.NUMBA_NUM_THREADS)
    if threads <= 1:
        return serial
    if parallel.numba.get_num_threads() != threads:
        parallel.numba.set_num_threads(threads)
    return parallel


#: int8 products per vector step of the few-rows kernel (:func:`_int8_dot_blocks`).
DOT_BLOCK = 32
#: Query rows per task of the prefill's ``causal_weights`` (their scratch is allocated
#: once): enough tasks to balance two threads even for one segment's 9 heads.
CAUSAL_ROWS_PER_TASK = 16
#: Tasks of the stepping kernel's parallel loop (each a run of (row, key head) pairs
#: sharing scratch arrays): a few per thread, not one allocation set per pair.
STEP_CHUNKS = 16
#: Results per call of :func:`_pair_dots`: the stepping kernel's caches are laid
#: out in tiles of this many keys (q.k) and value columns (u.v).
PAIR_LANES = 16


@functools.cache
def _int8_dot_blocks() -> Any:
    """A numba intrinsic: the exact sum of ``32 * blocks`` int8 x int8 products (int32).

    Written in LLVM IR because numba's own code for this loop widens every product
    (one multiply-add per cycle).  The IR says what is exact and nothing more: products
    as int32, adjacent pairs added (each pair below 2^15), summed in a vector of int32
    (a row of up to 2^17 products stays below 2^31), reduced once at the end.  LLVM maps
    the pair step to ``vpmaddwd`` where the CPU has it and to plain integer ops
    elsewhere; integer arithmetic has one answer on every target."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    lanes = DOT_BLOCK
    i8, i32 = ir.IntType(8), ir.IntType(32)
    half = ir.VectorType(i32, lanes // 2)
    reduce_type = ir.FunctionType(i32, [half])

    @intrinsic
    def dot_blocks(typingctx, a, ia, b, ib, blocks):  # pragma: no cover - code generation
        def codegen(context, builder, signature, args):
            a_data = context.make_array(signature.args[0])(context, builder, args[0]).data
            b_data = context.make_array(signature.args[2])(context, builder, args[2]).data

            def load(data, index):
                pointer = builder.bitcast(builder.gep(data, [index]),
                                          ir.VectorType(i8, lanes).as_pointer())
                return builder.sext(builder.load(pointer, align=1), ir.VectorType(i32, lanes))

            accumulator = cgutils.alloca_once_value(builder, ir.Constant(half, None))
            with cgutils.for_range(builder, args[4]) as loop:
                offset = builder.mul(loop.index, ir.Constant(loop.index.type, lanes))
                products = builder.mul(load(a_data, builder.add(args[1], offset)),
                                       load(b_data, builder.add(args[3], offset)))
                builder.store(builder.add(builder.load(accumulator),
                                          _pair_sums(builder, products, lanes)), accumulator)
            reduce = cgutils.get_or_insert_function(
                builder.module, reduce_type, f"llvm.vector.reduce.add.v{lanes // 2}i32")
            return builder.call(reduce, [builder.load(accumulator)])

        return types.int32(a, ia, b, ib, blocks), codegen

    return dot_blocks


@functools.cache
def _pair_dots(listed: bool = False) -> Any:
    """A numba intrinsic: 16 exact dot products of int16 (int-v1) or int8 (int-v2)
    vectors at once, as int64, into ``out``.

    ``pair_dots(a, ia, w, iw, steps, stride, out, io)``: for lane i < 16,
    ``out[io + i] = sum over s < steps of a[ia+2s] * w[iw+s*stride+2i]
    + a[ia+2s+1] * w[iw+s*stride+2i+1]``.  The pair of ``a`` is broadcast to every lane;
    ``w`` holds, per step, 16 lanes of two interleaved integers.  The stepping kernel
    lays its caches out so that one call is q.k for 16 keys (steps along the head's
    width) or u.v for 16 value columns (steps along the keys): no per-result reduction,
    which cost more than the products for 64-wide heads.  int16: each pair sum is below
    2^31 (|a|, |w| <= 32767), widened to int64 and summed: exact for any count.  int8:
    pair sums below 2^15 add up in int32 (exact below 65,536 steps: the stepper makes at
    most 32,768, half the longest segment) and widen once.  LLVM maps the pair step to
    ``vpmaddwd`` where the CPU has it; integer arithmetic has one answer on every target.

    ``listed``: ``pair_dots(a, ia, w, iw, at, first, count, stride, out, io)`` sums over
    the steps ``at[first : first + count]`` only: u.v over the key pairs whose two
    weights are not both zero (the others add nothing), which skips their rows of the
    value cache: at int-v2's 127 levels about 70 % of them at position 500 (SmolLM2)."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    lanes = PAIR_LANES
    i32, i64 = ir.IntType(32), ir.IntType(64)
    wide = ir.VectorType(i32, 2 * lanes)
    sums_type = ir.VectorType(i64, lanes)

    def emit(context, builder, signature, args, bits, count, step_of):  # pragma: no cover
        words = ir.VectorType(ir.IntType(bits), 2 * lanes)
        pairs_type = ir.VectorType(ir.IntType(2 * bits), lanes)
        partial_type = ir.VectorType(i32 if bits == 8 else i64, lanes)
        a_data = context.make_array(signature.args[0])(context, builder, args[0]).data
        w_data = context.make_array(signature.args[2])(context, builder, args[2]).data
        out_data = context.make_array(signature.args[-2])(context, builder, args[-2]).data
        stride = args[-3]
        accumulator = cgutils.alloca_once_value(builder, ir.Constant(partial_type, None))
        with cgutils.for_range(builder, count) as loop:
            step = step_of(loop.index)
            at = builder.add(args[1], builder.mul(step, ir.Constant(step.type, 2)))
            pair = builder.load(builder.bitcast(builder.gep(a_data, [at]),
                                                pairs_type.element.as_pointer()),
                                align=bits // 8)
            splat = builder.insert_element(ir.Constant(pairs_type, None), pair,
                                           ir.Constant(i32, 0))
            splat = builder.shuffle_vector(splat, splat,
                                           ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))
            broadcast = builder.sext(builder.bitcast(splat, words), wide)
            row = builder.gep(w_data, [builder.add(args[3], builder.mul(step, stride))])
            loaded = builder.sext(builder.load(builder.bitcast(row, words.as_pointer()),
                                               align=bits // 8), wide)
            sums = _pair_sums(builder, builder.mul(broadcast, loaded), 2 * lanes)
            if bits == 16:
                sums = builder.sext(sums, sums_type)
            builder.store(builder.add(builder.load(accumulator), sums), accumulator)
        total = builder.load(accumulator)
        if bits == 8:
            total = builder.sext(total, sums_type)
        target = builder.bitcast(builder.gep(out_data, [args[-1]]), sums_type.as_pointer())
        builder.store(total, target, align=8)
        return context.get_dummy_value()

    if not listed:
        @intrinsic
        def pair_dots(typingctx, a, ia, w, iw, steps, stride, out,
                      io):  # pragma: no cover - code generation
            def codegen(context, builder, signature, args):
                return emit(context, builder, signature, args, a.dtype.bitwidth, args[4],
                            lambda index: index)

            return types.void(a, ia, w, iw, steps, stride, out, io), codegen

        return pair_dots

    @intrinsic
    def listed_pair_dots(typingctx, a, ia, w, iw, at, first, count, stride, out,
                         io):  # pragma: no cover - code generation
        def codegen(context, builder, signature, args):
            at_data = context.make_array(signature.args[4])(context, builder, args[4]).data

            def step_of(index):  # at is int64
                return builder.load(builder.gep(at_data, [builder.add(args[5], index)]))

            return emit(context, builder, signature, args, a.dtype.bitwidth, args[6], step_of)

        return types.void(a, ia, w, iw, at, first, count, stride, out, io), codegen

    return listed_pair_dots


@functools.cache
def _quad_dots(vnni_instructions: bool) -> Any:
    """A numba intrinsic: int-v2's q.k for 16 keys at once, 4 columns per step.

    ``quad_dots(a, ia, w, iw, steps, stride, out, io)``: for lane i < 16, ``out[io + i] =
    sum over s < steps, j < 4 of a[ia+4s+j] * w[iw+s*stride+4i+j]`` (int64), where ``a``
    holds int8 queries and ``w`` the keys offset to unsigned bytes (k + 128): the sum is
    q.k + 128 * sum(q), and the caller takes the second term back.  With
    ``vnni_instructions`` (a CPU with AVX-512 VNNI) one ``vpdpbusd`` is a step (64
    products; it wraps, never saturates; every int32 sum is below 255 * 127 * Dh);
    without, the same integers are multiplied and added in int32 by plain vector ops.
    int-v1's operand types (int16) compile to the plain form in int64: numba compiles
    both branches of the stepping kernel, which never calls this one with them."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    lanes = PAIR_LANES
    i32, i64 = ir.IntType(32), ir.IntType(64)

    @intrinsic
    def quad_dots(typingctx, a, ia, w, iw, steps, stride, out,
                  io):  # pragma: no cover - code generation
        a_bits, w_bits = a.dtype.bitwidth, w.dtype.bitwidth
        bytes_only = a_bits == 8 and w_bits == 8 and not w.dtype.signed
        use_vnni = bytes_only and vnni_instructions

        def codegen(context, builder, signature, args):
            a_data = context.make_array(signature.args[0])(context, builder, args[0]).data
            w_data = context.make_array(signature.args[2])(context, builder, args[2]).data
            out_data = context.make_array(signature.args[6])(context, builder, args[6]).data
            sum_type = i32 if bytes_only else i64
            partial_type = ir.VectorType(sum_type, lanes)
            quad = ir.IntType(4 * a_bits)
            accumulator = cgutils.alloca_once_value(builder, ir.Constant(partial_type, None))
            with cgutils.for_range(builder, args[4]) as loop:
                step = loop.index
                at = builder.add(args[1], builder.mul(step, ir.Constant(step.type, 4)))
                word = builder.load(builder.bitcast(builder.gep(a_data, [at]),
                                                    quad.as_pointer()), align=1)
                splat = builder.insert_element(ir.Constant(ir.VectorType(quad, lanes), None),
                                               word, ir.Constant(i32, 0))
                splat = builder.shuffle_vector(
                    splat, splat, ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))
                row = builder.gep(w_data, [builder.add(args[3], builder.mul(step, args[5]))])
                keys = builder.load(builder.bitcast(
                    row, ir.VectorType(ir.IntType(w_bits), 4 * lanes).as_pointer()), align=1)
                total = builder.load(accumulator)
                if use_vnni:
                    vector = ir.VectorType(i32, lanes)
                    total = builder.call(vnni.dot_instruction(builder), [
                        total, builder.bitcast(keys, vector), builder.bitcast(splat, vector)])
                else:
                    wide = ir.VectorType(sum_type, 4 * lanes)
                    queries = builder.sext(builder.bitcast(
                        splat, ir.VectorType(ir.IntType(a_bits), 4 * lanes)), wide)
                    extend = builder.sext if w.dtype.signed else builder.zext
                    products = builder.mul(queries, extend(keys, wide))
                    total = builder.add(total, _pair_sums(
                        builder, _pair_sums(builder, products, 4 * lanes), 2 * lanes))
                builder.store(total, accumulator)
            total = builder.load(accumulator)
            if bytes_only:
                total = builder.sext(total, ir.VectorType(i64, lanes))
            target = builder.bitcast(builder.gep(out_data, [args[7]]),
                                     ir.VectorType(i64, lanes).as_pointer())
            builder.store(total, target, align=8)
            return context.get_dummy_value()

        return types.void(a, ia, w, iw, steps, stride, out, io), codegen

    return quad_dots


def _pair_sums(builder: Any, products: Any, lanes: int) -> Any:
    """Adjacent lanes of ``products`` (``lanes`` of int32) added: the ``vpmaddwd`` shape."""
    from llvmlite import ir

    half = ir.VectorType(ir.IntType(32), lanes // 2)
    even = ir.Constant(half, list(range(0, lanes, 2)))
    odd = ir.Constant(half, list(range(1, lanes, 2)))
    return builder.add(builder.shuffle_vector(products, products, even),
                       builder.shuffle_vector(products, products, odd))


def _compile(numba: Any) -> Any:
    import math
    import types

    import numpy as np

    log2e_scaled = float(LOG2E_SCALED)
    max_index = MAX_EXP_INDEX
    linear_levels = float(LINEAR_LEVELS)
    one = EXP_ONE
    residual_one = float(1 << RESIDUAL_BITS)
    residual_down = 2.0**-RESIDUAL_BITS
    residual_bits = RESIDUAL_BITS
    norm_bits = NORM_BITS
    magnitude = (1 << 63) - 1  # every bit of a double but its sign

    # The intrinsics and helpers are module globals, not closure cells: numba keys its
    # disk cache on a hash of a kernel's closure, and they pickle differently in every
    # process, so as cells they forced a recompilation (seconds) in every process.
    global _pairs, _quads, _listed_pairs, _dot8, _peak, _top, _weigh, _norm_row
    _pairs, _quads = _pair_dots(), _quad_dots(vnni.available())
    _listed_pairs, _dot8 = _pair_dots(listed=True), _int8_dot_blocks()
    block = DOT_BLOCK
    lanes = PAIR_LANES
    rows_per_task = CAUSAL_ROWS_PER_TASK
    step_chunks = STEP_CHUNKS

    def int8_rows(q, weight, out):  # pragma: no cover
        # out[r, o] = sum_i q[r, i] * weight[o, i]: q int8 [M, in], weight int8 [out, in]
        # (in a multiple of DOT_BLOCK), out int32 [M, out]; exact in int32 (|sum| <=
        # 127^2 * in < 2^31); each weight row is read once for the M rows
        rows, inner = q.shape
        blocks = inner // block
        for o in numba.prange(weight.shape[0]):
            for r in range(rows):
                out[r, o] = _dot8(q, r * inner, weight, o * inner, blocks)

    helper = numba.njit(fastmath=False, error_model="numpy", nogil=True, cache=True)

    @helper
    def peak_of(values):  # pragma: no cover
        # max |v| of a float64 vector without NaN, as the largest bit pattern of |v|: for
        # non-negative doubles the order of the int64 patterns is the numeric order, and
        # an integer max vectorizes where a float one (without fast-math) does not
        bits = values.view(np.int64)
        top = 0
        for i in range(bits.shape[0]):
            top = max(top, bits[i] & magnitude)
        box = np.empty(1, dtype=np.int64)
        box[0] = top
        return box.view(np.float64)[0]

    @helper
    def top_of(values):  # pragma: no cover
        # max v of a float64 vector without NaN, the same way: flipping the magnitude
        # bits of the negative ones orders all patterns as their values (-0 below +0,
        # which only the sign of a zero maximum can tell apart: z - top, the sole use,
        # then differs at most in the sign of a zero, which floor and EXP ignore)
        bits = values.view(np.int64)
        top = -(1 << 63)
        for i in range(bits.shape[0]):
            b = bits[i]
            top = max(top, b ^ ((b >> 63) & magnitude))
        box = np.empty(1, dtype=np.int64)
        box[0] = top ^ ((top >> 63) & magnitude)
        return box.view(np.float64)[0]

    @helper
    def weigh(z, count, top, v_scale, table, index):  # pragma: no cover
        # z[k] <- p_k = WEIGHTS[min(-floor((z_k - top) * K), 10240)] * v_scale[k] for
        # k < count; returns (sum of the weights as an integer, max p).  The exponents
        # are found in a pass of their own (``index``, int64 scratch): without the table
        # lookup it vectorizes.
        for k in range(count):
            index[k] = np.int64(min(-np.floor((z[k] - top) * log2e_scaled), max_index))
        total = 0
        for k in range(count):
            w = table[np.uint64(index[k])]  # unsigned: no test for a negative index
            total += w
            z[k] = np.float64(w) * v_scale[k]
        return total, _peak(z[:count])

    @helper
    def norm_row(h, weight, eps, q_out):  # pragma: no cover
        # RMSNorm(h) * weight of one row quantized to +-127 into q_out; returns its scale
        cols = h.shape[0]
        exponent = math.frexp(_peak(h))[1]
        shift = exponent - norm_bits
        if shift < 0:
            shift = 0
        down = math.ldexp(1.0, -shift)  # 2^-shift, exact
        squares = 0
        for c in range(cols):
            v = np.int64(np.floor(h[c] * down))
            squares += v * v
        mean = (np.float64(squares) * math.ldexp(1.0, 2 * shift - 2 * residual_bits)) \
            / np.float64(cols)
        root = np.sqrt(mean + eps)
        products = np.empty(cols, dtype=np.float64)
        for c in range(cols):
            products[c] = h[c] * weight[c]
        peak = _peak(products)
        safe = peak if peak > 0.0 else 1.0
        factor = linear_levels / safe
        for c in range(cols):
            q_out[c] = np.rint(products[c] * factor)
        return ((peak / linear_levels) * residual_down) / root

    _peak, _top, _weigh, _norm_row = peak_of, top_of, weigh, norm_row

    def attend_step(qkv, scales, attention_scale, keys, k_scale, values, v_scale, t,
                    table, levels, context):  # pragma: no cover
        # Position t of every row: qkv [N, H + 2 Hkv, Dh] (queries, keys, values of the
        # position, quantized to +-levels: int16 or int8, the caches' type) and their
        # scales f64 [N, H + 2 Hkv].  The key and value are stored in the caches first,
        # tiled (Dp: Dh rounded up to 16, L' the length rounded up to 16, padding zero):
        # int16 keys [N, Hkv, L'/16, Dp/2, 16, 2] for _pairs (key t, column d at [t/16,
        # d/2, t%16, d%2]: a tile is q.k for 16 keys), or int8 keys offset to unsigned
        # bytes (k + 128) [N, Hkv, L'/16, Dp/4, 16, 4] for _quads; values [N, Hkv, L'/2, Dp, 2]
        # (value t, column d at [t/2, d, t%2]: a run of 16 columns is u.v for them),
        # scales f64 [N, Hkv, L].  Then the query sees keys 0 .. t; context f64 [N, H *
        # Dh].  One (row, key head) at a time: its keys and values stay in cache for the
        # heads sharing them.  u.v runs over the key pairs with a weight that is not 0,
        # as whole pairs (u is zero past the visible keys; a padding value's product is 0).
        n_rows, columns, dh = qkv.shape
        kv_heads = keys.shape[1]
        per = keys.shape[5]  # columns of a key side by side: 2 (_pairs) or 4 (_quads)
        key_offset = 128 if per == 4 else 0
        padded = keys.shape[3] * per
        heads = columns - 2 * kv_heads
        group = heads // kv_heads
        count = t + 1
        tiles = -(-count // lanes)
        width = tiles * lanes
        steps = -(-count // 2)
        tasks = n_rows * kv_heads
        per_chunk = -(-tasks // step_chunks)  # tasks sharing one set of scratch arrays
        for chunk in numba.prange(-(-tasks // per_chunk)):
            # scratch; its zeros past a head's width and past the visible keys are never
            # overwritten, so every task of the chunk sees them
            queries = np.zeros(group * padded, dtype=values.dtype)
            offsets = np.empty(group, dtype=np.int64)  # key_offset * sum(q): _quads' excess
            sums = np.empty(group * width, dtype=np.int64)
            u = np.zeros(group * width, dtype=values.dtype)
            z = np.empty(count, dtype=np.float64)
            index = np.empty(count, dtype=np.int64)
            p_scale = np.empty(group, dtype=np.float64)
            weight_sum = np.empty(group, dtype=np.float64)
            c = np.empty(group * padded, dtype=np.int64)
            pairs = np.empty(group * steps, dtype=np.int64)  # the key pairs u.v runs over
            listed = np.empty(group, dtype=np.int64)
            for r in range(chunk * per_chunk, min(tasks, (chunk + 1) * per_chunk)):
                n = r // kv_heads
                kv = r % kv_heads
                for d in range(dh):
                    keys[n, kv, t // lanes, d // per, t % lanes, d % per] = \
                        qkv[n, heads + kv, d] + key_offset
                    values[n, kv, t // 2, d, t % 2] = qkv[n, heads + kv_heads + kv, d]
                k_scale[n, kv, t] = scales[n, heads + kv]
                v_scale[n, kv, t] = scales[n, heads + kv_heads + kv]
                key_tiles = keys[n, kv].reshape(-1)
                value_pairs = values[n, kv].reshape(-1)
                ks = k_scale[n, kv]
                for g in range(group):
                    query_sum = 0
                    for d in range(dh):
                        queries[g * padded + d] = qkv[n, kv * group + g, d]
                        query_sum += qkv[n, kv * group + g, d]
                    offsets[g] = key_offset * query_sum
                for tile in range(tiles):  # a tile of keys serves every head of the group
                    for g in range(group):
                        if per == 4:
                            _quads(queries, g * padded, key_tiles, tile * lanes * padded,
                                   padded // 4, 4 * lanes, sums, g * width + tile * lanes)
                        else:
                            _pairs(queries, g * padded, key_tiles, tile * lanes * padded,
                                   padded // 2, 2 * lanes, sums, g * width + tile * lanes)
                for g in range(group):
                    # views of this head's scratch: loops over them index from 0, which
                    # numba knows is not negative, so they vectorize as plain loads
                    head_sums = sums[g * width:(g + 1) * width]
                    head_u = u[g * width:(g + 1) * width]
                    head_pairs = pairs[g * steps:(g + 1) * steps]
                    q_scale = scales[n, kv * group + g] * attention_scale
                    for k in range(count):
                        z[k] = np.float64(head_sums[k] - offsets[g]) * (q_scale * ks[k])
                    total, peak = _weigh(z, count, _top(z), v_scale[n, kv], table, index)
                    safe = peak if peak > 0.0 else 1.0
                    factor = levels / safe
                    p_scale[g] = peak / levels
                    weight_sum[g] = np.float64(total)
                    for k in range(count):
                        head_u[k] = np.rint(z[k] * factor)
                    found = 0  # the pairs with a weight that is not 0 (without branches)
                    for s in range(steps):
                        head_pairs[found] = s
                        found += (head_u[2 * s] != 0) | (head_u[2 * s + 1] != 0)
                    listed[g] = found
                for run in range(padded // lanes):  # u.v for 16 columns of every head
                    for g in range(group):
                        _listed_pairs(u, g * width, value_pairs, run * 2 * lanes, pairs,
                                      g * steps, listed[g], 2 * padded, c,
                                      g * padded + run * lanes)
                for g in range(group):
                    head_c = c[g * padded:g * padded + dh]
                    head_context = context[n, (kv * group + g) * dh:(kv * group + g + 1) * dh]
                    for d in range(dh):
                        head_context[d] = (np.float64(head_c[d]) * p_scale[g]) / weight_sum[g]

    def causal_weights(scores, q_scale, k_scale, v_scale, first, table, levels, u_out,
                       p_scale, weight_sum):  # pragma: no cover
        # scores [N, Hkv, g, T, K] (f64 or int32): the exact q.k sums of queries first ..
        # first+T-1 (query j sees keys 0 .. first + j); u_out [N, Hkv, g, T, K] (f64 or
        # int8; may be scores itself): the weights quantized to +-levels (0 where a key
        # is not visible); q_scale f64 [N, Hkv, g, T] (times 1/sqrt(Dh)), k_scale,
        # v_scale f64 [N, Hkv, L]; p_scale, weight_sum f64 [N, Hkv, g, T].  The
        # operations of attend, in its order, for one query row each.
        # Tasks of ROWS_PER_TASK query rows share their scratch (one allocation each).
        n_rows, kv_heads, group, t_rows, width = scores.shape
        chunks = -(-t_rows // rows_per_task)
        for r in numba.prange(n_rows * kv_heads * group * chunks):
            n = r // (kv_heads * group * chunks)
            kv = (r // (group * chunks)) % kv_heads
            g = (r // chunks) % group
            begin = (r % chunks) * rows_per_task
            z = np.empty(width, dtype=np.float64)
            index = np.empty(width, dtype=np.int64)
            ks = k_scale[n, kv]
            for j in range(begin, min(begin + rows_per_task, t_rows)):
                count = first + j + 1
                qs = q_scale[n, kv, g, j]
                row = scores[n, kv, g, j]
                for k in range(count):
                    z[k] = np.float64(row[k]) * (qs * ks[k])
                total, peak = _weigh(z, count, _top(z[:count]), v_scale[n, kv], table, index)
                safe = peak if peak > 0.0 else 1.0
                factor = levels / safe
                u = u_out[n, kv, g, j]
                for k in range(count):
                    u[k] = np.rint(z[k] * factor)
                for k in range(count, width):
                    u[k] = 0
                p_scale[n, kv, g, j] = peak / levels
                weight_sum[n, kv, g, j] = np.float64(total)

    def swiglu_quantize(acc, row_scale, col_scale, table, q_out, scale_out):  # pragma: no cover
        # acc [R, 2I]: the fused gate/up projection's integer sums (any dtype); gate and
        # up are acc * (row_scale * col_scale); silu(gate) * up quantized per row:
        # q_out [R, I] int8/f32, scale_out f64 [R].  The table lookup has a pass of its
        # own, so that the others vectorize (2.4x the single loop, measured).
        rows = acc.shape[0]
        width = acc.shape[1] // 2
        gate_scale, up_scale = col_scale[:width], col_scale[width:]
        for r in numba.prange(rows):
            s = row_scale[r]
            gate_acc, up_acc = acc[r, :width], acc[r, width:]  # views: see attend_step
            gate = np.empty(width, dtype=np.float64)
            index = np.empty(width, dtype=np.int64)
            products = np.empty(width, dtype=np.float64)
            for i in range(width):
                x = np.float64(gate_acc[i]) * (s * gate_scale[i])
                gate[i] = x
                index[i] = np.int64(min(np.floor(np.abs(x) * log2e_scaled), max_index))
            for i in range(width):
                products[i] = np.float64(table[np.uint64(index[i])])
            for i in range(width):
                x = gate[i]
                w = products[i]
                up = np.float64(up_acc[i]) * (s * up_scale[i])
                numerator = one if x >= 0.0 else w
                products[i] = (x * (numerator / (w + one))) * up
            peak = _peak(products)
            safe = peak if peak > 0.0 else 1.0
            factor = linear_levels / safe
            for i in range(width):
                q_out[r, i] = np.rint(products[i] * factor)
            scale_out[r] = peak / linear_levels

    def scaled(acc, row_scale, col_scale, out):  # pragma: no cover
        # out[r, c] = acc[r, c] * (row_scale[r] * col_scale[c]), rounded to out's dtype
        rows, cols = acc.shape
        for r in numba.prange(rows):
            s = row_scale[r]
            for c in range(cols):
                out[r, c] = np.float64(acc[r, c]) * (s * col_scale[c])

    def residual(acc, row_scale, col_scale, h):  # pragma: no cover
        # h[r, c] += round_half_even(acc[r, c] * (row_scale[r] * col_scale[c]) * 2^24)
        rows, cols = acc.shape
        for r in numba.prange(rows):
            s = row_scale[r]
            for c in range(cols):
                y = np.float64(acc[r, c]) * (s * col_scale[c])
                h[r, c] = h[r, c] + np.rint(y * residual_one)

    def quantize(x, levels_, q_out, scale_out):  # pragma: no cover
        # quantize_rows: x f64 [R, C] -> q_out [R, C] (any dtype), scale_out f64 [R]
        rows, cols = x.shape
        for r in numba.prange(rows):
            peak = _peak(x[r])
            safe = peak if peak > 0.0 else 1.0
            factor = levels_ / safe
            for c in range(cols):
                q_out[r, c] = np.rint(x[r, c] * factor)
            scale_out[r] = peak / levels_

    def norm_quantize(h, weight, eps, q_out, scale_out):  # pragma: no cover
        # norm_quantized: RMSNorm(h) * weight quantized per row; q_out int8/f32, scale_out f64
        for r in numba.prange(h.shape[0]):
            scale_out[r] = _norm_row(h[r], weight, eps, q_out[r])

    def residual_norm(acc, row_scale, col_scale, h, weight, eps, q_out,
                      scale_out):  # pragma: no cover
        # h[r, c] += round_half_even(acc[r, c] * (row_scale[r] * col_scale[c]) * 2^24),
        # then norm_quantize of the new row (row_scale is read before scale_out is
        # written: they may be one buffer)
        rows, cols = h.shape
        for r in numba.prange(rows):
            s = row_scale[r]
            for c in range(cols):
                y = np.float64(acc[r, c]) * (s * col_scale[c])
                h[r, c] = h[r, c] + np.rint(y * residual_one)
            scale_out[r] = _norm_row(h[r], weight, eps, q_out[r])

    def qkv_rope(acc, row_scale, col_scale, positions, cos, sin, rotated, levels, q_out,
                 scale_out):  # pragma: no cover
        # acc [R, heads * Dh]: the fused q/k/v projection's integer sums (any dtype); the
        # values acc * (row_scale * col_scale), the first ``rotated`` heads rotated at
        # positions[R], each head quantized to +-levels: q_out int16/int8 [R, heads, Dh],
        # scale_out f64 [R, heads]
        rows, heads, dh = q_out.shape
        half = dh // 2
        for r in numba.prange(rows):
            s = row_scale[r]
            pos = positions[r]
            x = np.empty(dh, dtype=np.float64)
            y = np.empty(dh, dtype=np.float64)
            for h in range(heads):
                head_acc = acc[r, h * dh:(h + 1) * dh]  # views: see attend_step
                head_scale = col_scale[h * dh:(h + 1) * dh]
                for i in range(dh):
                    x[i] = np.float64(head_acc[i]) * (s * head_scale[i])
                if h < rotated:
                    for i in range(half):
                        a = x[i]
                        b = x[half + i]
                        c = cos[pos, i]
                        si = sin[pos, i]
                        y[i] = a * c - b * si
                        y[half + i] = b * c + a * si
                else:
                    for i in range(dh):
                        y[i] = x[i]
                peak = _peak(y)
                safe = peak if peak > 0.0 else 1.0
                factor = levels / safe
                for i in range(dh):
                    q_out[r, h, i] = np.rint(y[i] * factor)
                scale_out[r, h] = peak / levels

    class Kernels:
        pass

    functions = (int8_rows, attend_step, causal_weights, swiglu_quantize, scaled, residual,
                 quantize, norm_quantize, residual_norm, qkv_rope)
    table = np.ascontiguousarray(WEIGHTS.astype(np.int64))
    flavours = []
    isa = "_vnni" if vnni.available() else ""
    for parallel in (False, True):
        jit = numba.njit(parallel=parallel, fastmath=False, error_model="numpy", nogil=True,
                         cache=True)
        kernels = Kernels()
        kernels.numba = numba
        kernels.parallel = parallel
        kernels.table = table
        for function in functions:
            # a copy per flavour, named apart, so numba's disk cache keeps both
            copy = types.FunctionType(function.__code__, function.__globals__,
                                      function.__name__, function.__defaults__,
                                      function.__closure__)
            # and one per VNNI choice: it is compiled into _quads, and numba's cache would
            # otherwise hand a process with LLMARC_VNNI=off the other one's code
            copy.__qualname__ = (f"{function.__qualname__}_"
                                 f"{'parallel' if parallel else 'serial'}{isa}")
            setattr(kernels, function.__name__, jit(copy))
        flavours.append(kernels)
    return tuple(flavours)
