"""A byte-oriented range coder over integer frequency tables (spec/entropy.md §3).

LZMA's carry-handling range coder, widened so that large vocabularies keep precision:
the coding interval lives in a 56-bit window (``low``, plus a carry bit at 2^56) and the
range is renormalised to at least 2^48, so ``r = range >> P`` keeps >= 20 bits for any
precision P <= 28 and the truncation loss stays below 2^(P-48) of the interval per symbol.
A mixed table (spec/entropy.md §4) totals M <= 2^36 instead: ``r = range // M``, >= 12
bits, a loss below 2^-12 of the interval.

Why our own coder rather than constriction?  constriction quantizes float probabilities
with its own internal algorithm; llmarc needs the integer frequencies it specifies
itself, and a coder simple enough to specify byte for byte.  Its per-symbol cost (a few
Python integer operations) is small next to one model step.

Two departures from LZMA, both to save bytes on short streams (one stream per segment):

* LZMA's first output byte is always 0x00 (its cache starts as a dummy byte); here the
  first shift only fills the cache, since no carry can ever reach the first byte.
* The flush writes the value with the most trailing zero bits in the final interval and
  drops up to 7 trailing 0x00 bytes (the final window); the decoder reads at most those
  7 bytes past the end, as 0x00, and a stream that needs more is corrupt.  The bound
  makes the decoder's work proportional to the stream it was given (a hostile 4-byte
  stream cannot be decoded "forever" on implicit zeros), at a cost of about one byte
  per 65,536 streams; among the streams that keep that bound the result is the shortest
  (tests/test_entropy.py proves it against an unbounded-integer reference).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from llmarc.entropy.quantize import DEFAULT_PRECISION, MAX_PRECISION, MIN_PRECISION
from llmarc.errors import CorruptArchiveError

WINDOW_BITS = 56
WINDOW_MASK = (1 << WINDOW_BITS) - 1
TOP = 1 << 48  # renormalise while range < TOP
#: The largest table total (spec/entropy.md §3): r = range // total keeps >= 12 bits. A
#: table of 2^P is the model's; mixed tables (§4) total up to 4096 * 2^24.
MAX_TOTAL = 1 << 36
FF_THRESHOLD = 0xFF << 48  # low >= this (and no carry): the top byte is 0xFF, still open
INITIAL_RANGE = WINDOW_MASK
WINDOW_BYTES = WINDOW_BITS // 8
#: Bytes a decoder may read past the end of a stream (as 0x00): the final window only.
MAX_IMPLICIT_ZEROS = WINDOW_BYTES


def _check_precision(precision: int) -> int:
    if not MIN_PRECISION <= precision <= MAX_PRECISION:
        raise ValueError(f"precision must be in {MIN_PRECISION}..{MAX_PRECISION}, not {precision}")
    return precision


class RangeEncoder:
    """Encode symbols given (cumulative start, frequency) out of a total of 2^precision.

    One encoder makes one independent stream; call :meth:`finish` once at the end."""

    __slots__ = ("_cache", "_out", "_pending", "low", "precision", "range", "total")

    def __init__(self, precision: int = DEFAULT_PRECISION) -> None:
        self.precision = _check_precision(precision)
        self.total = 1 << precision
        self.low = 0  # < 2^57: the 56-bit window plus a carry bit
        self.range = INITIAL_RANGE
        self._cache: int | None = None  # the byte that a carry may still increment
        self._pending = 0  # 0xFF bytes after the cache, also reachable by a carry
        self._out = bytearray()

    def _shift_low(self) -> None:
        """Move the window's top byte out (into cache/pending until no carry can reach it)."""
        low = self.low
        if self._cache is None:  # first byte: the coded number is < 1, no carry reaches it
            self._cache = low >> 48
        elif low < FF_THRESHOLD or low > WINDOW_MASK:  # top byte final, or a carry arrived
            carry = low >> WINDOW_BITS
            self._out.append((self._cache + carry) & 0xFF)
            if self._pending:
                self._out += bytes([(0xFF + carry) & 0xFF]) * self._pending
                self._pending = 0
            self._cache = (low >> 48) & 0xFF
        else:  # top byte 0xFF: a later carry would turn it (and the cache's +1) over
            self._pending += 1
        self.low = (low << 8) & WINDOW_MASK

    def encode(self, start: int, freq: int, total: int | None = None) -> None:
        """Narrow the interval to [start, start + freq) of ``total`` (default 2^precision;
        at most MAX_TOTAL: a mixed table's, spec/entropy.md §4).

        Raises ValueError for an empty or out-of-range sub-interval (a zero frequency
        would otherwise make the renormalisation loop forever)."""
        if total is None:
            total, r = self.total, self.range >> self.precision
        elif 1 <= total <= MAX_TOTAL:
            r = self.range // total
        else:
            raise ValueError(f"table total {total} outside 1..2^36")
        if freq <= 0 or start < 0 or start + freq > total:
            raise ValueError(f"bad interval [{start}, {start + freq}) of {total}")
        self.low += r * start
        rng = r * freq  # >= r >= 2^12: at most 5 shifts below
        while rng < TOP:
            self._shift_low()
            rng <<= 8
        self.range = rng

    def encode_symbol(self, freqs: np.ndarray, symbol: int) -> None:
        """Encode ``symbol`` of a full frequency table (all >= 1, sum 2^precision)."""
        self.encode(int(freqs[:symbol].sum()), int(freqs[symbol]))

    def finish(self) -> bytes:
        """Flush the shortest tail that pins the interval; return the whole stream.

        The encoder must not be used afterwards."""
        low = self.low
        high = low + self.range - 1
        value = low
        for shift in range(64, -1, -1):  # the value with the most trailing zero bits
            value = (high >> shift) << shift
            if value >= low:
                break
        self.low = value  # may be >= 2^56: the carry is handled by _shift_low
        for _ in range(WINDOW_BYTES + 1):  # the window's 7 bytes, then the cache
            self._shift_low()
        out = bytes(self._out)  # 7 + n bytes for n renormalisation shifts
        keep = max(len(out.rstrip(b"\x00")), len(out) - MAX_IMPLICIT_ZEROS)
        return out[:keep]


