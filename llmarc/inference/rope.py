"""The rotary tables of spec/llm-codec.md §5.5: cos and sin of every position's angles,
rounded to binary64 from exact values (never a platform libm), so that every machine
rotates queries and keys by the same doubles.  Python integers and mpmath only (NumPy
for the result): the torch ops and the CPU kernels both read these tables."""

from __future__ import annotations

import functools
from typing import Any


def rope_tables(base: float, head_dim: int, length: int) -> tuple[Any, Any]:
    """cos and sin of p * base^(-2i/head_dim), rounded to the nearest binary64 from the
    exact real values (mpmath at 192 bits), for p < length, i < head_dim / 2."""
    return _rope_tables(float(base), head_dim, length)


#: Fixed-point bits of the rotation recurrence in :func:`_rope_tables`.
ROPE_FIXED_BITS = 256


@functools.cache
def _rope_tables(base: float, head_dim: int, length: int) -> tuple[Any, Any]:
    """Position p's angle is p rotations by theta_i, carried out in 256-bit fixed point
    with Python integers: (c, s) <- (c*C1 - s*S1, s*C1 + c*S1) >> 256, from C1, S1 =
    cos, sin(theta_i) computed by mpmath at 320 bits.  Each step adds under 4 units of
    2^-256, so after 2^13 positions the error is below 2^-240, and ``c / 2^256`` (Python's
    int division is correctly rounded) is the binary64 nearest the exact cos(p theta_i)
    unless that lies within 2^-240 of a midpoint between two doubles: the same caveat as
    evaluating each value at high precision (spec §5.5), at a thirtieth of the time
    (65,536 mpmath cos/sin calls took ~2 s for a 1,024-position table)."""
    import mpmath
    import numpy as np

    half = head_dim // 2
    cos = np.empty((length, half), dtype=np.float64)
    sin = np.empty((length, half), dtype=np.float64)
    bits = ROPE_FIXED_BITS
    one = 1 << bits
    with mpmath.workprec(bits + 64):
        b = mpmath.mpf(base)  # the binary64 base is an exact rational
        for i in range(half):
            theta = mpmath.power(b, mpmath.mpf(-2 * i) / head_dim)
            step_cos = int(mpmath.nint(mpmath.cos(theta) * one))
            step_sin = int(mpmath.nint(mpmath.sin(theta) * one))
            c, s = one, 0
            column_cos, column_sin = [], []
            for _ in range(length):
                column_cos.append(c / one)
                column_sin.append(s / one)
                c, s = (c * step_cos - s * step_sin) >> bits, (s * step_cos + c * step_sin) >> bits
            cos[:, i] = column_cos
            sin[:, i] = column_sin
    cos.flags.writeable = False
    sin.flags.writeable = False
    return cos, sin
