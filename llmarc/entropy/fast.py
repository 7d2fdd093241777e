"""spec/entropy.md §2 fused into one compiled pass per row (numba), rows in parallel.

:func:`llmarc.entropy.quantize.logits_to_frequencies` is the readable NumPy statement of
the spec: eight passes over a [rows, 49,152] array, one of them an int64 division per
symbol, about 1 ms a token on one core, a fifth of a decoding step at batch width 32.
These kernels compute the very same integers (tests compare them on adversarial logits):

* the float32 subtraction and binary64 multiply are the same IEEE operations (numba's
  fastmath is off, so LLVM neither fuses nor reorders them);
* ``(w * spare) // sum`` is found from a binary64 estimate of the quotient and corrected
  by exact integer arithmetic: the estimate is within one of the quotient, the
  correction makes it exact, and it costs a multiply instead of a 64-bit division;
* the loops are shaped so that LLVM vectorizes them (2.2x measured): the exponents in a
  pass before the table lookup, the correction without branches, and numba's
  ``error_model="numpy"`` (no zero test on each divisor; none is zero).

The encoder needs only the coded token's interval (start, freq), not the table; the
decoder needs the cumulative table.  Rows the kernels refuse (NaN, +inf, a row of only
-inf) are handed to the NumPy function, which raises its precise error; a CPU that
flushes subnormals to zero in a kernel thread is refused like the NumPy function does.
Without numba (the base install has none) the NumPy function is used.
"""

from __future__ import annotations

import threading
from typing import Any

import numpy as np

from llmarc.entropy.quantize import (
    LOG2E_SCALED,
    MAX_PRECISION,
    MIN_EXPONENT,
    MIN_PRECISION,
    WEIGHTS,
    logits_to_frequencies,
)

_KERNELS: Any = None
_LAZY = threading.Lock()
_weights_of: Any = None  # the helpers of _compile
_frequency: Any = None
_frequencies_of: Any = None
#: Status codes of a row: fine, NaN/+inf, only -inf, subnormals flushed.
OK, NOT_FINITE, ALL_NEG_INF, FLUSHED = 0, 1, 2, 3
_PROBE = np.array([2.0**-148, 2.0**-149], dtype=np.float32)


def frequency_tables(logits: np.ndarray, precision: int, cumulative: bool = False,
                     out: np.ndarray | None = None) -> np.ndarray:
    """int64 [R, V] frequency tables of float32 logits [R, V] (or their running sums),
    written into ``out`` when given (a decoder reuses one array for every step)."""
    kernels = _kernels()
    z = np.ascontiguousarray(logits, dtype=np.float32)
    if out is None:
        out = np.empty(z.shape, dtype=np.int64)
    if kernels is None or z.ndim != 2 or not _valid(precision, z.shape[-1]) or z.size == 0:
        table = logits_to_frequencies(z, precision)
        out[...] = np.cumsum(table, axis=-1) if cumulative else table
        return out
    status = np.empty(z.shape[0], dtype=np.int64)
    kernels.tables(z, precision, cumulative, WEIGHTS, _PROBE, out, status)
    _check(status, z, precision)
    return out


def token_intervals(logits: np.ndarray, tokens: np.ndarray, precision: int
                    ) -> tuple[np.ndarray, np.ndarray]:
    """(start, freq) int64 [R] of ``tokens[r]`` in row r's frequency table, for coding."""
    kernels = _kernels()
    z = np.ascontiguousarray(logits, dtype=np.float32)
    symbols = np.ascontiguousarray(tokens, dtype=np.int64)
    if kernels is None or z.ndim != 2 or not _valid(precision, z.shape[-1]) or z.size == 0:
        table = logits_to_frequencies(z, precision)
        ends = np.cumsum(table, axis=-1)
        rows = np.arange(len(symbols))
        freq = table[rows, symbols]
        return ends[rows, symbols] - freq, freq
    if len(symbols) != z.shape[0] or (symbols < 0).any() or (symbols >= z.shape[1]).any():
        raise ValueError("one token per row, each below the vocabulary size")
    start = np.empty(z.shape[0], dtype=np.int64)
    freq = np.empty(z.shape[0], dtype=np.int64)
    status = np.empty(z.shape[0], dtype=np.int64)
    kernels.intervals(z, symbols, precision, WEIGHTS, _PROBE, start, freq, status)
    _check(status, z, precision)
    return start, freq


def _valid(precision: int, vocab: int) -> bool:
    return MIN_PRECISION <= precision <= MAX_PRECISION and 0 < vocab < (1 << precision)


