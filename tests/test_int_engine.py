"""The portable engines int-v1 and int-v2: exact, order-free, and the same as the
spec's NumPy twin.

Their promise is that a row's logits depend on nothing but the row's tokens: not on
batch width, companions, full-forward versus step-by-step evaluation, or thread count.
These tests check that bit for bit for both engines (they differ only in the width of
the attention's integers, so in kernels and cache types), and compare against
spec/reference/int_numpy.py, a second implementation written from the spec with int64
arithmetic; and the GPU's path (the same operations as torch ops) against the CPU's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from llmarc.inference import exact_product, vnni
from llmarc.inference.exact_product import (
    FP32_EXACT_CHUNK,
    Int8Matrix,
    batched_int8_product,
    float_product,
)
from llmarc.inference.integer import ATTENTION_LEVELS, IntegerModel, derive_linear
from llmarc.inference.threads import set_thread_count, thread_count
from llmarc.model.loader import load_model

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "spec" / "reference"))
from int_numpy import IntReference  # noqa: E402

FIXTURES = ROOT / "fixtures"
MODELS = {"bpe": FIXTURES / "tiny-llama-bpe", "sp": FIXTURES / "tiny-llama-sp"}
ENGINES = sorted(ATTENTION_LEVELS)


@pytest.fixture(scope="module", params=[(m, e) for m in sorted(MODELS) for e in ENGINES],
                ids=lambda p: "-".join(p))
def model(request) -> tuple[str, str, IntegerModel]:
    name, engine = request.param
    loaded = load_model(str(MODELS[name]), device="cpu")
    return name, engine, loaded.integer_model(64, engine)


def tokens_for(seed: int, rows: int, length: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 300, (rows, length))


def step_all(engine, tokens: np.ndarray) -> np.ndarray:
    stepper = engine.stepper(tokens.shape[0], tokens.shape[1])
    return np.stack([stepper.step(tokens[:, t]).copy() for t in range(tokens.shape[1])],
                    axis=1)


def same_bits(a: np.ndarray, b: np.ndarray) -> bool:
    return a.dtype == b.dtype == np.float32 and np.array_equal(a.view(np.uint32),
                                                               b.view(np.uint32))


def test_stepping_equals_prefill_bit_for_bit(model) -> None:
    _name, _engine, engine = model
    tokens = tokens_for(1, 3, 40)
    assert same_bits(step_all(engine, tokens), engine.prefill(tokens))


def test_the_integer_model_keeps_no_view_of_the_float_weights() -> None:
    """Dropping the float model must free its storage (a memory-mapped safetensors file
    stays resident while any view of it lives)."""
    import numpy as np

    loaded = load_model(str(MODELS["bpe"]), device="cpu")
    engine = IntegerModel(loaded.derived, 16)
    def stored(linear) -> list[np.ndarray]:
        return [linear.matrix.rows] if linear.matrix.packed is None else list(
            linear.matrix.packed)

    kept = [engine.final_norm, *stored(engine.lm_head)]
    for layer in engine.layers:
        kept += [layer.input_norm, layer.post_norm]
        for linear in (layer.qkv_proj, layer.o_proj, layer.gate_up_proj, layer.down_proj):
            kept += stored(linear)
    mappings = {id(f): np.frombuffer(f._map, np.uint8)
                for f in loaded.derived.weights.files.values()}
    assert mappings
    for value in kept:
        for mapping in mappings.values():
            assert not np.shares_memory(value, mapping)


def test_a_step_writes_its_logits_into_the_steppers_workspace(model) -> None:
    """No step allocates its [width, V] logits anew; the next step overwrites them."""
    _name, _engine, engine = model
    tokens = tokens_for(2, 3, 2)
    stepper = engine.stepper(3, 2)
    first = stepper.step(tokens[:, 0])
    kept = first.copy()
    second = stepper.step(tokens[:, 1])
    assert np.shares_memory(first, second)
    assert np.array_equal(first, second) and not np.array_equal(kept, second)


@pytest.mark.parametrize("width", [1, 3, 8])
def test_a_row_is_the_same_at_any_batch_width(model, width: int) -> None:
    _name, _engine, engine = model
    tokens = tokens_for(width, width, 24)
    alone = engine.prefill(tokens[:1])
    assert same_bits(engine.prefill(tokens)[:1], alone)
    assert same_bits(step_all(engine, tokens)[:1], alone)


def test_the_torch_operations_path_gives_the_cpu_kernels_logits(model) -> None:
    """The path a GPU takes (the spec's operations as torch ops,
    :mod:`llmarc.inference.integer_torch`) against the CPU engine, both run here on the
    CPU: prefill and stepping, every logit's bits."""
    torch = pytest.importorskip("torch")
    from llmarc.inference.integer_torch import TorchIntegerModel

    name, engine_name, engine = model
    tokens = tokens_for(9, 2, 24)
    kernels = engine.prefill(tokens)
    derived = load_model(str(MODELS[name]), device="cpu").derived
    on_torch = TorchIntegerModel(derived, 64, torch.device("cpu"),
                                 ATTENTION_LEVELS[engine_name])
    assert same_bits(on_torch.prefill(tokens), kernels)
    assert same_bits(step_all(on_torch, tokens), kernels)


