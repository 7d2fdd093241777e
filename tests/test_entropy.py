"""The entropy layers: exact roundtrips, byte-exact agreement with an unbounded-integer
reference coder (so carries are right), a provably minimal flush, corrupt-input safety,
and the quantization's exactness and invariants."""

from __future__ import annotations

import math
import re
from decimal import Decimal, getcontext
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmarc.entropy import RangeDecoder, RangeEncoder, logits_to_frequencies
from llmarc.entropy.quantize import EXP2_TABLE, LOG2E_SCALED, WEIGHTS
from llmarc.entropy.rangecoder import WINDOW_MASK
from llmarc.errors import CorruptArchiveError

from .conftest import load_script

SPEC = Path(__file__).resolve().parent.parent / "spec" / "entropy.md"
SPEC_ENTROPY_VECTORS = SPEC.parent / "vectors" / "entropy"
TOP = 1 << 48


# --------------------------------------------------------------------------- references


def reference_encode(
    precision: int, intervals: list[tuple[int, int]]
) -> tuple[bytes, int, int, int]:
    """The range encoder with unbounded integers: no window, no cache, no carry logic.

    ``low`` keeps every bit, so carries are plain additions.  Returns the stream and the
    exact final interval [low, high] on the scale of 2^(8 * nbytes), and nbytes = 7 + shifts
    (the bytes the decoder reads).
    """
    low, size, shifts = 0, WINDOW_MASK, 0
    for start, freq in intervals:
        r = size >> precision
        low, size = low + r * start, r * freq
        while size < TOP:
            low, size, shifts = low << 8, size << 8, shifts + 1
    high = low + size - 1
    for shift in range(high.bit_length() + 1, -1, -1):  # the most trailing zero bits
        value = (high >> shift) << shift
        if value >= low:
            break
    nbytes = 7 + shifts
    out = value.to_bytes(nbytes, "big")
    keep = max(len(out.rstrip(b"\x00")), nbytes - 7)  # at most 7 implicit zeros (§3.1)
    return out[:keep], low, high, nbytes