class RangeDecoder:
    """Decode symbols from a stream made by :class:`RangeEncoder` with the same tables.

    The decoder must be told how many symbols to decode.  Up to MAX_IMPLICIT_ZEROS
    bytes past the end read as 0x00; needing one more raises CorruptArchiveError, so
    decoding a stream of ``len`` bytes shifts in at most ``len`` bytes after the first 7
    and its cost is bounded by the stream, not by a claimed symbol count.  Invariant
    after every successful decode: ``0 <= code < range``; a stream that breaks it raises
    CorruptArchiveError."""

    __slots__ = ("code", "data", "limit", "position", "precision", "range")

    def __init__(self, data: bytes, precision: int = DEFAULT_PRECISION) -> None:
        self.data = bytes(data)
        self.precision = _check_precision(precision)
        head = self.data[:WINDOW_BYTES].ljust(WINDOW_BYTES, b"\x00")
        self.code = int.from_bytes(head, "big")
        self.position = WINDOW_BYTES
        self.limit = len(self.data) + MAX_IMPLICIT_ZEROS  # first position never readable
        self.range = INITIAL_RANGE

    def decode_cumulative(self, cumulative: np.ndarray) -> int:
        """Decode one symbol given ``cumulative = cumsum(freqs)`` (last value 2^precision).

        Use this when the cumulative sums are at hand (e.g. one ``np.cumsum(axis=-1)`` per
        batch); :meth:`decode` computes them from the frequencies."""
        r = self.range >> self.precision
        target = self.code // r
        if target >> self.precision:  # code >= r * 2^P: no encoder makes that
            raise CorruptArchiveError("range decoder out of bounds (corrupt llm stream)")
        symbol = int(np.searchsorted(cumulative, target, side="right"))
        if symbol >= len(cumulative):
            raise ValueError("frequency table does not sum to 2^precision")
        self._narrow(r, cumulative, symbol)
        return symbol

    def decode_mixed(self, cumulative_of: Callable[[], np.ndarray], total: int) -> int:
        """Decode one symbol of a table of ``total`` (at most MAX_TOTAL) whose running
        sums ``cumulative_of()`` makes only when needed: a stream that is out of bounds
        fails before the table is built."""
        r = self.range // total
        target = self.code // r
        if target >= total:  # code >= r * total: no encoder makes that
            raise CorruptArchiveError("range decoder out of bounds (corrupt llm stream)")
        cumulative = cumulative_of()
        symbol = int(np.searchsorted(cumulative, target, side="right"))
        if symbol >= len(cumulative) or int(cumulative[-1]) != total:
            raise ValueError("frequency table does not sum to its total")
        self._narrow(r, cumulative, symbol)
        return symbol

    def _narrow(self, r: int, cumulative: np.ndarray, symbol: int) -> None:
        """Keep the symbol's part of the interval and shift in the bytes it frees."""
        end = int(cumulative[symbol])
        start = int(cumulative[symbol - 1]) if symbol else 0
        code = self.code - r * start  # 0 <= code < r * freq: the invariant holds
        rng = r * (end - start)
        while rng < TOP:
            position = self.position
            if position >= self.limit:
                raise CorruptArchiveError(
                    "range decoder read past the end of its stream (corrupt llm stream)")
            code = (code << 8) | (self.data[position] if position < len(self.data) else 0)
            self.position = position + 1
            rng <<= 8
        self.code = code
        self.range = rng

    def decode(self, freqs: np.ndarray) -> int:
        """Decode one symbol of a full frequency table (all >= 1, sum 2^precision)."""
        return self.decode_cumulative(np.cumsum(freqs))
