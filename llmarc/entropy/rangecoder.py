"""A byte-oriented range coder over integer frequency tables (spec/entropy.md §3).

LZMA's carry-handling range coder, widened so that large vocabularies keep precision:
the coding interval lives in a 56-bit window (``low``, plus a carry bit at 2^56) and the
range is renormalised to at least 2^48, so ``r = range >> P`` keeps >= 20 bits for any
precision P <= 28 and the truncation loss stays below 2^-20 per symbol.

Why our own coder rather than constriction?  constriction quantizes float probabilities
with its own internal algorithm; llmarc needs the integer frequencies it specifies
itself, and a coder simple enough to specify byte for byte.  Its per-symbol cost (a few
Python integer operations) is small next to one model step.

The encoder's flush writes the shortest byte string that identifies the final interval,
and drops trailing zero bytes; the decoder reads bytes past the end as zeros.
"""

from __future__ import annotations

import numpy as np

from llmarc.errors import CorruptArchiveError

WINDOW_BITS = 56
WINDOW_MASK = (1 << WINDOW_BITS) - 1
TOP = 1 << 48  # renormalise while range < TOP
FF_THRESHOLD = 0xFF << 48
INITIAL_RANGE = WINDOW_MASK
WINDOW_BYTES = WINDOW_BITS // 8


class RangeEncoder:
    """Encode symbols given (cumulative start, frequency) out of a total of 2^precision."""

    def __init__(self, precision: int = 24) -> None:
        self.precision = precision
        self.low = 0
        self.range = INITIAL_RANGE
        self._cache: int | None = None  # the byte that a carry may still increment
        self._pending = 0  # 0xFF bytes after the cache, also reachable by a carry
        self._out = bytearray()

    def _shift_low(self) -> None:
        low = self.low
        if self._cache is None:  # first byte: nothing before it can take a carry
            self._cache = low >> 48
        elif low < FF_THRESHOLD or low > WINDOW_MASK:
            carry = low >> WINDOW_BITS
            self._out.append((self._cache + carry) & 0xFF)
            if self._pending:
                self._out += bytes([(0xFF + carry) & 0xFF]) * self._pending
                self._pending = 0
            self._cache = (low >> 48) & 0xFF
        else:
            self._pending += 1
        self.low = (low << 8) & WINDOW_MASK

    def encode(self, start: int, freq: int) -> None:
        """Narrow the interval to [start, start + freq) of 2^precision."""
        r = self.range >> self.precision
        self.low += r * start
        self.range = r * freq
        while self.range < TOP:
            self._shift_low()
            self.range <<= 8

    def encode_symbol(self, freqs: np.ndarray, symbol: int) -> None:
        """Encode ``symbol`` of a full frequency table (sums to 2^precision)."""
        self.encode(int(freqs[:symbol].sum()), int(freqs[symbol]))

    def finish(self) -> bytes:
        """Flush the shortest tail that pins the interval; return the whole stream."""
        high = self.low + self.range - 1
        for shift in range(WINDOW_BITS + 8, -1, -1):  # most trailing zero bits first
            value = (high >> shift) << shift
            if value >= self.low:
                break
        self.low = value
        for _ in range(WINDOW_BYTES + 1):  # the window's bytes, then the cache
            self._shift_low()
        return bytes(self._out).rstrip(b"\x00")


class RangeDecoder:
    """Decode symbols from a stream made by :class:`RangeEncoder` with the same tables."""

    def __init__(self, data: bytes, precision: int = 24) -> None:
        self.data = data
        self.precision = precision
        head = data[:WINDOW_BYTES].ljust(WINDOW_BYTES, b"\x00")
        self.code = int.from_bytes(head, "big")
        self.position = WINDOW_BYTES
        self.range = INITIAL_RANGE

    def _next_byte(self) -> int:
        position = self.position
        self.position += 1
        return self.data[position] if position < len(self.data) else 0

    def decode_cumulative(self, cumulative: np.ndarray) -> int:
        """Decode one symbol given ``cumulative = cumsum(freqs)`` (last value 2^precision)."""
        r = self.range >> self.precision
        target = self.code // r
        if target >> self.precision:
            raise CorruptArchiveError("range decoder ran out of bounds (corrupt stream)")
        symbol = int(np.searchsorted(cumulative, target, side="right"))
        end = int(cumulative[symbol])
        start = int(cumulative[symbol - 1]) if symbol else 0
        self.code -= r * start
        self.range = r * (end - start)
        while self.range < TOP:
            self.code = (self.code << 8) | self._next_byte()
            self.range <<= 8
        return symbol

    def decode(self, freqs: np.ndarray) -> int:
        """Decode one symbol of a full frequency table."""
        return self.decode_cumulative(np.cumsum(freqs))
