"""Stored tensor types -> exact float32 values (spec/model.md §3.3).

The integer engines derive their int8 weights from float32 values, so those values are
part of what an archive means: each block format's arithmetic is fixed here (and in the
spec) as IEEE binary32 operations in a stated order, which NumPy performs one ufunc at a
time (never fused), the same on every machine.  For every format below the product
``d × q`` is exact in binary32 (an 11-bit half-precision mantissa times an integer of at
most 8 bits); only Q4_1's ``+ m`` rounds, to nearest even.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from llmarc.errors import ModelError

F32 = np.dtype("<f4")
F16 = np.dtype("<f2")
QK = 32  # elements per quantized block

# ggml type id -> (name, elements per block, bytes per block)
GGML_TYPES: dict[int, tuple[str, int, int]] = {
    0: ("F32", 1, 4),
    1: ("F16", 1, 2),
    2: ("Q4_0", QK, 2 + QK // 2),
    3: ("Q4_1", QK, 4 + QK // 2),
    8: ("Q8_0", QK, 2 + QK),
    30: ("BF16", 1, 2),
}


def stored_size(ggml_type: int, elements: int, row: int, what: str) -> int:
    """Bytes a tensor of ``elements`` values in rows of ``row`` occupies; refuses types
    the spec does not define and rows that are not whole blocks."""
    if ggml_type not in GGML_TYPES:
        raise ModelError(f"{what}: tensor type {ggml_type} is not supported "
                         f"(supported: {', '.join(n for n, _, _ in GGML_TYPES.values())})")
    _name, block, size = GGML_TYPES[ggml_type]
    if row % block:
        raise ModelError(f"{what}: rows of {row} values are not whole blocks of {block}")
    return elements // block * size


def _half(blocks: np.ndarray, column: int) -> np.ndarray:
    """The little-endian float16 at ``column`` of each block, widened (exactly) to float32."""
    return blocks[:, column:column + 2].copy().view(F16).astype(F32)


def _nibbles(packed: np.ndarray) -> np.ndarray:
    """16 bytes -> 32 values: the low nibbles are elements 0-15, the high ones 16-31."""
    return np.concatenate([packed & 0x0F, packed >> 4], axis=1).astype(F32)


def _q8_0(blocks: np.ndarray) -> np.ndarray:
    return blocks[:, 2:].copy().view(np.int8).astype(F32) * _half(blocks, 0)


def _q4_0(blocks: np.ndarray) -> np.ndarray:
    return (_nibbles(blocks[:, 2:]) - F32.type(8)) * _half(blocks, 0)


def _q4_1(blocks: np.ndarray) -> np.ndarray:
    product = _nibbles(blocks[:, 4:]) * _half(blocks, 0)  # exact
    return product + _half(blocks, 2)  # the one rounding: binary32, nearest even


def widen_bf16(raw: np.ndarray) -> np.ndarray:
    """bfloat16 bit patterns (as bytes) -> float32: the upper half of a float32, exact."""
    return (raw.view("<u2").astype("<u4") << 16).view(F32)


_BLOCK_DECODERS: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: _q4_0, 3: _q4_1, 8: _q8_0,
}


def dequantize(raw: memoryview, ggml_type: int, shape: tuple[int, ...]) -> np.ndarray:
    """The float32 values of a stored tensor, C-contiguous in ``shape``."""
    data = np.frombuffer(raw, dtype=np.uint8)
    if ggml_type == 0:
        values = data.view(F32).astype(F32)
    elif ggml_type == 1:
        values = data.view(F16).astype(F32)
    elif ggml_type == 30:
        values = widen_bf16(data)
    else:
        _name, _block, size = GGML_TYPES[ggml_type]
        values = _BLOCK_DECODERS[ggml_type](data.reshape(-1, size))
    return np.ascontiguousarray(values.reshape(shape), dtype=F32)
