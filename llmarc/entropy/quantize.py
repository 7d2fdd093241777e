"""float32 logits -> integer frequencies, every symbol >= 1, summing to exactly 2^P.

Why not ``softmax`` then rounding?  ``exp`` differs between math libraries in the last
bits, so two implementations would disagree on some tables and the range decoder would
go astray.  Here the only floating-point steps are one ``float32`` subtraction and one
``float64`` multiplication, both exactly rounded by IEEE 754 everywhere; the exponential
is an integer table lookup with a shift (spec/entropy.md §2):

1. m = max(z); d = z - m in float32 (so d <= 0, exactly rounded).
2. x = floor(float64(d) * K), K = 256 * log2(e) as a float64, clamped to [-10240, 0]:
   the log2-probability relative to the top symbol, in 1/256-bit steps.
3. w = EXP2_TABLE[(-x) & 255] >> ((-x) >> 8)  ~= 2^31 * 2^(x/256).
4. f = 1 + (w * (2^P - V)) // sum(w); the remainder 2^P - sum(f) goes to the first
   argmax of z.

Since ``f > p * (2^P - V) / 2^P`` for the normalised weights p, coding with f instead of
p costs less than ``-log2(1 - V / 2^P)`` bits per token (0.0042 bit for V = 49152,
P = 24); the 1/256-bit grid of the exponent costs far less (second order).
"""

from __future__ import annotations

import numpy as np

FRACTION_BITS = 8
#: 256 * log2(e), the float64 nearest to it (spec: 0x1.71547652b82fep+8).
LOG2E_SCALED = float.fromhex("0x1.71547652b82fep+8")
#: x is clamped to this: a weight of 2^31 * 2^-40 is 0, far below one frequency unit.
MIN_EXPONENT = -40 * 256
MIN_PRECISION, MAX_PRECISION = 12, 28
DEFAULT_PRECISION = 24


def _exp2_entry(r: int) -> int:
    """round-half-up(2^(31 - r/256)), decided with exact integer arithmetic.

    T is the answer iff (2T-1)^256 <= 2^(8192 - r) < (2T+1)^256, i.e. T - 1/2 <= y < T + 1/2
    for y = 2^(31 - r/256) (y is irrational for r > 0, so there is never a tie).  The float
    guess only picks the candidates; the big-integer comparison decides, so a misrounding
    ``pow`` cannot leak into the table."""
    target = 1 << (8192 - r)
    guess = round(2.0 ** (31 - r / 256))
    for candidate in (guess - 1, guess, guess + 1):
        if (2 * candidate - 1) ** 256 <= target < (2 * candidate + 1) ** 256:
            return candidate
    raise AssertionError(f"EXP2_TABLE[{r}] not bracketed")  # pragma: no cover


#: EXP2_TABLE[r] = round(2^(31 - r/256)), r = 0..255 (printed in spec/entropy.md §2.1).
EXP2_TABLE = np.array([_exp2_entry(r) for r in range(256)], dtype=np.int64)
EXP2_TABLE.flags.writeable = False

#: WEIGHTS[e] = EXP2_TABLE[e & 255] >> (e >> 8) for every e = -x in 0..10240: the same
#: values as the spec's lookup-and-shift, precomputed so that a batch needs one gather
#: instead of a gather, a mask and a shift (80 KiB, stays in cache).
_EXPONENTS = np.arange(-MIN_EXPONENT + 1, dtype=np.int64)
WEIGHTS = EXP2_TABLE[_EXPONENTS & 255] >> (_EXPONENTS >> FRACTION_BITS)
WEIGHTS.flags.writeable = False


_SUBNORMAL_A = np.full(16, 2.0**-148, dtype=np.float32)
_SUBNORMAL_B = np.full(16, 2.0**-149, dtype=np.float32)


def _check_gradual_underflow() -> None:
    """Refuse to run when the CPU flushes subnormals to zero (FTZ/DAZ).

    The spec's float32 subtraction honours subnormals, e.g. d = -2^-149 gives x = -1, but
    a flush gives d = 0 and x = 0: a different table.  Libraries can switch the flush on
    process-wide (``torch.set_flush_denormal(True)``, some -ffast-math builds), so one
    16-element probe per call (a few microseconds) guards the encoder and decoder alike.
    """
    if not np.subtract(_SUBNORMAL_A, _SUBNORMAL_B).all():
        raise RuntimeError(
            "the CPU flushes subnormal floats to zero (FTZ/DAZ is on, e.g. via "
            "torch.set_flush_denormal(True)); llmarc's quantization needs IEEE gradual underflow"
        )


def logits_to_frequencies(logits: np.ndarray, precision: int = DEFAULT_PRECISION) -> np.ndarray:
    """Integer frequency tables (int64, shape of ``logits``) for float32 logits (..., V).

    The input must hold exact binary32 values: float16/bfloat16 logits convert exactly,
    so callers convert those to float32 first; a float64 array is rounded to float32 here
    (and then it is the rounded values that are specified).  Vectorised over the leading
    dimensions; each row is independent of the others.

    Raises ValueError for NaN or +inf logits, a row of only -inf, V = 0, V >= 2^precision
    or a precision outside 12..28; RuntimeError if subnormals are flushed to zero.
    """
    if not MIN_PRECISION <= precision <= MAX_PRECISION:
        raise ValueError(f"precision must be in {MIN_PRECISION}..{MAX_PRECISION}, not {precision}")
    z = np.asarray(logits, dtype=np.float32)
    if z.ndim == 0:
        raise ValueError("logits need at least one dimension (the vocabulary)")
    vocab = z.shape[-1]
    total = 1 << precision
    spare = total - vocab
    if vocab == 0 or spare <= 0:
        raise ValueError(f"a vocabulary of {vocab} needs 1 <= V < 2^precision = {total}")
    if z.size == 0:
        return np.zeros(z.shape, dtype=np.int64)
    _check_gradual_underflow()
    top = z.max(axis=-1, keepdims=True)
    # max() propagates NaN and +inf reaches the max, so checking the maxima is enough
    if np.isnan(top).any() or np.isposinf(top).any():
        raise ValueError("logits contain NaN or +inf")
    if np.isneginf(top).any():
        raise ValueError("a row of logits is entirely -inf")
    with np.errstate(over="ignore"):  # max - (-max) overflows to -inf, as specified
        scaled = np.subtract(z, top).astype(np.float64)  # float32 subtraction; exact widening
    np.multiply(scaled, LOG2E_SCALED, out=scaled)  # one IEEE binary64 multiply
    np.floor(scaled, out=scaled)
    np.maximum(scaled, MIN_EXPONENT, out=scaled)  # -inf -> -10240
    np.negative(scaled, out=scaled)
    weights = WEIGHTS.take(scaled.astype(np.intp))  # 0..10240, integral floats: exact
    sums = weights.sum(axis=-1, keepdims=True)  # >= 2^31: the top symbol has w = 2^31
    weights *= spare  # < 2^31 * 2^28 = 2^59
    weights //= sums
    weights += 1
    freqs = weights
    remainder = total - freqs.sum(axis=-1, keepdims=True)  # 0 <= R < V
    first_max = np.argmax(z, axis=-1)[..., None]  # first index of the maximum (ties)
    np.put_along_axis(
        freqs, first_max, np.take_along_axis(freqs, first_max, axis=-1) + remainder, axis=-1
    )
    return freqs