def test_thread_count_does_not_change_logits(model) -> None:
    _name, _engine, engine = model
    tokens = tokens_for(7, 4, 32)
    before = thread_count()
    try:
        set_thread_count(1)
        one = engine.prefill(tokens)
        set_thread_count(2)
        two = engine.prefill(tokens)
    finally:
        set_thread_count(before)
    assert same_bits(one, two)


def test_the_numpy_reference_gives_the_same_logits(model) -> None:
    name, engine_name, engine = model
    tokens = tokens_for(3, 1, 30)
    ours = engine.prefill(tokens)[0]
    theirs = IntReference(MODELS[name], max_length=64, engine=engine_name).logits(
        tokens[0].tolist())
    assert theirs.dtype == np.float32
    assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32))


def test_the_numpy_reference_agrees_on_smollm2_first_tokens() -> None:
    """The embedded model: 135M parameters, 30 layers, GQA, tied embeddings."""
    loaded = load_model("smollm2", device="cpu")
    tokens = [loaded.start_token, 504, 3135, 282, 260]
    derived = loaded.derived
    tensors = dict(derived.tensors())
    for engine in ENGINES:
        ours = loaded.integer_model(8, engine).prefill(np.array([tokens]))[0]
        theirs = IntReference(None, max_length=8, engine=engine, tensors=tensors,
                              config=derived.architecture.canonical()).logits(tokens)
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), engine