def _check(status: np.ndarray, z: np.ndarray, precision: int) -> None:
    if (status == FLUSHED).any():
        raise RuntimeError(
            "the CPU flushes subnormal floats to zero (FTZ/DAZ is on); llmarc's "
            "quantization needs IEEE gradual underflow")
    bad = np.flatnonzero(status != OK)
    if len(bad):
        logits_to_frequencies(z[bad], precision)  # raises the precise ValueError
        raise AssertionError("a row was refused that the reference accepts")  # pragma: no cover


def _kernels() -> Any:
    global _KERNELS
    if _KERNELS is None:  # several coding threads may ask first at once
        with _LAZY:
            if _KERNELS is None:
                try:
                    import numba
                except ImportError:
                    _KERNELS = False
                else:
                    _KERNELS = _compile(numba)
    return _KERNELS or None


def _compile(numba: Any) -> Any:  # pragma: no cover - compiled code is run, not traced
    # The helpers are module globals, not closure cells: numba keys its disk cache on a
    # hash of a kernel's closure, and a compiled function pickles differently in every
    # process, so as cells they forced a recompilation (seconds) in every process.
    global _weights_of, _frequency, _frequencies_of
    scale = float(LOG2E_SCALED)
    floor_exponent = float(MIN_EXPONENT)
    jit = numba.njit(fastmath=False, error_model="numpy", nogil=True, cache=True)

    @jit
    def weights_of(row, table, probe, weights):
        # w_v = WEIGHTS[-max(floor(float64(z_v - max z) * K), -10240)]; returns
        # (sum of w, first index of the maximum, status)
        vocab = row.shape[0]
        top = row[0]
        first = 0
        for v in range(vocab):
            x = row[v]
            if x != x:
                return 0, 0, NOT_FINITE
            if x > top:
                top = x
                first = v
        if top == np.inf:
            return 0, 0, NOT_FINITE
        if top == -np.inf:
            return 0, 0, ALL_NEG_INF
        if probe[0] - probe[1] == 0:
            return 0, 0, FLUSHED
        for v in range(vocab):  # the exponents first: without the lookup this vectorizes
            d = row[v] - top  # float32 subtraction
            weights[v] = np.int64(-max(np.floor(np.float64(d) * scale), floor_exponent))
        total = 0
        for v in range(vocab):
            w = table[np.uint64(weights[v])]  # unsigned: no negative-index test
            weights[v] = w
            total += w
        return total, first, OK

    @jit
    def frequency(w, spare, total, inverse):
        # 1 + floor(w * spare / total), exactly: a binary64 estimate (within one of the
        # quotient, which is below 2^28), corrected with integers (without branches, so
        # that the loop calling it vectorizes)
        n = w * spare
        q = np.int64(np.float64(n) * inverse)
        r = n - q * total
        return q - (r < 0) + (r >= total) + 1

    @jit
    def frequencies_of(row, precision, table, probe, out):
        # out <- the row's frequency table (spec §2); returns the row's status
        vocab = row.shape[0]
        total, first, state = _weights_of(row, table, probe, out)
        if state != OK:
            return state
        spare = (np.int64(1) << precision) - vocab
        inverse = 1.0 / np.float64(total)
        used = 0
        for v in range(vocab):
            f = _frequency(out[v], spare, total, inverse)
            out[v] = f
            used += f
        out[first] += (np.int64(1) << precision) - used
        return OK

    _weights_of, _frequency, _frequencies_of = weights_of, frequency, frequencies_of

    @numba.njit(fastmath=False, error_model="numpy", nogil=True, cache=True, parallel=True)
    def tables(z, precision, cumulative, table, probe, out, status):
        for r in numba.prange(z.shape[0]):
            row_out = out[r]
            status[r] = _frequencies_of(z[r], precision, table, probe, row_out)
            if cumulative and status[r] == OK:
                running = 0
                for v in range(row_out.shape[0]):
                    running += row_out[v]
                    row_out[v] = running

    @numba.njit(fastmath=False, error_model="numpy", nogil=True, cache=True, parallel=True)
    def intervals(z, symbols, precision, table, probe, start, freq, status):
        for r in numba.prange(z.shape[0]):
            row_out = np.empty(z.shape[1], dtype=np.int64)
            status[r] = _frequencies_of(z[r], precision, table, probe, row_out)
            if status[r] != OK:
                continue
            symbol = symbols[r]
            below = 0
            for v in range(symbol):
                below += row_out[v]
            start[r] = below
            freq[r] = row_out[symbol]

    class Kernels:
        pass

    kernels = Kernels()
    kernels.tables = tables
    kernels.intervals = intervals
    return kernels
