"""The compiled frequency kernels compute spec/entropy.md §2's integers, bit for bit.

``llmarc.entropy.quantize.logits_to_frequencies`` is the NumPy statement of the spec;
``llmarc.entropy.fast`` fuses it into one pass per row with a reciprocal-and-correct
division.  Compared here on logits built to hit the edges: ties for the maximum, -inf,
values a float32 subtraction overflows on, subnormal differences, every precision."""

from __future__ import annotations

import numpy as np
import pytest

from llmarc.entropy import fast
from llmarc.entropy.quantize import logits_to_frequencies


def adversarial_logits(seed: int, rows: int, vocab: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    z = (rng.standard_normal((rows, vocab)) * rng.choice([0.01, 1, 8, 40], (rows, 1)))
    z = z.astype(np.float32)
    z[0, :] = 0.0  # a flat row: the remainder goes to index 0
    z[1, rng.integers(0, vocab, 5)] = z[1].max()  # ties for the maximum
    z[2, ::3] = -np.inf
    z[3, 0] = np.finfo(np.float32).max  # max - (-max) overflows to -inf
    z[3, 1] = -np.finfo(np.float32).max
    z[4, :] = np.float32(2.0**-140) * rng.integers(-4, 5, vocab)  # subnormal differences
    return z


@pytest.mark.parametrize("precision", [12, 16, 24, 28])
def test_tables_equal_the_numpy_statement_of_the_spec(precision: int) -> None:
    vocab = min(3000, (1 << precision) - 7)
    z = adversarial_logits(precision, 9, vocab)
    expected = logits_to_frequencies(z, precision)
    assert np.array_equal(fast.frequency_tables(z, precision), expected)
    assert np.array_equal(fast.frequency_tables(z, precision, cumulative=True),
                          np.cumsum(expected, axis=-1))


def test_token_intervals_are_the_coded_tokens_start_and_frequency() -> None:
    z = adversarial_logits(5, 9, 49152)
    table = logits_to_frequencies(z, 24)
    tokens = np.array([0, 17, 49151, 3, 2, 100, 40000, 1, 5])
    tokens[1] = int(np.argmax(z[1]))  # the row's first maximum: owns the remainder
    start, freq = fast.token_intervals(z, tokens, 24)
    for r, token in enumerate(tokens):
        assert freq[r] == table[r, token]
        assert start[r] == table[r, :token].sum()


def test_refused_rows_raise_the_references_errors() -> None:
    z = adversarial_logits(1, 6, 100)
    z[5, 7] = np.nan
    with pytest.raises(ValueError, match="NaN"):
        fast.frequency_tables(z, 16)
    z[5, 7] = 0.0
    z[4, :] = -np.inf
    with pytest.raises(ValueError, match="entirely -inf"):
        fast.token_intervals(z, np.zeros(6, dtype=np.int64), 16)


@pytest.mark.parametrize("compiled", [True, False])
def test_tables_are_written_into_a_given_array(compiled: bool, monkeypatch) -> None:
    """A decoder passes one array for every step: the tables land in it, whole."""
    if not compiled:
        monkeypatch.setattr(fast, "_KERNELS", False)  # the NumPy fallback
    z = adversarial_logits(3, 9, 3000)
    out = np.full((12, 3000), -1, dtype=np.int64)
    returned = fast.frequency_tables(z, 16, cumulative=True, out=out[:9])
    assert np.shares_memory(returned, out)
    assert np.array_equal(out[:9], np.cumsum(logits_to_frequencies(z, 16), axis=-1))
    assert (out[9:] == -1).all()