def _extreme_operands(rows: int, outputs: int, inner: int, seed: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """int8 rows q [rows, inner] and weights [outputs, inner]: random, with rows and
    weights at +-127 so that some sums reach +-127^2 * inner."""
    generator = np.random.default_rng(seed)
    q = generator.integers(-127, 128, (rows, inner)).astype(np.int8)
    weights = generator.integers(-127, 128, (outputs, inner)).astype(np.int8)
    q[0], weights[0], weights[1] = 127, 127, -127
    return q, weights


@pytest.mark.parametrize(("path", "rows", "inner"), [
    ("rows", 1, 1536), ("rows", 2, 96),
    *[(path, rows, inner) for path in ("vnni", "blas")
      for rows, inner in ((1, 1536), (5, 96), (40, 3 * 1040 + 7))]])
def test_every_product_path_is_the_exact_integer_product(monkeypatch, path: str, rows: int,
                                                         inner: int) -> None:
    """Each way :class:`Int8Matrix` multiplies (int8_rows for 1-2 rows, the VNNI tiles,
    float32 BLAS chunks) against int64 arithmetic, at sums of +-127^2 * inner: above
    2^24 for the widest, where one unchunked float32 GEMM would round."""
    if path == "vnni" and not vnni.available():
        pytest.skip("this CPU has no AVX-512 VNNI")
    q, weights = _extreme_operands(rows, 70, inner, rows + inner)
    if path != "vnni":
        monkeypatch.setattr(vnni, "available", lambda: False)
    if path == "blas":
        monkeypatch.setattr(exact_product, "SMALL_GEMM_ROWS", 0)
    matrix = Int8Matrix(weights)
    assert (matrix.packed is not None) == (path == "vnni")
    exact = q.astype(np.int64) @ weights.astype(np.int64).T
    assert abs(int(exact[0, 0])) == 127 * 127 * inner
    got = matrix.product(q)
    assert got.dtype == np.int32 and np.array_equal(got, exact)


@pytest.mark.parametrize("vnni_on", [True, False])
def test_the_attention_products_are_exact_past_two_to_the_24(monkeypatch, vnni_on) -> None:
    """int-v2's attention sums (int8 operands, over the leading axes): with every
    product at +-127^2 over 2,085 keys, where one float32 GEMM would round, by the VNNI
    kernel and by float32 BLAS chunks; int-v1's 16-bit operands: one float64 GEMM."""
    if vnni_on and not vnni.available():
        pytest.skip("this CPU has no AVX-512 VNNI")
    if not vnni_on:
        monkeypatch.setattr(vnni, "available", lambda: False)
    generator = np.random.default_rng(4)
    keys = 2 * FP32_EXACT_CHUNK + 5
    u = np.full((2, 3, keys), 127, dtype=np.int8)
    v_rows = generator.integers(-127, 128, (2, 5, keys)).astype(np.int8)  # [.., out, in]
    v_rows[:, 0], v_rows[:, 1] = 127, -127
    exact = u.astype(np.int64) @ v_rows.astype(np.int64).swapaxes(-1, -2)
    assert np.abs(exact).max() == 127 * 127 * keys > 2**24
    assert np.array_equal(batched_int8_product(u, v_rows), exact)
    wide_u = np.full((1, 2, 700), 32767.0)
    wide_v = np.full((1, 700, 3), -32767.0)
    assert np.array_equal(float_product(wide_u, wide_v), np.full((1, 2, 3), -32767**2 * 700.0))


@pytest.mark.parametrize("engine", ENGINES)
def test_vnni_and_blas_products_give_the_same_logits(monkeypatch, engine: str) -> None:
    """The engine on this CPU's fastest exact products and on float32 BLAS chunks alone
    (what a CPU without VNNI runs): the same logits bit for bit, prefill and steps."""
    loaded = load_model(str(MODELS["bpe"]), device="cpu")
    tokens = tokens_for(11, 5, 20)
    levels = ATTENTION_LEVELS[engine]
    fast = IntegerModel(loaded.derived, 32, attention_levels=levels)
    expected, stepped = fast.prefill(tokens), step_all(fast, tokens)
    monkeypatch.setattr(vnni, "available", lambda: False)
    monkeypatch.setattr(exact_product, "SMALL_GEMM_ROWS", 0)
    plain = IntegerModel(loaded.derived, 32, attention_levels=levels)
    assert same_bits(plain.prefill(tokens), expected)
    assert same_bits(step_all(plain, tokens), stepped)
    assert plain.lm_head.matrix.packed is None  # the VNNI layout was never made


def test_weight_derivation_follows_the_spec() -> None:
    """§5.2: w_q = round_half_even(w * (127 / max|w_row|)), scale = max|w_row| / 127;
    a zero row gives zeros and scale 0; blocks of rows change nothing."""
    weight = np.array([[0.5, -2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0],
                       [127.0, 0.5, 1.5, -2.5]], dtype=np.float32)
    q, scale = derive_linear(weight)
    assert q.dtype == np.int8 and scale.dtype == np.float64
    # 31.75 -> 32; 0.5 -> 0, 1.5 -> 2, -2.5 -> -2 (half to even)
    assert q.tolist() == [[32, -127, 64, 0], [0, 0, 0, 0], [127, 0, 2, -2]]
    assert scale.tolist() == [2.0 / 127, 0.0, 1.0]


def test_rotary_tables_equal_the_references_directly_evaluated_ones() -> None:
    """The engine's fixed-point rotation recurrence against the NumPy reference's
    per-value mpmath evaluation (spec §5.5): every double identical, far positions too."""
    from int_numpy import rope_tables as evaluated

    from llmarc.inference.rope import rope_tables

    for base, head_dim, length in ((10000.0, 16, 600), (500000.0, 8, 3000)):
        ours = rope_tables(base, head_dim, length)
        theirs = evaluated(base, head_dim, length)
        for a, b in zip(ours, theirs, strict=True):
            assert np.array_equal(a.view(np.uint64), b.view(np.uint64))


@pytest.mark.parametrize("dtype", [np.int16, np.int8])
def test_the_pair_dot_kernel_is_exact_at_the_extremes(dtype) -> None:
    """The LLVM-IR kernel of 16 dot products (int16: pairs summed in int32, then int64;
    int8: pairs and their sums in int32, widened at the end) against int64 arithmetic,
    with every product at the extreme (+-32767^2, +-127^2: the largest sums the int32
    lanes must hold; 32,768 int8 steps, the most the stepper makes) and random values,
    from unaligned offsets and with a stride; and the listed variant (u.v over the key
    pairs with a weight) over every third step."""
    import numba

    from llmarc.inference.kernels import PAIR_LANES, _pair_dots

    pair_dots, listed_pair_dots = _pair_dots(), _pair_dots(listed=True)
    top = int(np.iinfo(dtype).max)

    @numba.njit
    def dots(a, ia, w, iw, steps, stride, out, io):
        pair_dots(a, ia, w, iw, steps, stride, out, io)

    @numba.njit
    def listed_dots(a, ia, w, iw, at, first, count, stride, out, io):
        listed_pair_dots(a, ia, w, iw, at, first, count, stride, out, io)

    generator = np.random.default_rng(0)
    lanes, stride = PAIR_LANES, 2 * PAIR_LANES + 6
    for steps in (0, 1, 2, 3, 600, 32768 if dtype == np.int8 else 4):
        size_a, size_w = 2 * steps + 5, steps * stride + 9
        for a, w in (
            (np.full(size_a, top, dtype), np.full(size_w, top, dtype)),
            (np.full(size_a, -top, dtype), np.full(size_w, top, dtype)),
            (generator.integers(-top, top + 1, size_a).astype(dtype),
             generator.integers(-top, top + 1, size_w).astype(dtype)),
        ):
            out = np.full(lanes + 3, 7, np.int64)
            dots(a, 5, w, 9, steps, stride, out, 2)
            pairs = a[5 : 5 + 2 * steps].astype(np.int64)
            rows = np.array([w[9 + s * stride : 9 + s * stride + 2 * lanes]
                             for s in range(steps)], dtype=np.int64).reshape(steps, 2 * lanes)
            exact = pairs[0::2] @ rows[:, 0::2] + pairs[1::2] @ rows[:, 1::2]
            assert out[2 : 2 + lanes].tolist() == exact.tolist()
            assert out[:2].tolist() == [7, 7] and out[-1] == 7  # nothing outside written
            chosen = np.arange(0, steps, 3, dtype=np.int64)
            at = np.concatenate([np.full(4, -1, np.int64), chosen])  # read from 4 on
            listed_dots(a, 5, w, 9, at, 4, len(chosen), stride, out, 2)
            exact = (pairs[0::2][chosen] @ rows[chosen][:, 0::2]
                     + pairs[1::2][chosen] @ rows[chosen][:, 1::2])
            assert out[2 : 2 + lanes].tolist() == exact.tolist()


@pytest.mark.parametrize("vnni_instructions", [False, True])
def test_the_quad_dot_kernel_is_exact_at_the_extremes(vnni_instructions: bool) -> None:
    """int-v2's q.k kernel (int8 queries, keys stored as k + 128 in unsigned bytes, 4
    columns per lane) against int64 arithmetic, with VNNI's vpdpbusd where this CPU has
    it and with plain vector ops: every product at the extremes (127 x 255, -127 x 255,
    127 x 1), random values, unaligned offsets and a stride."""
    import numba

    from llmarc.inference import vnni
    from llmarc.inference.kernels import PAIR_LANES, _quad_dots

    if vnni_instructions and not vnni.available():
        pytest.skip("this CPU has no AVX-512 VNNI: the stepper uses the plain form")
    quad_dots = _quad_dots(vnni_instructions)

    @numba.njit
    def dots(a, ia, w, iw, steps, stride, out, io):
        quad_dots(a, ia, w, iw, steps, stride, out, io)

    generator = np.random.default_rng(0)
    lanes, stride = PAIR_LANES, 4 * PAIR_LANES + 6
    for steps in (0, 1, 2, 16, 600):
        size_a, size_w = 4 * steps + 5, steps * stride + 9
        for a, w in (
            (np.full(size_a, 127, np.int8), np.full(size_w, 255, np.uint8)),
            (np.full(size_a, -127, np.int8), np.full(size_w, 255, np.uint8)),
            (np.full(size_a, 127, np.int8), np.full(size_w, 1, np.uint8)),
            (generator.integers(-127, 128, size_a).astype(np.int8),
             generator.integers(1, 256, size_w).astype(np.uint8)),
        ):
            out = np.full(lanes + 3, 7, np.int64)
            dots(a, 5, w, 9, steps, stride, out, 2)
            queries = a[5 : 5 + 4 * steps].astype(np.int64).reshape(steps, 4)
            keys = np.array([w[9 + s * stride : 9 + s * stride + 4 * lanes]
                             for s in range(steps)], dtype=np.int64).reshape(steps, lanes, 4)
            exact = np.einsum("sj,slj->l", queries, keys)
            assert out[2 : 2 + lanes].tolist() == exact.tolist()
            assert out[:2].tolist() == [7, 7] and out[-1] == 7  # nothing outside written


def test_the_integer_max_helpers_equal_the_float_max() -> None:
    """``_peak`` (max |v|) and ``_top`` (max v) take the max of int64 bit patterns so that
    LLVM vectorizes them; they must give the float max on signs, zeros of both signs,
    -inf, subnormals and huge values (``_top`` may answer +0 for a -0 maximum that a
    +0 ties: z - top then differs only in the sign of a zero, which floor ignores)."""
    from llmarc.inference import kernels

    kernels._kernels()
    generator = np.random.default_rng(3)
    cases = [
        np.array([-0.0]), np.array([0.0, -0.0]), np.array([-3.5, -0.5, -2.0]),
        np.array([-np.inf, -1e300, -5e-324]), np.array([5e-324, 0.0, -7.0]),
        np.array([1e308, -1.7976931348623157e308]), generator.standard_normal(1000) * 1e3,
        -np.abs(generator.standard_normal(37)),
    ]
    for values in cases:
        assert kernels._peak(values) == np.max(np.abs(values))
        top = kernels._top(values)
        assert top == np.max(values)
        if top == 0 and np.signbit(top):  # -0 only when no +0 ties it
            assert np.signbit(values[values == 0]).all()


def test_the_few_rows_int8_kernel_is_exact_at_the_extremes() -> None:
    """``int8_rows`` (one or two rows: int8 pairs summed in int32) against int64
    arithmetic with every product at +-127^2 over a 1,536-wide row, and random values."""
    from llmarc.inference.kernels import _kernels

    generator = np.random.default_rng(2)
    weight = generator.integers(-127, 128, (40, 1536)).astype(np.int8)
    weight[:20] = 127
    for rows in (1, 2):
        q = generator.integers(-127, 128, (rows, 1536)).astype(np.int8)
        q[0] = 127 if rows == 1 else -127
        out = np.empty((rows, 40), dtype=np.int32)
        _kernels().int8_rows(q, weight, out)
        exact = q.astype(np.int64) @ weight.astype(np.int64).T
        assert np.array_equal(out, exact)
        assert int(np.abs(exact).max()) == 127 * 127 * 1536


def test_compiled_kernels_close_over_constants_only() -> None:
    """numba keys its disk cache on a hash of a kernel's closure; a compiled function or
    an intrinsic held there pickles differently in every process, so each pack and
    extract would compile the kernels again (7-8 s measured).  Modules, numbers and
    flags pickle the same everywhere."""
    import types

    from llmarc.entropy import fast
    from llmarc.inference.kernels import _kernels

    flavours = (_kernels(0), _kernels(1 << 30), fast._kernels())
    kernels = [kernel for flavour in flavours for kernel in vars(flavour).values()
               if hasattr(kernel, "py_func")]
    assert len(kernels) >= 20
    for kernel in kernels:
        for cell in kernel.py_func.__closure__ or ():
            assert isinstance(cell.cell_contents, (int, float, bool, types.ModuleType)), (
                kernel.py_func.__qualname__, cell.cell_contents)


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(("head_dim", "rows", "length", "seed"), [(64, 3, 70, 0), (24, 2, 37, 1)])
def test_stepping_equals_prefill_at_other_head_widths(head_dim: int, rows: int, length: int,
                                                      seed: int, engine: str) -> None:
    """SmolLM2's head width (64: u.v in four 16-column runs) and one that is not a multiple
    of the stepping kernel's 16-wide tiles (24: zero-padded columns), with segments that
    end inside a tile of keys, against prefill's GEMMs."""
    from tests.tiny_models import RandomModel

    random = RandomModel(seed, hidden_size=2 * head_dim, intermediate_size=4 * head_dim,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=head_dim,
                         max_position_embeddings=128)
    model = IntegerModel(random, length, attention_levels=ATTENTION_LEVELS[engine])
    tokens = tokens_for(seed + 5, rows, length)
    assert same_bits(step_all(model, tokens), model.prefill(tokens))


def test_the_attention_products_off_the_cpu_are_exact_past_one_fp32_chunk() -> None:
    """The torch path's attention sums (a GPU's): int-v2's 8-bit operands go through fp32
    GEMMs in chunks of 1,040 keys, added in float64; with every product at +-127^2 over
    2,085 keys one unchunked fp32 GEMM would round, the chunked one must not."""
    torch = pytest.importorskip("torch")
    from llmarc.inference.integer_torch import TorchIntegerModel

    loaded = load_model(str(MODELS["bpe"]), device="cpu")
    model = TorchIntegerModel(loaded.derived, 8, "cpu", ATTENTION_LEVELS["int-v2"])
    generator = torch.Generator().manual_seed(4)
    keys = 2 * FP32_EXACT_CHUNK + 5
    u = torch.randint(-127, 128, (2, 3, keys), generator=generator).double()
    v = torch.randint(-127, 128, (2, keys, 5), generator=generator).double()
    u[..., :] = 127
    v[:, :, 0] = 127
    v[:, :, 1] = -127
    exact = (u.long() @ v.long()).double()
    assert exact.abs().max() == 127 * 127 * keys > 2**24
    assert torch.equal(model._integer_matmul(u, v), exact)


def test_quantizer_and_powers_of_two_follow_the_spec() -> None:
    torch = pytest.importorskip("torch")
    from llmarc.inference.integer_torch import power_of_two, quantize_rows

    values = torch.tensor([[0.5, -2.0, 1.0, 0.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64)
    q, scale = quantize_rows(values, 127)
    assert q.tolist() == [[32.0, -127.0, 64.0, 0.0], [0.0, 0.0, 0.0, 0.0]]  # 31.75 -> 32
    assert scale.squeeze(-1).tolist() == [2.0 / 127, 0.0]
    k = torch.tensor([-1074 + 52, -24, 0, 1, 1023])
    assert power_of_two(k).tolist() == [2.0 ** int(e) for e in k]


def test_unsupported_architectures_are_refused() -> None:
    from dataclasses import replace

    from llmarc.errors import ModelError

    loaded = load_model(str(MODELS["bpe"]), device="cpu")
    derived = loaded.derived
    for change, message in (({"hidden_act": "gelu"}, "gelu"), ({"mlp_bias": True}, "biased"),
                            ({"rope_scaling": {"rope_type": "linear"}}, "linear")):
        other = replace(derived, architecture=replace(derived.architecture, **change))
        with pytest.raises(ModelError, match=message):
            IntegerModel(other, 16)


def test_torch_path_divides_only_through_one_ieee_division():
    """On CUDA, PyTorch computes ``tensor / float`` as ``tensor * (1 / float)`` (two
    roundings), and ``float / tensor`` is a reciprocal everywhere: the first GPU run packed
    archives that differed from the CPU's by such a division.  The CPU cannot show it, so
    the torch path's source is held to the rule: no ``/`` operator, and ``torch.div`` only
    in ``_div``, which makes both operands tensors."""
    import ast
    import inspect

    from llmarc.inference import integer_torch

    tree = ast.parse(inspect.getsource(integer_torch))
    divisions = [node.lineno for node in ast.walk(tree)
                 if isinstance(node, (ast.BinOp, ast.AugAssign))
                 and isinstance(node.op, ast.Div)]
    assert divisions == [], f"'/' on lines {divisions}: use _div"
    callers = [function.name for function in ast.walk(tree)
               if isinstance(function, ast.FunctionDef)
               for node in ast.walk(function)
               if isinstance(node, ast.Attribute) and node.attr in ("div", "div_", "true_divide")]
    assert callers == ["_div"]