def minimal_length(low: int, high: int, nbytes: int) -> int:
    """The fewest bytes L >= nbytes - 7 (the decoder reads at most 7 bytes past the end)
    whose zero-padded value lies in [low, high] (decodes correctly)."""
    for length in range(max(0, nbytes - 7), nbytes + 1):
        unit = 1 << (8 * (nbytes - length))
        if -(-low // unit) * unit <= high:
            return length
    raise AssertionError("unreachable")  # pragma: no cover


#: Records carries and pending-0xFF run lengths (to prove the tests reach them); shared
#: with the vector generator, which uses it to pick the carry vectors.
_GENERATOR = load_script(SPEC_ENTROPY_VECTORS / "make_vectors.py")
ProbeEncoder = _GENERATOR.ProbeEncoder
#: The symbol whose sub-interval holds the value with the most trailing zeros: choosing
#: it keeps the encoder undecided (a growing run of pending 0xFF bytes).
roundest_symbol = _GENERATOR.roundest_symbol


def intervals_of(tables: np.ndarray, symbols: list[int]) -> list[tuple[int, int]]:
    return [(int(t[:s].sum()), int(t[s])) for t, s in zip(tables, symbols, strict=True)]


def check_stream(precision: int, tables: np.ndarray, symbols: list[int]) -> bytes:
    """Encode, compare with the reference byte for byte, check minimality, decode back."""
    encoder = RangeEncoder(precision)
    for table, symbol in zip(tables, symbols, strict=True):
        encoder.encode_symbol(table, symbol)
    stream = encoder.finish()
    expected, low, high, nbytes = reference_encode(precision, intervals_of(tables, symbols))
    assert stream == expected
    assert len(stream) == minimal_length(low, high, nbytes)
    # trailing zeros are implicit, up to the 7 bytes of the final window
    assert not stream.endswith(b"\x00") or len(stream) == nbytes - 7
    decoder = RangeDecoder(stream, precision)
    assert [decoder.decode(t) for t in tables] == symbols
    return stream


# --------------------------------------------------------------------------- range coder


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
    tables = logits_to_frequencies(logits, precision).reshape(count, vocab)
    if draw(st.booleans()):  # sometimes the least likely symbols, to stress the coder
        symbols = [
            int(np.argmin(t)) if rng.random() < 0.3 else int(rng.choice(vocab, p=t / t.sum()))
            for t in tables
        ]
    else:
        symbols = [int(rng.choice(vocab, p=t / t.sum())) for t in tables]
    return precision, tables, symbols


@settings(max_examples=150, deadline=None)
@given(tables_and_symbols())
def test_range_coder_matches_reference_and_is_near_ideal(case) -> None:
    precision, tables, symbols = case
    stream = check_stream(precision, tables, symbols)
    ideal = sum(-math.log2(t[s] / 2**precision) for t, s in zip(tables, symbols, strict=True))
    # truncation costs < 1.5 * 2^(P-48) bit/symbol; the flush < 2 bytes
    assert len(stream) * 8 <= ideal + 0.01 * len(symbols) + 16


@settings(max_examples=40, deadline=None)
@given(st.integers(2, 40), st.integers(0, 2**32 - 1), st.sampled_from([12, 16, 24, 28]))
def test_extreme_skew(vocab: int, seed: int, precision: int) -> None:
    """One symbol with 2^P - V + 1: thousands of near-free symbols, then surprises."""
    rng = np.random.default_rng(seed)
    table = np.ones(vocab, dtype=np.int64)
    big = int(rng.integers(vocab))
    table[big] = 2**precision - (vocab - 1)
    symbols = [big if rng.random() < 0.98 else int(rng.integers(vocab)) for _ in range(1500)]
    check_stream(precision, np.tile(table, (len(symbols), 1)), symbols)


@pytest.mark.parametrize("resolve_up", [True, False])
def test_long_ff_runs_with_and_without_carry(resolve_up: bool) -> None:
    """Adversarial symbols keep 40+ bytes pending, then a carry ripples through them all
    (or the run is emitted as 0xFF); the output equals the unbounded reference."""
    rng = np.random.default_rng(7 + resolve_up)
    precision, vocab = 16, 9
    tables = logits_to_frequencies(rng.normal(size=(500, vocab)).astype(np.float32), precision)
    probe, symbols = ProbeEncoder(precision), []
    for i, table in enumerate(tables):
        symbol = roundest_symbol(probe, np.cumsum(table))
        phase = i % 160
        if symbol is None or phase > 150:
            symbol = int(rng.integers(vocab))
        elif phase == 150:
            symbol = min(symbol + 1, vocab - 1) if resolve_up else max(symbol - 1, 0)
        symbols.append(symbol)
        probe.encode_symbol(table, symbol)
    probe.finish()
    assert probe.longest_run >= 40
    if resolve_up:
        assert max(probe.carry_runs) >= 40
    check_stream(precision, tables, symbols)


def test_empty_and_trivial_streams() -> None:
    assert RangeEncoder(12).finish() == b""
    table = np.array([4094, 1, 1])
    assert check_stream(12, np.tile(table, (100, 1)), [0] * 100) == b""  # low stays 0
    assert RangeDecoder(b"", 12).decode(table) == 0


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40), st.integers(0, 2**32 - 1), st.sampled_from([12, 16, 24]))
def test_garbage_streams_raise_only_the_typed_error(data: bytes, seed: int, precision: int) -> None:
    """Any byte string decodes to symbols or raises CorruptArchiveError, and the decoder's
    invariant 0 <= code < range holds after every symbol."""
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(1, 20))
    tables = logits_to_frequencies(rng.normal(size=(50, vocab)).astype(np.float32) * 4, precision)
    decoder = RangeDecoder(data, precision)
    try:
        for table in tables:
            assert 0 <= decoder.decode(table) < vocab
            assert 0 <= decoder.code < decoder.range
    except CorruptArchiveError:
        pass


def test_out_of_bounds_stream_is_a_typed_error() -> None:
    with pytest.raises(CorruptArchiveError):
        RangeDecoder(b"\xff" * 8, 16).decode(np.array([2**15, 2**15]))


def test_bad_arguments_are_rejected() -> None:
    for precision in (11, 29):
        with pytest.raises(ValueError):
            RangeEncoder(precision)
        with pytest.raises(ValueError):
            RangeDecoder(b"", precision)
    encoder = RangeEncoder(12)
    for start, freq in ((0, 0), (-1, 2), (4095, 2)):
        with pytest.raises(ValueError):  # a zero frequency would loop forever
            encoder.encode(start, freq)
    with pytest.raises(ValueError):  # a table that does not sum to 2^P: no IndexError
        RangeDecoder(b"\xf0", 12).decode(np.array([100, 100]))


