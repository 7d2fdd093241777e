"""float32 logits -> integer frequencies, every symbol >= 1, summing to exactly 2^P.

Why not ``softmax`` then rounding?  ``exp`` differs between math libraries in the last
bits, so two implementations would disagree on some tables and the range decoder would
go astray.  Here the only floating-point step is ``float32`` subtraction and one
``float64`` multiply, both exactly rounded by IEEE 754 everywhere; the exponential is an
integer table lookup with a shift:

1. m = max(z); d = z - m in float32 (so d <= 0, exactly rounded).
2. x = floor(float64(d) * K), K = 256 * log2(e) as a float64, clamped to [-10240, 0]:
   the log2-probability in 1/256 steps.
3. w = EXP2_TABLE[(-x) & 255] >> ((-x) >> 8)  ~= 2^31 * 2^(x/256).
4. f = 1 + (w * (2^P - V)) // sum(w); the remainder 2^P - sum(f) goes to the first
   argmax of z.
"""

from __future__ import annotations

import math

import numpy as np

FRACTION_BITS = 8
#: 256 * log2(e), the float64 nearest to it (spec: 0x1.71547652b82fep+8).
LOG2E_SCALED = float.fromhex("0x1.71547652b82fep+8")
#: x is clamped to this: 2^(-40) of the top weight is far below one frequency unit.
MIN_EXPONENT = -40 * 256
MIN_PRECISION, MAX_PRECISION = 12, 28
DEFAULT_PRECISION = 24


def _exp2_entry(r: int) -> int:
    """round-half-up(2^(31 - r/256)), decided with exact integer arithmetic.

    T is the answer iff (2T-1)^256 <= 2^(8192 - r) < (2T+1)^256, i.e. T - 1/2 <= y < T + 1/2
    for y = 2^(31 - r/256) (y is irrational for r > 0, so there is never a tie)."""
    target = 1 << (8192 - r)
    guess = round(2.0 ** (31 - r / 256))
    for candidate in (guess - 1, guess, guess + 1):
        if (2 * candidate - 1) ** 256 <= target < (2 * candidate + 1) ** 256:
            return candidate
    raise AssertionError(f"EXP2_TABLE[{r}] not bracketed")  # pragma: no cover


#: EXP2_TABLE[r] = round(2^(31 - r/256)), r = 0..255 (printed in spec/entropy.md).
EXP2_TABLE = np.array([_exp2_entry(r) for r in range(256)], dtype=np.int64)


def logits_to_frequencies(logits: np.ndarray, precision: int = DEFAULT_PRECISION) -> np.ndarray:
    """Integer frequency tables (int64, shape of ``logits``) for float32 logits (..., V).

    Raises ValueError for NaN or +inf logits, a row of only -inf, or V >= 2^precision.
    Other dtypes are converted to float32 first (exact for float16/bfloat16 inputs).
    """
    if not MIN_PRECISION <= precision <= MAX_PRECISION:
        raise ValueError(f"precision must be in {MIN_PRECISION}..{MAX_PRECISION}")
    z = np.asarray(logits, dtype=np.float32)
    vocab = z.shape[-1]
    total = 1 << precision
    spare = total - vocab
    if spare <= 0:
        raise ValueError(f"vocabulary of {vocab} needs precision > {math.log2(vocab):.1f}")
    if np.isnan(z).any() or np.isposinf(z).any():
        raise ValueError("logits contain NaN or +inf")
    top = z.max(axis=-1, keepdims=True)
    if np.isneginf(top).any():
        raise ValueError("a row of logits is entirely -inf")
    scaled = np.floor((z - top).astype(np.float64) * LOG2E_SCALED)
    exponent = (-np.maximum(scaled, MIN_EXPONENT)).astype(np.int64)  # 0 .. 10240
    weights = EXP2_TABLE[exponent & 255] >> (exponent >> FRACTION_BITS)
    freqs = 1 + (weights * spare) // weights.sum(axis=-1, keepdims=True)
    remainder = total - freqs.sum(axis=-1)
    first_max = np.argmax(z, axis=-1)
    np.put_along_axis(
        freqs,
        first_max[..., None],
        np.take_along_axis(freqs, first_max[..., None], axis=-1) + remainder[..., None],
        axis=-1,
    )
    return freqs
