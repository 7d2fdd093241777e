"""spec/entropy.md §4: the adaptive n-gram mixer, in integers.

Why a mixer at all: the model sees at most its window, and nothing learns from the file
being coded, so a name or phrase repeated a hundred times costs the hundredth time what
it cost the first.  Token n-gram counts over the text already coded know it; mixed into
the model's table by one adaptive weight they saved 2.9 % on alice29.txt alone and 1.2 %
on top of context carry (benchmarks/results/ratio_options.md).

Why this shape (every choice serves bit-exact decoding on any machine):

* the counts are a function of the tokens alone, so a segment's mixer is rebuilt from
  the tokens of its chain before it (``history``): segments stay jobs that a thread or a
  Ray worker can take on their own, with nothing to send back but tokens;
* the weight restarts at every segment for the same reason (the ratio study's "W = 1"
  rows: restarting it costs 0.001 bits/byte on alice29);
* the mixed table is ``alpha * F + sum_o beta_o * c_o`` with integer weights, total
  ``M = alpha * 2^P + sum_o beta_o * n_o`` (at most 2^36): no division per symbol, so
  the encoder needs only the coded token's interval of F (as without mixing) and sparse
  sums over the tokens the contexts have seen, and the range coder codes against M
  (entropy.md §3 allows totals up to 2^36);
* the weight's update is one exact integer quotient (Python's integers; 77 bits at most).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from llmarc.entropy.rangecoder import RangeDecoder

#: The highest n-gram order a profile may ask for (``mix``), and the orders llmarc
#: writes: order 3 gave the measured gains; 4 is allowed for writers that tune.
MAX_ORDER = 4
DEFAULT_ORDER = 3
#: Precision limit with mixing: M <= 4096 * 2^P must stay within the coder's 2^36.
MAX_MIX_PRECISION = 24
WEIGHT_BITS = 12  # the n-gram weight w is in 1/4096
ESCAPE_ONE = 1 << 16  # escapes are in 1/65,536
#: The weight's state u (stretch(w) in 1/65,536) at each segment's start: w = 74/4096.
U_START = -4 << 16
U_LIMIT = 2047 << 8
#: squash(d) = 4096 / (1 + e^(-d/256)) at d = 128 (k - 16), k = 0..32, rounded and
#: kept in 1..4095 (entropy.md §4.1); SQUASH interpolates between them.
SQUASH_POINTS = (1, 2, 4, 6, 10, 17, 27, 45, 74, 120, 194, 311, 488, 747, 1102, 1546,
                 2048, 2550, 2994, 3349, 3608, 3785, 3902, 3976, 4022, 4051, 4069, 4079,
                 4086, 4090, 4092, 4094, 4095)


#: A position's weights (§4.3 steps 1-2): w, alpha, [(beta_o, n_o, counts_o)] for the
#: orders o >= 1 that take part, beta_0.
Weights = tuple[int, int, list[tuple[int, int, dict[int, int]]], int]


def squash(d: int) -> int:
    """The n-gram weight (1/4096) for a stretch of ``d`` / 256, d in -2047..2047."""
    d = min(max(d, -2047), 2047)
    index, fraction = (d >> 7) + 16, d & 127
    return (SQUASH_POINTS[index] * (128 - fraction)
            + SQUASH_POINTS[index + 1] * fraction + 64) >> 7


class NgramMixer:
    """One segment's mixer: the counts of its chain's tokens so far and the weight.

    ``history`` is the chain's tokens before the segment (spec/llm-codec.md §3.6); the
    segment's own tokens are added as they are coded.  Not thread-safe: one segment is
    coded by one thread."""

    __slots__ = ("_counts", "_dense", "_distinct", "_mix", "one", "order", "tokens", "u")

    def __init__(self, history: Sequence[int], order: int, precision: int, vocab: int) -> None:
        if not 1 <= order <= MAX_ORDER:
            raise ValueError(f"n-gram order {order} outside 1..{MAX_ORDER}")
        if precision > MAX_MIX_PRECISION:
            raise ValueError(f"mixing needs a precision of at most {MAX_MIX_PRECISION}")
        self.order = order
        self.one = 1 << precision  # F's total
        self.tokens: list[int] = []
        #: Order 0 as a dense array (its support grows with the text), the others as
        #: {context: [n, {token: count}]}.
        self._dense = np.zeros(vocab, dtype=np.int64)
        self._distinct = 0
        self._counts: list[dict[tuple[int, ...], list]] = [{} for _ in range(order)]
        self._mix: Weights | None = None  # the next position's, once computed
        for token in (int(t) for t in history):
            self._count(token)
        self.u = U_START

    # ------------------------------------------------------------------ the state
    def _count(self, token: int) -> None:
        """Add the token at the next position to every order's counts (§4.3 step 6)."""
        tokens = self.tokens
        position = len(tokens)
        if not self._dense[token]:
            self._distinct += 1
        self._dense[token] += 1
        for o in range(1, min(self.order, position) + 1):
            entry = self._counts[o - 1].setdefault(tuple(tokens[position - o:]), [0, {}])
            entry[0] += 1
            seen = entry[1]
            seen[token] = seen.get(token, 0) + 1
        tokens.append(token)

    def _weights(self) -> Weights:
        """The next position's weights (§4.3 steps 1-2)."""
        tokens = self.tokens
        position = len(tokens)
        one = self.one
        rem = ESCAPE_ONE
        w = squash(self.u >> 8)
        sparse: list[tuple[int, int, dict[int, int]]] = []
        for o in range(min(self.order, position), 0, -1):
            entry = self._counts[o - 1].get(tuple(tokens[position - o:]))
            if entry is None:
                continue
            n, seen = entry
            escape = rem * n // (n + len(seen))
            rem -= escape
            sparse.append((w * escape * one // (ESCAPE_ONE * n), n, seen))
        beta0 = 0
        if position:
            escape = rem * position // (position + self._distinct)
            rem -= escape
            beta0 = w * escape * one // (ESCAPE_ONE * position)
        alpha = (1 << WEIGHT_BITS) - w + w * rem // ESCAPE_ONE
        return w, alpha, sparse, beta0

    def _total(self) -> int:
        """M, the mixed table's total, at the next position (§4.3 step 3); keeps the
        position's weights for the coding and learning that follow."""
        _w, alpha, sparse, beta0 = self._mix = self._weights()
        return (alpha * self.one + beta0 * len(self.tokens)
                + sum(beta * n for beta, n, _seen in sparse))

    # ------------------------------------------------------------------ coding
    def interval(self, token: int, start: int, freq: int) -> tuple[int, int, int]:
        """(start, freq, total) of ``token`` in the mixed table, given its interval
        [start, start + freq) in F; then learns from it (encoder)."""
        total = self._total()
        _w, alpha, sparse, beta0 = self._mix  # type: ignore[misc]
        below = alpha * start + beta0 * int(self._dense[:token].sum())
        mixed = alpha * freq + beta0 * int(self._dense[token])
        for beta, _n, seen in sparse:
            below += beta * sum(count for t, count in seen.items() if t < token)
            mixed += beta * seen.get(token, 0)
        self._learn(token, freq, mixed, total)
        return below, mixed, total

    def _cumulative(self, ends: np.ndarray) -> np.ndarray:
        """The mixed table's running sums (int64 [V], last = M) from F's (``ends``), for
        the decoder's search, with the weights :meth:`_total` kept."""
        _w, alpha, sparse, beta0 = self._mix  # type: ignore[misc]
        extra = self._dense * beta0 if beta0 else np.zeros_like(self._dense)
        for beta, _n, seen in sparse:
            if beta:  # a context's tokens are distinct: a fancy-index add is exact
                size = len(seen)
                extra[np.fromiter(seen.keys(), np.int64, size)] += \
                    beta * np.fromiter(seen.values(), np.int64, size)
        return np.cumsum(extra, out=extra) + alpha * ends

    def decode(self, decoder: RangeDecoder, ends: np.ndarray) -> int:
        """Decode the next token from F's running sums ``ends``; then learn from it."""
        total = self._total()
        table: list[np.ndarray] = []

        def cumulative() -> np.ndarray:
            table.append(self._cumulative(ends))
            return table[0]

        token = decoder.decode_mixed(cumulative, total)
        mixed = int(table[0][token]) - (int(table[0][token - 1]) if token else 0)
        freq = int(ends[token]) - (int(ends[token - 1]) if token else 0)
        self._learn(token, freq, mixed, total)
        return token

    def _learn(self, token: int, freq: int, mixed: int, total: int) -> None:
        """§4.3 steps 5-6: the weight follows the log-loss gradient, the counts the token.

        With p = freq / 2^P (the model) and q = mixed / total (the mix), d log q / d
        stretch(w) = (1 - w)(1 - p / q): a step of that, in 1/65,536 stretch units."""
        w = self._mix[0]  # type: ignore[index]
        scale = mixed * self.one
        step = (16 * ((1 << WEIGHT_BITS) - w) * (scale - freq * total)) // scale
        self.u = min(max(self.u + step, -U_LIMIT), U_LIMIT)
        self._mix = None
        self._count(token)
