"""The entropy layers: exact roundtrips, near-ideal length, and quantization invariants."""

from __future__ import annotations

import math
from decimal import Decimal, getcontext

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmarc.entropy import RangeDecoder, RangeEncoder, logits_to_frequencies
from llmarc.entropy.quantize import EXP2_TABLE, LOG2E_SCALED
from llmarc.errors import CorruptArchiveError


@st.composite
def tables_and_symbols(draw):
    """Random frequency tables (each >= 1, sum 2^P) with symbols drawn from them."""
    precision = draw(st.integers(12, 28))
    vocab = draw(st.integers(1, 64))
    count = draw(st.integers(0, 120))
    seed = draw(st.integers(0, 2**32 - 1))
    skew = draw(st.sampled_from([0.0, 1.0, 8.0, 40.0]))
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(count, vocab)) * skew).astype(np.float32)
    if vocab == 1:
        tables = np.full((count, 1), 1 << precision, dtype=np.int64)
    else:
        tables = logits_to_frequencies(logits, precision) if count else np.zeros((0, vocab))
    symbols = [int(rng.choice(vocab, p=t / t.sum())) for t in tables]
    return precision, tables.astype(np.int64), symbols


@settings(max_examples=150, deadline=None)
@given(tables_and_symbols())
def test_range_coder_roundtrips_within_the_ideal_length(case) -> None:
    precision, tables, symbols = case
    encoder = RangeEncoder(precision)
    for table, symbol in zip(tables, symbols, strict=True):
        encoder.encode_symbol(table, symbol)
    stream = encoder.finish()
    decoder = RangeDecoder(stream, precision)
    assert [decoder.decode(t) for t in tables] == symbols
    ideal = sum(-math.log2(t[s] / 2**precision) for t, s in zip(tables, symbols, strict=True))
    assert len(stream) * 8 <= ideal + 0.01 * len(symbols) + 24
    assert not stream.endswith(b"\x00")  # trailing zeros are implicit


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 40), st.integers(0, 2**32 - 1))
def test_extreme_skew_and_long_runs(vocab: int, seed: int) -> None:
    """One symbol with almost all of 2^P: thousands of near-free symbols, then surprises."""
    rng = np.random.default_rng(seed)
    precision = 16
    table = np.ones(vocab, dtype=np.int64)
    table[0] = 2**precision - (vocab - 1)
    symbols = [0 if rng.random() < 0.98 else int(rng.integers(1, vocab)) for _ in range(3000)]
    encoder = RangeEncoder(precision)
    for symbol in symbols:
        encoder.encode_symbol(table, symbol)
    decoder = RangeDecoder(encoder.finish(), precision)
    assert [decoder.decode(table) for _ in symbols] == symbols


def test_out_of_bounds_stream_is_a_typed_error() -> None:
    with pytest.raises(CorruptArchiveError):
        RangeDecoder(b"\xff" * 8, 16).decode(np.array([2**15, 2**15]))


def test_exp2_table_is_exactly_rounded() -> None:
    getcontext().prec = 60
    for r in range(256):
        exact = Decimal(2) ** (Decimal(31) - Decimal(r) / 256)
        assert abs(Decimal(int(EXP2_TABLE[r])) - exact) <= Decimal("0.5")
    assert EXP2_TABLE[0] == 2**31 and EXP2_TABLE[255] > 2**30


def test_scale_constant_is_the_nearest_double() -> None:
    getcontext().prec = 60
    exact = Decimal(256) / Decimal(2).ln()
    error = abs(Decimal(LOG2E_SCALED) - exact)
    assert error <= abs(Decimal(math.nextafter(LOG2E_SCALED, 0)) - exact)
    assert error <= abs(Decimal(math.nextafter(LOG2E_SCALED, 1000)) - exact)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 3000), st.integers(0, 2**32 - 1), st.floats(0.01, 50))
def test_quantize_invariants(vocab: int, seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(3, vocab)) * scale).astype(np.float32)
    freqs = logits_to_frequencies(logits, 24)
    assert freqs.dtype == np.int64
    assert (freqs >= 1).all() and (freqs.sum(axis=1) == 2**24).all()
    for row, f in zip(logits, freqs, strict=True):
        order = np.argsort(row, kind="stable")
        # a higher logit never gets a lower frequency (the argmax only gains)
        assert (np.diff(f[order]) >= 0).all()
        softmax = np.exp(row.astype(np.float64) - row.max())
        softmax /= softmax.sum()
        kl = float(np.sum(softmax * np.log2(softmax / (f / 2**24))))
        assert kl < 0.01 + vocab / 2**24 * 2


def test_quantize_rejects_broken_logits() -> None:
    for bad in ([0.0, np.nan], [0.0, np.inf], [-np.inf, -np.inf]):
        with pytest.raises(ValueError):
            logits_to_frequencies(np.array([bad], dtype=np.float32), 16)
    with pytest.raises(ValueError):
        logits_to_frequencies(np.zeros((1, 5000), dtype=np.float32), 12)  # V >= 2^P


def test_ties_give_the_remainder_to_the_first_maximum() -> None:
    freqs = logits_to_frequencies(np.array([[1.0, 3.0, 3.0, 3.0]], dtype=np.float32), 12)[0]
    assert freqs[1] >= freqs[2] == freqs[3] and freqs.sum() == 4096


def test_negative_infinity_gets_the_minimum_frequency() -> None:
    freqs = logits_to_frequencies(np.array([[0.0, -np.inf, 5.0]], dtype=np.float32), 12)[0]
    assert freqs[1] == 1 and freqs.sum() == 4096
