"""The portable engines int-v1 and int-v2: exact, order-free, and the same as the
spec's NumPy twin.

Their promise is that a row's logits depend on nothing but the row's tokens: not on
batch width, companions, full-forward versus step-by-step evaluation, or thread count.
These tests check that bit for bit for both engines (they differ only in the width of
the attention's integers, so in kernels and cache types), and compare against
spec/reference/int_numpy.py, a second implementation written from the spec with int64
arithmetic and no torch.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from llmarc.inference import int8_gemm
from llmarc.inference.integer import (
    ATTENTION_LEVELS,
    FP32_EXACT_CHUNK,
    IntegerModel,
    IntLinear,
    power_of_two,
    quantize_rows,
)
from llmarc.inference.stepping import IntegerStepper
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


def tokens_for(seed: int, rows: int, length: int) -> torch.Tensor:
    return torch.randint(0, 300, (rows, length), generator=torch.Generator().manual_seed(seed))


def step_all(engine: IntegerModel, tokens: torch.Tensor) -> torch.Tensor:
    stepper = IntegerStepper(engine, tokens.shape[0], tokens.shape[1])
    return torch.stack([stepper.step(tokens[:, t]).clone() for t in range(tokens.shape[1])],
                       dim=1)


def test_stepping_equals_prefill_bit_for_bit(model) -> None:
    _name, _engine, engine = model
    tokens = tokens_for(1, 3, 40)
    assert torch.equal(step_all(engine, tokens), engine.prefill(tokens))


def test_the_integer_model_keeps_no_view_of_the_float_weights() -> None:
    """Dropping the float model must free its storage (a memory-mapped safetensors file
    stays resident while any view of it lives)."""
    import numpy as np

    loaded = load_model(str(MODELS["bpe"]), device="cpu")
    engine = IntegerModel(loaded.derived, 16)
    kept = [value for value in vars(engine).values() if isinstance(value, torch.Tensor)]
    assert any(value is engine.embedding for value in kept)
    mappings = {id(f): np.frombuffer(f._map, np.uint8)
                for f in loaded.derived.weights.files.values()}
    assert mappings
    for value in kept:
        for mapping in mappings.values():
            assert not np.shares_memory(value.numpy(), mapping)


def test_a_step_writes_its_logits_into_the_steppers_workspace(model) -> None:
    """No step allocates its [width, V] logits anew; the next step overwrites them."""
    _name, _engine, engine = model
    tokens = tokens_for(2, 3, 2)
    stepper = IntegerStepper(engine, 3, 2)
    first = stepper.step(tokens[:, 0])
    kept = first.clone()
    second = stepper.step(tokens[:, 1])
    assert second.data_ptr() == first.data_ptr()
    assert torch.equal(first, second) and not torch.equal(kept, second)


@pytest.mark.parametrize("width", [1, 3, 8])
def test_a_row_is_the_same_at_any_batch_width(model, width: int) -> None:
    _name, _engine, engine = model
    tokens = tokens_for(width, width, 24)
    alone = engine.prefill(tokens[:1])
    assert torch.equal(engine.prefill(tokens)[:1], alone)
    assert torch.equal(step_all(engine, tokens)[:1], alone)


def test_the_torch_operations_path_gives_the_cpu_kernels_logits(model) -> None:
    """The path a GPU takes (the spec's operations as torch ops) against the CPU's
    compiled kernels, run here on the CPU by switching the kernels off."""
    _name, _engine, engine = model
    tokens = tokens_for(9, 2, 24)
    kernels = engine.prefill(tokens)
    assert torch.equal(step_all(engine, tokens), kernels)
    engine.fused_kernels = False
    try:
        assert torch.equal(engine.prefill(tokens), kernels)
        assert torch.equal(step_all(engine, tokens), kernels)
    finally:
        engine.fused_kernels = True


def test_thread_count_does_not_change_logits(model) -> None:
    _name, _engine, engine = model
    tokens = tokens_for(7, 4, 32)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = engine.prefill(tokens)
        torch.set_num_threads(2)
        two = engine.prefill(tokens)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_the_numpy_reference_gives_the_same_logits(model) -> None:
    name, engine_name, engine = model
    tokens = tokens_for(3, 1, 30)
    ours = engine.prefill(tokens)[0].numpy()
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
        ours = loaded.integer_model(8, engine).prefill(torch.tensor([tokens]))[0].numpy()
        theirs = IntReference(None, max_length=8, engine=engine, tensors=tensors,
                              config=derived.architecture.canonical()).logits(tokens)
        assert np.array_equal(ours.view(np.uint32), theirs.view(np.uint32)), engine


def test_fp32_gemm_path_is_the_exact_integer_product() -> None:
    """The chunked fp32 GEMM equals int64 arithmetic at the extreme values, where one
    unchunked fp32 GEMM would round (inner dimension above 1040)."""
    inner = 3 * FP32_EXACT_CHUNK + 7
    generator = torch.Generator().manual_seed(0)
    weight = torch.randint(-127, 128, (5, inner), generator=generator).double()
    weight[:, :64] = 127
    layer = IntLinear.from_float(weight, "cpu")
    q = torch.randint(-127, 128, (4, inner), generator=generator).double()
    q[:, :64] = 127
    exact = q.long() @ layer.weight.long()
    assert torch.equal(layer.integer_product(q), exact.double())


def test_compact_int8_weights_give_the_same_products() -> None:
    """The GPU storage (int8, widened per chunk) computes what the CPU's float32 does;
    exercised on the CPU by building the layer as the GPU path does."""
    generator = torch.Generator().manual_seed(1)
    weight = torch.randn(7, FP32_EXACT_CHUNK + 300, generator=generator, dtype=torch.float64)
    wide = IntLinear.from_float(weight, "cpu")
    compact = IntLinear(wide.weight.to(torch.int8), wide.scale)
    q = torch.randint(-127, 128, (3, weight.shape[1]), generator=generator).double()
    assert compact.weight.dtype == torch.int8
    assert torch.equal(compact.integer_product(q), wide.integer_product(q))


@pytest.mark.parametrize("engine", ENGINES)
def test_int8_and_fp32_gemm_paths_give_the_same_logits(monkeypatch, engine: str) -> None:
    """The int8 GEMM (where the probe proved it exact on this host) and the chunked fp32
    GEMMs compute the same exact sums, so the logits agree bit for bit; for int-v2's
    prefill attention, int8 GEMMs against float64 ones."""
    loaded = load_model(str(MODELS["bpe"]), device="cpu")
    tokens = tokens_for(11, 2, 20)
    levels = ATTENTION_LEVELS[engine]
    fast = IntegerModel(loaded.derived, 32, attention_levels=levels)
    assert fast.int8_attention == (levels == 127 and fast.int8_gemm)
    monkeypatch.setenv(int8_gemm.ENVIRONMENT_SWITCH, "off")
    plain = IntegerModel(loaded.derived, 32, attention_levels=levels)
    assert not plain.int8_gemm and plain.lm_head.weight.dtype == torch.float32
    assert not plain.int8_attention
    assert torch.equal(fast.prefill(tokens), plain.prefill(tokens))
    assert torch.equal(step_all(fast, tokens), step_all(plain, tokens))


def _pair_saturating_int_mm(a: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """An int8 GEMM as oneDNN computes it without VNNI: a + 128 as u8, u8 x s8 products
    added in pairs with int16 saturation (vpmaddubsw), then the shift taken back."""
    shifted = a.long() + 128
    wide = w.long()
    inner = a.shape[1]
    total = torch.zeros(a.shape[0], w.shape[1], dtype=torch.long)
    for k in range(0, inner, 2):
        pair = shifted[:, k, None] * wide[k]
        if k + 1 < inner:
            pair = pair + shifted[:, k + 1, None] * wide[k + 1]
        total += pair.clamp(-32768, 32767)
    return (total - 128 * wide.sum(dim=0)).to(torch.int32)


def test_the_int8_gemm_probe_refuses_a_saturating_kernel(monkeypatch) -> None:
    shapes = [(8, 6), (12, 5)]
    exact = lambda a, w: (a.long() @ w.long()).to(torch.int32)  # noqa: E731
    try:
        monkeypatch.setattr(torch, "_int_mm", exact)
        int8_gemm._probe.cache_clear()
        assert int8_gemm.int8_gemm_is_exact(shapes)
        monkeypatch.setattr(torch, "_int_mm", _pair_saturating_int_mm)
        int8_gemm._probe.cache_clear()
        assert not int8_gemm.int8_gemm_is_exact(shapes)
    finally:
        int8_gemm._probe.cache_clear()


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
    generator = torch.Generator().manual_seed(2)
    weight = torch.randint(-127, 128, (40, 1536), generator=generator).double()
    weight[:20] = 127.0
    layer = IntLinear.from_float(weight, "cpu", int8_gemm=True)
    for rows in (1, 2):
        q = torch.randint(-127, 128, (rows, 1536), generator=generator, dtype=torch.int8)
        q[0] = 127 if rows == 1 else -127
        assert layer.few_rows(rows)
        out = np.empty((rows, 40), dtype=np.int32)
        layer.rows_product(q.numpy(), out)
        exact = q.long() @ layer.weight.long()
        assert np.array_equal(out, exact.numpy())
        assert int(exact.abs().max()) == 127 * 127 * 1536


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
    assert torch.equal(step_all(model, tokens), model.prefill(tokens))


def test_the_attention_products_off_the_cpu_are_exact_past_one_fp32_chunk() -> None:
    """The torch path's attention sums (a GPU's): int-v2's 8-bit operands go through fp32
    GEMMs in chunks of 1,040 keys, added in float64; with every product at +-127^2 over
    2,085 keys one unchunked fp32 GEMM would round, the chunked one must not."""
    loaded = load_model(str(MODELS["bpe"]), device="cpu")
    model = loaded.integer_model(8, "int-v2")
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
