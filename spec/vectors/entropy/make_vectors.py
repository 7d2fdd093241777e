#!/usr/bin/env python3
"""Generate the model-free entropy-coding vectors (spec/entropy.md §4).

    python spec/vectors/entropy/make_vectors.py [OUTPUT_DIR]

Deterministic (seeded numpy generator, no model); tests/test_entropy_vectors.py checks
every file both ways and that re-running this script reproduces the committed files.
Logits are written as the hex bit patterns of binary32 values.

The carry vector is made adversarially: the symbol chosen is the one whose sub-interval
contains the "roundest" point of the current interval (the value with the most trailing
zero bits), which keeps the encoder undecided on a run of 0xFF bytes; then a symbol just
above that point (a carry ripples through the run) or just below it (the run is emitted
as 0xFF).  The script asserts that the runs and carries really happen.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parents[2]))

from llmarc.entropy import RangeEncoder, logits_to_frequencies  # noqa: E402
from llmarc.entropy.mixing import NgramMixer  # noqa: E402
from llmarc.entropy.rangecoder import WINDOW_MASK  # noqa: E402


class ProbeEncoder(RangeEncoder):
    """A RangeEncoder that records carries and pending-0xFF runs (for the assertions)."""

    __slots__ = ("carry_runs", "longest_run")

    def __init__(self, precision: int) -> None:
        super().__init__(precision)
        self.carry_runs: list[int] = []  # pending 0xFF count at each carry
        self.longest_run = 0

    def _shift_low(self) -> None:
        if self._cache is not None and self.low > WINDOW_MASK:
            self.carry_runs.append(self._pending)
        self.longest_run = max(self.longest_run, self._pending)
        super()._shift_low()


def bits(row: np.ndarray) -> list[str]:
    return [f"{int(b):08x}" for b in np.asarray(row, dtype=np.float32).view(np.uint32)]


def quantize_vector(name: str, rows: np.ndarray, precision: int, why: str) -> tuple[str, dict]:
    freqs = logits_to_frequencies(rows, precision)
    return name, {
        "why": why,
        "precision": precision,
        "logits_f32_hex": [bits(r) for r in rows],
        "frequencies": freqs.tolist(),
    }


def encode(tables: np.ndarray, symbols: list[int], precision: int) -> tuple[bytes, ProbeEncoder]:
    encoder = ProbeEncoder(precision)
    for table, symbol in zip(tables, symbols, strict=True):
        encoder.encode_symbol(table, symbol)
    return encoder.finish(), encoder


def trace_vector(name: str, tables: np.ndarray, symbols: list[int], precision: int,
                 why: str) -> tuple[str, dict]:
    stream, _ = encode(tables, symbols, precision)
    return name, {
        "why": why,
        "precision": precision,
        "frequencies": np.asarray(tables).tolist(),
        "symbols": symbols,
        "stream_hex": stream.hex(),
    }


def mix_vector(name: str, tables: np.ndarray, history: list[int], symbols: list[int],
               precision: int, order: int, why: str) -> tuple[str, dict]:
    """entropy.md §4: the tables mixed with the counts of ``history`` and the symbols
    before each, every total, interval and weight written down, and the stream."""
    mixer = NgramMixer(history, order, precision, tables.shape[1])
    encoder = RangeEncoder(precision)
    totals, intervals, weights = [], [], []
    for table, symbol in zip(tables, symbols, strict=True):
        start = int(table[:symbol].sum())
        start, freq, total = mixer.interval(symbol, start, int(table[symbol]))
        encoder.encode(start, freq, total)
        totals.append(total)
        intervals.append([start, freq])
        weights.append(mixer.u)
    return name, {
        "why": why,
        "precision": precision,
        "order": order,
        "frequencies": np.asarray(tables).tolist(),
        "history": history,
        "symbols": symbols,
        "totals": totals,
        "intervals": intervals,
        "weights": weights,
        "stream_hex": encoder.finish().hex(),
    }


def phrases(rng: np.random.Generator, vocab: int, count: int, repeat: float) -> list[int]:
    """Tokens made of a few recurring phrases (probability ``repeat``) and noise."""
    book = [rng.integers(vocab, size=int(rng.integers(2, 7))).tolist() for _ in range(8)]
    out: list[int] = []
    while len(out) < count:
        out += book[int(rng.integers(8))] if rng.random() < repeat else [int(rng.integers(vocab))]
    return out[:count]


def roundest_symbol(encoder: RangeEncoder, cumulative: np.ndarray) -> int | None:
    """The symbol whose sub-interval holds the value with the most trailing zero bits."""
    low, high = encoder.low, encoder.low + encoder.range - 1
    for shift in range(64, -1, -1):
        point = (high >> shift) << shift
        if point >= low:
            break
    offset = (point - low) // (encoder.range >> encoder.precision)
    if offset >= cumulative[-1]:
        return None
    return int(np.searchsorted(cumulative, offset, side="right"))


def carry_trace(rng: np.random.Generator, vocab: int, count: int, precision: int,
                stretch: int) -> tuple[np.ndarray, list[int]]:
    tables = logits_to_frequencies(rng.normal(size=(count, vocab)).astype(np.float32), precision)
    encoder, symbols = RangeEncoder(precision), []
    for i, table in enumerate(tables):
        symbol = roundest_symbol(encoder, np.cumsum(table))
        phase, cycle = i % (stretch + 10), i // (stretch + 10)
        if symbol is None or phase > stretch:
            symbol = int(rng.integers(vocab))
        elif phase == stretch:  # resolve the run: up (carry) on even cycles, down on odd
            symbol = min(symbol + 1, vocab - 1) if cycle % 2 == 0 else max(symbol - 1, 0)
        symbols.append(symbol)
        encoder.encode_symbol(table, symbol)
    return tables, symbols


def bad_midstream(rng: np.random.Generator) -> dict:
    """A stream that decodes 3 symbols, then lands in the 4th step's dead zone.

    With r = range >> P the sub-intervals cover [0, r * 2^P) of the range; a code in
    [r * 2^P, range) belongs to no symbol.  The stream is built with unbounded integers:
    encode 3 symbols, then take the value at the start of that dead zone."""
    precision = 12
    while True:
        tables = logits_to_frequencies(rng.normal(size=(4, 3)).astype(np.float32) * 3, precision)
        symbols = [int(rng.integers(3)) for _ in range(3)]
        low, size, shifts = 0, WINDOW_MASK, 0
        for table, symbol in zip(tables[:3], symbols, strict=True):
            r = size >> precision
            low, size = low + r * int(table[:symbol].sum()), r * int(table[symbol])
            while size < 1 << 48:
                low, size, shifts = low << 8, size << 8, shifts + 1
        if size & ((1 << precision) - 1):  # a non-empty dead zone
            break
    value = low + (size >> precision << precision)
    full = value.to_bytes(7 + shifts, "big")
    stream = full[:max(len(full.rstrip(b"\x00")), shifts)]  # at most 7 implicit zeros
    return {
        "why": f"decodes {symbols} then hits the dead zone [r*2^P, range); MUST fail",
        "precision": precision,
        "frequencies": tables.tolist(),
        "stream_hex": stream.hex(),
        "error": "CorruptArchiveError",
    }


def main(out: Path = HERE) -> None:
    rng = np.random.default_rng(20261124)
    extra = np.random.default_rng(20261125)  # for the later vectors: the first stay as they were
    inf, tiny = np.float32(np.inf), np.float32(2.0**-149)
    big = np.finfo(np.float32).max
    vectors = [
        quantize_vector("quantize-small.json", np.array(
            [[0.0, 1.0, 2.0, 3.0, 4.0], [5.5, 5.5, -1.0, 0.25, 5.5],
             [-inf, 3.0, -inf, -inf, 2.0], [1e30, -1e30, 0.0, 7.0, 1e30]], dtype=np.float32),
            12, "V = 5: a ramp, a three-way tie (first wins the remainder), -inf, huge spread"),
        quantize_vector("quantize-edge.json", np.array(
            [[-0.0, 0.0, -tiny, tiny, 0.0], [big, -big, big, 0.0, -inf],
             [2.0, 2.0, 2.0, 2.0, 2.0], [0.0, -27.72588, -27.725887, -27.7259, -1e-7]],
            dtype=np.float32),
            12, "V = 5: signed zeros and subnormals (d = -2^-149 gives x = -1), float32 "
                "max/overflowing difference, all equal, around the -10240 clamp"),
        quantize_vector("quantize-tight.json",
                        (extra.normal(size=(2, 4095)) * 3).astype(np.float32),
                        12, "V = 4095, P = 12: A = 2^P - V = 1, every f is 1 but the argmax's"),
        quantize_vector("quantize-300.json",
                        (rng.normal(size=(3, 300)) * [[1.0], [6.0], [40.0]]).astype(np.float32),
                        16, "V = 300, three temperatures"),
        quantize_vector("quantize-1000.json",
                        (rng.standard_t(3, size=(2, 1000)) * 4).astype(np.float32),
                        24, "V = 1000, heavy-tailed logits, P = 24"),
    ]
    for name, vocab, count, precision, sharp, why in (
        ("trace-7.json", 7, 300, 16, 1.0, "V = 7, 300 tokens of moderately skewed tables"),
        ("trace-300.json", 300, 200, 24, 4.0, "V = 300, 200 tokens, P = 24"),
        ("trace-skewed.json", 5, 3000, 24, 5.0,
         "V = 5, 3000 skewed tokens, many near-certain (short carries)"),
    ):
        logits = (rng.normal(size=(count, vocab)) * sharp).astype(np.float32)
        tables = logits_to_frequencies(logits, precision)
        symbols = [int(rng.choice(vocab, p=t / t.sum())) for t in tables]
        vectors.append(trace_vector(name, tables, symbols, precision, why))
    tables, symbols = carry_trace(extra, 7, 400, 16, 120)
    _, probe = encode(tables, symbols, 16)
    assert max(probe.carry_runs) >= 30 and probe.longest_run >= 30, probe.carry_runs
    vectors.append(trace_vector(
        "trace-carry.json", tables, symbols, 16,
        f"V = 7, 400 adversarial tokens: 0xFF runs of up to {probe.longest_run} bytes, "
        f"resolved alternately by a carry through {max(probe.carry_runs)} pending bytes "
        "and without one"))
    vectors.append(trace_vector("trace-empty.json", np.zeros((0, 3), dtype=np.int64), [], 12,
                                "no symbols: the empty stream"))
    certain = np.array([[1, 1, (1 << 12) - 2]] * 50, dtype=np.int64)
    vectors.append(trace_vector("trace-first.json", certain[:, ::-1].copy(), [0] * 50, 12,
                                "50 near-certain first symbols: low stays 0, the stream is empty"))
    vectors.append(("bad-out-of-bounds.json", {
        "why": "an all-0xFF stream: the first target is >= 2^P; decoding MUST fail",
        "precision": 16,
        "frequencies": [[1 << 15, 1 << 15]],
        "stream_hex": "ff" * 8,
        "error": "CorruptArchiveError",
    }))
    vectors.append(("bad-midstream.json", bad_midstream(extra)))
    halves = np.array([[1 << 11, 1 << 11]] * 8, dtype=np.int64)
    vectors.append(trace_vector("trace-zero-byte.json", halves, [0] * 8, 12,
                                "8 one-bit first symbols: one shift, so the stream is one 0x00 "
                                "byte (only the final window's 7 zeros are implicit)"))
    vectors.append(("bad-past-end.json", {
        "why": "the empty stream with 8 one-bit symbols: the 8th needs an 8th byte, past the "
               "7 implicit zeros; decoding MUST fail",
        "precision": 12,
        "frequencies": halves.tolist(),
        "stream_hex": "",
        "error": "CorruptArchiveError",
    }))
    mixing = np.random.default_rng(20261204)  # the mixer's (entropy.md §4, version 1.1)
    for name, vocab, count, precision, order, repeat, history, why in (
        ("mix-phrases.json", 40, 240, 16, 3, 0.9, 80,
         "V = 40, K = 3, 80 tokens of history: recurring phrases, the weight rises"),
        ("mix-noise.json", 300, 160, 20, 1, 0.0, 0,
         "V = 300, K = 1, no history, random tokens that the model's tables favour: the "
         "weight stays low"),
        ("mix-order4.json", 1000, 200, 24, 4, 0.97, 300,
         "V = 1000, K = 4, P = 24: near-certain phrases, totals near 2^36"),
    ):
        logits = mixing.normal(size=(count, vocab)) * 3
        tokens = phrases(mixing, vocab, history + count, repeat)
        logits[np.arange(count), tokens[history:]] += 6  # a model that often knows
        tables = logits_to_frequencies(logits.astype(np.float32), precision)
        vectors.append(mix_vector(name, tables, tokens[:history], tokens[history:],
                                  precision, order, why))
    vectors.append(("bad-mix-out-of-bounds.json", {
        "why": "an all-0xFF stream with a mixed table (K = 2, no history): the first target "
               "is >= M; decoding MUST fail",
        "precision": 12,
        "order": 2,
        "history": [],
        "frequencies": [[1 << 11, 1 << 11]],
        "stream_hex": "ff" * 8,
        "error": "CorruptArchiveError",
    }))
    lines = ["# Entropy-coding vectors", "",
             "Generated by `make_vectors.py` here (seeded, deterministic); the algorithms are "
             "spec/entropy.md §2, §3 and §4 (the `mix-` ones). Logits are binary32 bit "
             "patterns in hex.", ""]
    out.mkdir(parents=True, exist_ok=True)
    for name, data in vectors:
        (out / name).write_text(json.dumps(data, separators=(",", ":")) + "\n")
        lines.append(f"* `{name}` — {data['why']}")
    (out / "README.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {len(vectors)} vectors to {out}")


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
