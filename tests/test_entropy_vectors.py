"""spec/vectors/entropy/: the model-free vectors hold both ways."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import llmarc.errors
from llmarc.entropy import RangeDecoder, RangeEncoder, logits_to_frequencies
from llmarc.entropy.mixing import NgramMixer

from .conftest import load_script

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "entropy"


def load(name: str) -> dict:
    return json.loads((VECTORS / name).read_text())


@pytest.mark.parametrize("name", sorted(p.name for p in VECTORS.glob("quantize-*.json")))
def test_quantize_vector(name: str) -> None:
    vector = load(name)
    rows = np.array(
        [[int(h, 16) for h in row] for row in vector["logits_f32_hex"]], dtype=np.uint32
    ).view(np.float32)
    assert logits_to_frequencies(rows, vector["precision"]).tolist() == vector["frequencies"]


@pytest.mark.parametrize("name", sorted(p.name for p in VECTORS.glob("trace-*.json")))
def test_trace_vector(name: str) -> None:
    vector = load(name)
    tables = [np.array(t, dtype=np.int64) for t in vector["frequencies"]]
    encoder = RangeEncoder(vector["precision"])
    for table, symbol in zip(tables, vector["symbols"], strict=True):
        encoder.encode_symbol(table, symbol)
    assert encoder.finish().hex() == vector["stream_hex"]
    decoder = RangeDecoder(bytes.fromhex(vector["stream_hex"]), vector["precision"])
    assert [decoder.decode(t) for t in tables] == vector["symbols"]


@pytest.mark.parametrize("name", sorted(p.name for p in VECTORS.glob("mix-*.json")))
def test_mix_vector(name: str) -> None:
    """entropy.md §4: every total, interval and weight, the stream, and back."""
    vector = load(name)
    tables = [np.array(t, dtype=np.int64) for t in vector["frequencies"]]
    precision, order, history = vector["precision"], vector["order"], vector["history"]
    mixer = NgramMixer(history, order, precision, len(tables[0]))
    encoder = RangeEncoder(precision)
    totals, intervals, weights = [], [], []
    for table, symbol in zip(tables, vector["symbols"], strict=True):
        start, freq, total = mixer.interval(symbol, int(table[:symbol].sum()), int(table[symbol]))
        encoder.encode(start, freq, total)
        totals.append(total)
        intervals.append([start, freq])
        weights.append(mixer.u)
    assert (totals, intervals, weights) == (vector["totals"], vector["intervals"],
                                            vector["weights"])
    assert encoder.finish().hex() == vector["stream_hex"]
    decoder = RangeDecoder(bytes.fromhex(vector["stream_hex"]), precision)
    mixer = NgramMixer(history, order, precision, len(tables[0]))
    decoded = []
    for table in tables:
        decoded.append(mixer.decode(decoder, np.cumsum(table)))
        assert mixer.u == weights[len(decoded) - 1]
    assert decoded == vector["symbols"]


@pytest.mark.parametrize("name", sorted(p.name for p in VECTORS.glob("bad-*.json")))
def test_bad_vector(name: str) -> None:
    vector = load(name)
    decoder = RangeDecoder(bytes.fromhex(vector["stream_hex"]), vector["precision"])
    *good, last = [np.array(t, dtype=np.int64) for t in vector["frequencies"]]
    mixer = None
    if "order" in vector:  # a mixed table (entropy.md §4)
        mixer = NgramMixer(vector["history"], vector["order"], vector["precision"], len(last))

    def decode(table: np.ndarray) -> int:
        return decoder.decode(table) if mixer is None else mixer.decode(decoder, np.cumsum(table))

    for table in good:  # the tables before the last decode; the last one MUST fail
        decode(table)
    with pytest.raises(getattr(llmarc.errors, vector["error"])):
        decode(last)


def test_readme_lists_every_vector() -> None:
    readme = (VECTORS / "README.md").read_text()
    for path in VECTORS.glob("*.json"):
        assert f"`{path.name}`" in readme


def test_generator_reproduces_the_committed_vectors(tmp_path: Path) -> None:
    load_script(VECTORS / "make_vectors.py").main(tmp_path)
    made = sorted(p.name for p in tmp_path.iterdir())
    assert made == sorted(p.name for p in VECTORS.iterdir() if p.suffix in (".json", ".md"))
    for name in made:
        assert (tmp_path / name).read_bytes() == (VECTORS / name).read_bytes(), name
