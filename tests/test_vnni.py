"""The VNNI int8 GEMM (the linear layers' products from 3 rows on): exact, or not used.

Its result must be the integer sum the other paths (int8_rows, float32 BLAS chunks)
return, at the extremes of the operands and at every shape the padding has to cover
(rows, columns and inner indexes that are not multiples of the tile), since a decoder on
this host and one on a host without VNNI must compute the same logits."""

from __future__ import annotations

import numpy as np
import pytest

from llmarc.inference import vnni
from llmarc.inference.exact_product import Int8Matrix

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
def test_weights_are_kept_in_the_kernels_layout_alone() -> None:
    """With the kernel, a matrix holds its weights once, packed (the plain copy for
    int8_rows was +134 MB for SmolLM2), and every row count's product is exact."""
    generator = np.random.default_rng(3)
    weight = generator.integers(-127, 128, (96, 192)).astype(np.int8)
    matrix = Int8Matrix(weight)
    assert matrix.rows is None and matrix.packed is not None
    for held, packed in zip(matrix.packed, vnni.pack(weight), strict=True):
        assert np.array_equal(held, packed)
    for rows in (1, 2, 3, 17, 300):
        q = generator.integers(-127, 128, (rows, 192)).astype(np.int8)
        assert np.array_equal(matrix.product(q), q.astype(np.int64) @ weight.T.astype(np.int64))


def test_the_kernel_closes_over_constants_only() -> None:
    """As for the other compiled kernels (see test_int_engine): a closure that pickles
    differently in every process would recompile the kernel in every process."""
    import types

    for parallel in (True, False):
        for cell in vnni.kernel(parallel).py_func.__closure__ or ():
            assert isinstance(cell.cell_contents, (int, float, bool, types.ModuleType))