def test_decode_cumulative_equals_decode() -> None:
    rng = np.random.default_rng(3)
    tables = logits_to_frequencies(rng.normal(size=(200, 50)).astype(np.float32) * 3, 24)
    symbols = [int(rng.choice(50, p=t / t.sum())) for t in tables]
    stream = check_stream(24, tables, symbols)
    decoder = RangeDecoder(stream, 24)
    cumulative = np.cumsum(tables, axis=-1)  # one cumsum per batch, as a codec may do
    assert [decoder.decode_cumulative(c) for c in cumulative] == symbols


# --------------------------------------------------------------------------- quantization


def reference_frequencies(row: np.ndarray, precision: int) -> list[int]:
    """spec/entropy.md §2 for one row, scalar, Python ints and floats (not the vector code)."""
    z = [np.float32(v) for v in row]
    m = max(z)
    x = []
    for value in z:
        with np.errstate(over="ignore"):  # 3e38 - (-3e38) = -inf in binary32
            d = float(np.float32(value - m))  # binary32 subtraction, exactly widened
        product = d * LOG2E_SCALED  # a Python float multiply is binary64, round-to-even
        x.append(max(math.floor(product) if math.isfinite(product) else -10240, -10240))
    w = [int(EXP2_TABLE[(-xi) & 255]) >> ((-xi) >> 8) for xi in x]
    total, spare = 1 << precision, (1 << precision) - len(z)
    f = [1 + wi * spare // sum(w) for wi in w]
    f[x.index(0)] += total - sum(f)
    return f


@st.composite
def logit_rows(draw):
    vocab = draw(st.integers(1, 400))
    seed = draw(st.integers(0, 2**32 - 1))
    scale = draw(st.sampled_from([1e-30, 1e-3, 1.0, 10.0, 100.0, 1e6]))
    rng = np.random.default_rng(seed)
    row = (rng.normal(size=vocab) * scale).astype(np.float32)
    special = [-np.inf, 0.0, -0.0, 2.0**-149, -(2.0**-149), 3.0e38, -3.0e38]
    for _ in range(draw(st.integers(0, 4))):  # -inf, signed zeros, subnormals, extremes
        row[int(rng.integers(vocab))] = rng.choice(special)
    if vocab > 2 and draw(st.booleans()):  # ties at the top
        row[rng.integers(vocab, size=2)] = row.max()
    if np.isneginf(row).all():
        row[0] = 0.0
    return row


@settings(max_examples=150, deadline=None)
@given(logit_rows(), st.sampled_from([12, 16, 24, 28]))
def test_quantize_matches_the_scalar_reference(row: np.ndarray, precision: int) -> None:
    if len(row) >= 1 << precision:
        precision = 16
    assert logits_to_frequencies(row, precision).tolist() == reference_frequencies(row, precision)


@settings(max_examples=80, deadline=None)
@given(st.integers(2, 3000), st.integers(0, 2**32 - 1), st.floats(0.01, 50))
def test_quantize_invariants(vocab: int, seed: int, scale: float) -> None:
    rng = np.random.default_rng(seed)
    logits = (rng.normal(size=(3, vocab)) * scale).astype(np.float32)
    logits[0, rng.integers(vocab, size=3)] = logits[0].max()  # a tie for the top
    freqs = logits_to_frequencies(logits, 24)
    assert freqs.dtype == np.int64
    assert (freqs >= 1).all() and (freqs.sum(axis=1) == 2**24).all()
    bound = -math.log2(1 - vocab / 2**24) + 1 / 256  # the spec's §2.2 cost bound
    for row, f in zip(logits, freqs, strict=True):
        # exactly monotone: a higher logit never gets a lower frequency; the argmax only gains
        order = np.lexsort((-np.arange(vocab), row))  # among ties the first index last
        assert (np.diff(f[order]) >= 0).all()
        first = int(np.argmax(row))
        assert f[first] == f.max() and (f[row == row.max()][1:] <= f[first]).all()
        softmax = np.exp(row.astype(np.float64) - row.max())
        softmax /= softmax.sum()
        kl = float(np.sum(softmax * np.log2(softmax / (f / 2**24))))
        assert kl < bound


def test_quantize_batch_equals_rows() -> None:
    rng = np.random.default_rng(11)
    batch = (rng.standard_t(3, size=(2, 3, 500)) * 4).astype(np.float32)
    freqs = logits_to_frequencies(batch, 20)
    assert freqs.shape == batch.shape
    for index in np.ndindex(2, 3):
        assert freqs[index].tolist() == reference_frequencies(batch[index], 20)
    assert logits_to_frequencies(batch[0, 0], 20).tolist() == freqs[0, 0].tolist()  # 1-D


def test_quantize_rejects_broken_logits() -> None:
    for bad in ([0.0, np.nan], [0.0, np.inf], [-np.inf, -np.inf]):
        with pytest.raises(ValueError):
            logits_to_frequencies(np.array([bad], dtype=np.float32), 16)
    with pytest.raises(ValueError):
        logits_to_frequencies(np.zeros((1, 4096), dtype=np.float32), 12)  # V >= 2^P
    with pytest.raises(ValueError):
        logits_to_frequencies(np.zeros((1, 0), dtype=np.float32), 12)
    with pytest.raises(ValueError):
        logits_to_frequencies(np.zeros((1, 5), dtype=np.float32), 29)
    tight = logits_to_frequencies(np.zeros((1, 4095), dtype=np.float32), 12)  # A = 1
    assert tight[0, :3].tolist() == [2, 1, 1]


def test_quantize_refuses_flush_to_zero() -> None:
    torch = pytest.importorskip("torch")
    torch.set_flush_denormal(True)
    try:
        if not torch.set_flush_denormal(True):  # pragma: no cover - CPU without FTZ/DAZ
            pytest.skip("no flush-to-zero on this CPU")
        with pytest.raises(RuntimeError, match="subnormal"):
            logits_to_frequencies(np.zeros((1, 5), dtype=np.float32), 12)
    finally:
        torch.set_flush_denormal(False)
    logits_to_frequencies(np.zeros((1, 5), dtype=np.float32), 12)


def test_ties_give_the_remainder_to_the_first_maximum() -> None:
    freqs = logits_to_frequencies(np.array([[1.0, 3.0, 3.0, 3.0]], dtype=np.float32), 12)[0]
    assert freqs[1] > freqs[2] == freqs[3] and freqs.sum() == 4096


def test_negative_infinity_gets_the_minimum_frequency() -> None:
    freqs = logits_to_frequencies(np.array([[0.0, -np.inf, 5.0]], dtype=np.float32), 12)[0]
    assert freqs[1] == 1 and freqs.sum() == 4096


# --------------------------------------------------------------------------- constants


def test_exp2_table_is_exactly_rounded() -> None:
    getcontext().prec = 60
    for r in range(256):
        exact = Decimal(2) ** (Decimal(31) - Decimal(r) / 256)
        assert abs(Decimal(int(EXP2_TABLE[r])) - exact) < Decimal("0.5")
    assert EXP2_TABLE[0] == 2**31 and EXP2_TABLE[255] > 2**30
    e = np.arange(10241)
    assert (EXP2_TABLE[e & 255] >> (e >> 8) == WEIGHTS).all()


def test_scale_constant_is_the_nearest_double() -> None:
    getcontext().prec = 60
    exact = Decimal(256) / Decimal(2).ln()
    error = abs(Decimal(LOG2E_SCALED) - exact)
    assert error <= abs(Decimal(math.nextafter(LOG2E_SCALED, 0)) - exact)
    assert error <= abs(Decimal(math.nextafter(LOG2E_SCALED, 1000)) - exact)
    assert LOG2E_SCALED == 369.3299304675746


def test_spec_prints_the_same_constants() -> None:
    text = SPEC.read_text()
    assert LOG2E_SCALED.hex() in text and repr(LOG2E_SCALED) in text
    rows = re.findall(r"^\s*(\d+): ((?:[0-9A-F]{8} ?){8})$", text, flags=re.M)
    printed = [int(h, 16) for _, row in rows for h in row.split()]
    assert printed == EXP2_TABLE.tolist()
