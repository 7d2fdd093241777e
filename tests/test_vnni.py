"""The VNNI int8 GEMM for few rows (the decoder's step): exact, or not used at all.

Its result must be the integer sum oneDNN and the fp32 path return, at the extremes of
the operands and at every shape the padding has to cover (rows, columns and inner
indexes that are not multiples of the tile), since a decoder on this host and one on a
host without VNNI must compute the same logits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmarc.inference import vnni
from llmarc.inference.integer import IntLinear

needs_vnni = pytest.mark.skipif(not vnni.available(),
                                reason="this CPU has no AVX-512 VNNI: the kernel is not used")


def test_packing_lays_out_four_inner_indexes_per_lane_and_offsets_the_sums() -> None:
    """The layout the kernel reads: block b, group g, column c, index i holds
    w[64 b + c, 4 g + i], zero past the matrix; compensation is 128 x each row's sum."""
    rng = np.random.default_rng(0)
    weight = rng.integers(-127, 128, (70, 10)).astype(np.int8)
    packed, compensation = vnni.pack(weight)
    assert packed.shape == (2, 3, 64, 4) and packed.dtype == np.int8
    for n, k in ((0, 0), (63, 9), (64, 3), (69, 7)):
        assert packed[n // 64, k // 4, n % 64, k % 4] == weight[n, k]
    assert not packed[1, :, 6:].any() and not packed[:, 2, :, 2:].any()
    assert np.array_equal(compensation, 128 * weight.astype(np.int64).sum(axis=1))


def test_the_switch_and_a_foreign_cpu_name_turn_the_kernel_off(monkeypatch) -> None:
    from numba.core import config

    try:
        monkeypatch.setenv(vnni.ENVIRONMENT_SWITCH, "off")
        vnni.available.cache_clear()
        assert not vnni.available()
        monkeypatch.delenv(vnni.ENVIRONMENT_SWITCH)
        monkeypatch.setattr(config, "CPU_NAME", "haswell")
        vnni.available.cache_clear()
        assert not vnni.available()
    finally:
        vnni.available.cache_clear()


@needs_vnni
@pytest.mark.parametrize(("rows", "inner", "outputs"),
                         [(3, 20, 70), (4, 576, 64), (5, 6, 17), (32, 1536, 200), (31, 130, 640)])
def test_the_kernel_is_exact_at_the_extremes(rows: int, inner: int, outputs: int) -> None:
    """Against int64 arithmetic, both flavours (threads, and the calling thread alone):
    every product at +127^2 and -127^2 (the largest offset sums, 255 x 127 per product),
    alternating signs, and random values."""
    rng = np.random.default_rng(rows * inner)
    cases = [
        (np.full((rows, inner), 127), np.full((outputs, inner), 127)),
        (np.full((rows, inner), -127), np.full((outputs, inner), 127)),
        (np.full((rows, inner), 127), np.full((outputs, inner), -127)),
        (np.where(np.arange(inner) % 2 == 0, 127, -127)[None].repeat(rows, 0),
         np.full((outputs, inner), -127)),
        (rng.integers(-127, 128, (rows, inner)), rng.integers(-127, 128, (outputs, inner))),
    ]
    for q, weight in cases:
        q, weight = q.astype(np.int8), weight.astype(np.int8)
        for parallel in (True, False):
            out = np.full((rows, outputs), 7, dtype=np.int32)
            vnni.kernel(parallel)(q, *vnni.pack(weight), out)
            assert np.array_equal(out, q.astype(np.int64) @ weight.astype(np.int64).T)


@needs_vnni
def test_steps_give_three_to_32_rows_to_the_kernel_and_the_rest_to_onednn() -> None:
    generator = torch.Generator().manual_seed(3)
    weight = torch.randint(-127, 128, (96, 192), generator=generator).double()
    layer = IntLinear.from_float(weight, "cpu", int8_gemm=True)
    assert layer.few_rows(3, stepping=True) and layer.few_rows(vnni.MAX_ROWS, stepping=True)
    assert not layer.few_rows(vnni.MAX_ROWS + 1, stepping=True)
    assert not layer.few_rows(3)  # a prefill's few rows: oneDNN, and no packed copy
    q = torch.randint(-127, 128, (3, 192), generator=generator, dtype=torch.int8)
    assert torch.equal(layer._accumulate(q).long(), q.long() @ layer.weight.long())
    assert "_vnni_packed" not in vars(layer)
    for rows in (3, 17, vnni.MAX_ROWS):
        q = torch.randint(-127, 128, (rows, 192), generator=generator, dtype=torch.int8)
        out = np.empty((rows, 96), dtype=np.int32)
        layer.rows_product(q.numpy(), out)
        assert np.array_equal(out, (q.long() @ layer.weight.long()).numpy())


def test_the_kernel_closes_over_constants_only() -> None:
    """As for the other compiled kernels (see test_int_engine): a closure that pickles
    differently in every process would recompile the kernel in every process."""
    import types

    for parallel in (True, False):
        for cell in vnni.kernel(parallel).py_func.__closure__ or ():
            assert isinstance(cell.cell_contents, (int, float, bool, types.ModuleType))
