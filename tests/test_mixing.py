"""Adaptive n-gram mixing (spec/entropy.md §4, llm-codec.md §3.6): the mixer against a
plain statement of the spec, the range coder with mixed totals, and the codec, container
and CLI on the tiny seeded models of fixtures/."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

import llmarc
from llmarc.cli import run
from llmarc.codecs.llm import (
    CodingSettings,
    LLMCodec,
    SegmentJob,
    build_profile,
    settings_from_profile,
    split_segments,
)
from llmarc.container.json_safe import canonical_json
from llmarc.container.layout import ModelRecord
from llmarc.container.small import FORM_MIX, encode_model
from llmarc.entropy.mixing import (
    SQUASH_POINTS,
    U_LIMIT,
    U_START,
    NgramMixer,
    squash,
)
from llmarc.entropy.rangecoder import MAX_TOTAL, RangeDecoder, RangeEncoder
from llmarc.errors import CorruptArchiveError
from llmarc.model.loader import load_model
from tests.conftest import load_script
from tests.test_context_carry import FILES, TEXT
from tests.test_llm_codec import TINY_BPE, TINY_SP, make_tree, pack_llm

MIX = {"segment_length": 32, "carry": 8, "chain": 3, "mix": 3}


def spec_mix(history: list[int], tables: list[np.ndarray], symbols: list[int], order: int,
             precision: int) -> list[tuple[int, int, int, int]]:
    """entropy.md §4.3 as written, scalar, counting from scratch at every position:
    (M, start, G[x], u after) per position.  A second statement of the spec, to hold
    the incremental mixer to."""
    seq, u, out = list(history), U_START, []
    for table, x in zip(tables, symbols, strict=True):
        j = len(seq)
        counts = []  # (o, {t: c_o(t)}) for the orders that take part, highest first
        for o in range(min(order, j), -1, -1):
            context = tuple(seq[j - o:j])
            seen: dict[int, int] = {}
            for i in range(o, j):
                if tuple(seq[i - o:i]) == context:
                    seen[seq[i]] = seen.get(seq[i], 0) + 1
            if seen:
                counts.append((o, seen))
        rem, escapes = 65536, []
        for _o, seen in counts:
            n, d = sum(seen.values()), len(seen)
            e = rem * n // (n + d)
            rem -= e
            escapes.append(e)
        w = squash(u >> 8)
        alpha = 4096 - w + w * rem // 65536
        betas = [w * e * (1 << precision) // (65536 * sum(seen.values()))
                 for e, (_o, seen) in zip(escapes, counts, strict=True)]
        mixed = [alpha * int(f) for f in table]
        for beta, (_o, seen) in zip(betas, counts, strict=True):
            for t, c in seen.items():
                mixed[t] += beta * c
        total = sum(mixed)
        assert total == alpha * (1 << precision) + sum(
            beta * sum(seen.values()) for beta, (_o, seen) in zip(betas, counts, strict=True))
        g, f = mixed[x], int(table[x])
        delta = 16 * (4096 - w) * (g * (1 << precision) - f * total) // (g * (1 << precision))
        u = min(max(u + delta, -U_LIMIT), U_LIMIT)
        out.append((total, sum(mixed[:x]), g, u))
        seq.append(x)
    return out


def random_tables(rng: np.random.Generator, count: int, vocab: int, precision: int,
                  favour: list[int] | None = None) -> list[np.ndarray]:
    """Frequency tables of total 2^precision (every entry >= 1), optionally favouring
    the token at each position."""
    tables = []
    for i in range(count):
        weights = rng.integers(1, 50, vocab)
        if favour is not None and rng.random() < 0.5:
            weights[favour[i]] += 2000
        table = 1 + weights * ((1 << precision) - vocab) // weights.sum()
        table[0] += (1 << precision) - table.sum()
        tables.append(table)
    return tables


def phrase_tokens(rng: np.random.Generator, vocab: int, count: int) -> list[int]:
    book = [rng.integers(vocab, size=4).tolist() for _ in range(5)]
    out: list[int] = []
    while len(out) < count:
        out += book[int(rng.integers(5))] if rng.random() < 0.8 else [int(rng.integers(vocab))]
    return out[:count]


def code(history: list[int], tables: list[np.ndarray], symbols: list[int], order: int,
         precision: int) -> tuple[list[tuple[int, int, int, int]], bytes]:
    mixer, encoder, steps = NgramMixer(history, order, precision, len(tables[0])), \
        RangeEncoder(precision), []
    for table, x in zip(tables, symbols, strict=True):
        start, freq, total = mixer.interval(x, int(table[:x].sum()), int(table[x]))
        encoder.encode(start, freq, total)
        steps.append((total, start, freq, mixer.u))
    return steps, encoder.finish()


def test_squash_is_the_interpolated_table() -> None:
    values = [squash(d) for d in range(-2100, 2101)]
    assert values == sorted(values) and min(values) == 1 and max(values) == 4095
    assert [squash(128 * (k - 16)) for k in range(1, 32)] == list(SQUASH_POINTS[1:32])
    assert squash(U_START >> 8) == 74 and squash(0) == 2048
    assert squash(-3000) == squash(-2047) == 1 and squash(3000) == squash(2047) == 4095


@pytest.mark.parametrize("order, precision, vocab, history", [
    (3, 16, 30, 60), (1, 12, 300, 0), (4, 24, 500, 200), (2, 20, 7, 25)])
def test_the_mixer_is_the_spec_and_decodes_what_it_codes(order: int, precision: int,
                                                        vocab: int, history: int) -> None:
    rng = np.random.default_rng(order * 100 + precision)
    tokens = phrase_tokens(rng, vocab, history + 150)
    symbols = tokens[history:]
    tables = random_tables(rng, len(symbols), vocab, precision, favour=symbols)
    steps, stream = code(tokens[:history], tables, symbols, order, precision)
    assert steps == spec_mix(tokens[:history], tables, symbols, order, precision)
    assert all(freq >= 1 and total <= MAX_TOTAL for total, _s, freq, _u in steps)
    decoder = RangeDecoder(stream, precision)
    mixer = NgramMixer(tokens[:history], order, precision, vocab)
    for (*_, u), table, x in zip(steps, tables, symbols, strict=True):
        assert mixer.decode(decoder, np.cumsum(table)) == x and mixer.u == u


def test_with_nothing_seen_the_mix_is_the_models_table_scaled() -> None:
    mixer = NgramMixer([], 3, 16, 10)
    assert mixer.interval(7, 1000, 500) == (4096 * 1000, 4096 * 500, 4096 << 16)
    assert mixer.u == U_START  # the step is exactly 0


def test_repetition_is_learnt_and_the_weight_is_clamped() -> None:
    """A phrase repeated many times: the counts take over the table (u at its limit)
    and the phrase costs far less than the model's uniform tables say."""
    vocab, precision = 50, 16
    symbols = [3, 14, 15, 9, 26] * 800
    tables = [np.full(vocab, (1 << precision) // vocab) for _ in symbols]
    for table in tables:
        table[0] += (1 << precision) - table.sum()
    steps, stream = code([], tables, symbols, 2, precision)
    assert max(u for *_, u in steps) == U_LIMIT
    model_bits = len(symbols) * np.log2(vocab)
    assert len(stream) * 8 < 0.1 * model_bits


def test_mixed_totals_are_bounded_and_checked() -> None:
    encoder = RangeEncoder(24)
    with pytest.raises(ValueError):
        encoder.encode(0, 1, MAX_TOTAL + 1)
    with pytest.raises(ValueError):
        encoder.encode(5, 6, 10)  # past the total
    encoder.encode(MAX_TOTAL - 2, 1, MAX_TOTAL)
    decoder = RangeDecoder(b"\xff" * 8, 24)
    with pytest.raises(CorruptArchiveError):  # the target is >= M: before any table
        decoder.decode_mixed(lambda: pytest.fail("no table for an out-of-bounds stream"),
                             1 << 30)


def test_the_mixer_refuses_what_the_profile_may_not_hold() -> None:
    with pytest.raises(ValueError):
        NgramMixer([], 5, 16, 10)
    with pytest.raises(ValueError):
        NgramMixer([], 3, 25, 10)


# ------------------------------------------------------------------ the codec


@pytest.fixture(scope="module")
def loaded():
    return load_model(str(TINY_BPE), device="cpu", threads=1)


def test_segments_carry_their_chains_history(loaded) -> None:
    tokens = list(range(100))
    parts = split_segments(tokens, 16, carry=4, chain=3, mix=True)
    assert [list(p.history) for p in parts] == [[], tokens[:16], tokens[:32], [],
                                                tokens[48:64], tokens[48:80], [], ]
    assert not any(len(p.history) for p in split_segments(tokens, 16, carry=4, chain=3))


def test_mixing_codes_fewer_bits_and_decodes_in_rounds(loaded) -> None:
    """Chains decoded side by side in rounds, the weight restarting per segment: the
    codec's streams decode back, and mixing saved bits on repetitive text."""
    tokens = loaded.tokenizer.encode((TEXT[:150] * 20).decode()).ids  # period < a chain
    settings = CodingSettings(4, 32, carry=8, chain=3, mix=3)
    codec = LLMCodec(loaded, settings)
    (payload,), (stats,) = codec.encode_many([tokens], collect_stats=True, escapes=[[]])
    plain = LLMCodec(loaded, CodingSettings(4, 32, carry=8, chain=3))
    _, (plain_stats,) = plain.encode_many([tokens], collect_stats=True, escapes=[[]])
    assert stats.coded_bits < 0.8 * plain_stats.coded_bits  # the text repeats itself
    table = loaded.table
    size = len(b"".join(table[t] for t in tokens))
    for width in (1, 7):
        decoder = LLMCodec(loaded, CodingSettings(width, 32, carry=8, chain=3, mix=3))
        assert decoder.decode_many([(payload, size)]) == [b"".join(table[t] for t in tokens)]
    wrong = LLMCodec(loaded, CodingSettings(4, 32, carry=8, chain=3, mix=2))
    assert wrong.decode_many([(payload, size)])[0] != b"".join(table[t] for t in tokens)


def test_a_segment_decodes_alone_from_its_history(loaded) -> None:
    """Segment 2 of a chain needs the chain's tokens before it and nothing else."""
    tokens = loaded.tokenizer.encode(TEXT[:1200].decode()).ids[:32 * 3]
    codec = LLMCodec(loaded, CodingSettings(2, 32, carry=8, chain=3, mix=3))
    parts = split_segments(tokens, 32, carry=8, chain=3, mix=True)
    streams = [stream for stream, _ in codec.encode_segments(parts)]
    job = SegmentJob(streams[2], 32, 10**6, parts[2].context, tuple(parts[2].history))
    assert codec.decode_segments([job]) == [parts[2].tokens]


@pytest.mark.parametrize("change, message", [
    ({"mix": 3}, "without carry"), ({"mix": 5}, "mix"), ({"mix": 0}, "mix"),
    ({"mix": True}, "mix"), ({"carry": 8, "chain": 3, "mix": 3, "precision": 25}, "precision")])
def test_hostile_mix_profiles_are_corrupt(change: dict, message: str) -> None:
    profile = {"engine": "int-v2", "segment_length": 32, "precision": 24, **change}
    if "carry" not in change and change != {"mix": 3}:
        profile.update(carry=8, chain=3)
    with pytest.raises(CorruptArchiveError, match=message):
        settings_from_profile(profile)


def test_the_profile_and_form_3_record_hold_mix(loaded) -> None:
    settings = CodingSettings(32, 32, carry=8, chain=3, mix=3)  # 32: the reader's width
    profile = build_profile(loaded, settings)
    assert profile["mix"] == 3 and settings_from_profile(profile) == settings
    record = encode_model(ModelRecord(loaded.fingerprint, "", canonical_json(profile)))
    assert record[0] == FORM_MIX and record[-3:] == bytes((8, 3, 3))
    with pytest.raises(ValueError):  # never where a reader without form 3 would ignore it
        encode_model(ModelRecord(loaded.fingerprint, "x", canonical_json({**profile, "x": 1})))


@pytest.mark.parametrize("model", [TINY_BPE, TINY_SP], ids=["byte-level-bpe", "sentencepiece"])
def test_mix_roundtrips_byte_for_byte(tmp_path: Path, model: Path) -> None:
    src = make_tree(tmp_path / "src", FILES)
    out = tmp_path / "a.llma"
    pack_llm(src, out, model=model, batch_width=2, **MIX)
    with llmarc.open(out, model=model, device="cpu", batch_width=3) as archive:
        assert json.loads(archive.models[0].profile)["mix"] == 3
        assert archive.read("sub/middle.txt") == FILES["sub/middle.txt"]
        archive.extract(tmp_path / "dest")
    for name, data in FILES.items():
        assert (tmp_path / "dest" / name).read_bytes() == data, name
    carried = tmp_path / "carried.llma"
    pack_llm(src, carried, model=model, **{**MIX, "mix": 0})
    assert out.stat().st_size < carried.stat().st_size


def test_the_cli_packs_with_mix_and_refuses_it_without_carry(tmp_path: Path, capsys) -> None:
    src = make_tree(tmp_path / "src", {"a.txt": TEXT[:3000]})
    out = tmp_path / "a.llma"
    common = ["--codec", "llm", "--model", str(TINY_BPE), "-q", "--segment-length", "32"]
    assert run(["pack", *common, "--carry", "0", "--mix", "3", str(src), str(out)]) == 2
    assert "drop --carry 0" in capsys.readouterr().err and not out.exists()
    assert run(["pack", *common, "--carry", "8", "--mix", "3", str(src), str(out)]) == 0
    assert run(["extract", "--model", str(TINY_BPE), "-q", "-C", str(tmp_path / "x"),
                str(out)]) == 0
    assert (tmp_path / "x" / "a.txt").read_bytes() == TEXT[:3000]


@pytest.mark.parametrize("order", [1, 2, 4])
def test_every_order_shapes_the_mix_vectors(tmp_path: Path, order: int) -> None:
    """good-mix-tiny-bpe decoded as if another order had been recorded fails: the
    vectors pin down each order's part (entropy.md §4.3), not just order 0's."""
    vectors = Path(__file__).resolve().parent.parent / "spec" / "vectors"
    record_patch = load_script(vectors / "make_llm_vectors.py").record_patch
    patched = tmp_path / "patched.llma"
    patched.write_bytes(record_patch((vectors / "llm" / "good-mix-tiny-bpe.llma").read_bytes(),
                                     bytes((order,))))
    with pytest.raises(CorruptArchiveError), \
            llmarc.open(patched, model=TINY_BPE, device="cpu") as archive:
        archive.extract(tmp_path / "out")
