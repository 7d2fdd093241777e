"""Context carry (spec/llm-codec.md §3.4): segments fed the tail of the segment before them,
in chains of G, decoded in rounds; on the tiny seeded models of fixtures/."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llmarc
from llmarc.codecs.llm import (
    CodingSettings,
    LLMCodec,
    SegmentCoder,
    SegmentJob,
    auto_chain,
    build_payload,
    build_profile,
    carry_pays,
    check_model_limits,
    planned_segments,
    settings_from_profile,
    split_segments,
)
from llmarc.codecs.llm_options import LLMOptions
from llmarc.codecs.llm_pipeline import resolve_carry
from llmarc.container.layout import ModelRecord
from llmarc.errors import CorruptArchiveError, ModelError
from llmarc.model.loader import load_model
from tests.test_llm_codec import TINY_BPE, TINY_SP, make_tree, pack_llm

TEXT = (Path(__file__).resolve().parent.parent / "fixtures" / "tiny-training.txt").read_bytes()
#: Files of 1 to about 10 segments of 32 tokens: partial chains, whole chains, one segment.
FILES = {"one-segment.txt": TEXT[:40], "long.txt": TEXT[:2400],
         "sub/middle.txt": TEXT[3000:3900], "exact.txt": TEXT[5000:5700]}
CARRY = {"segment_length": 32, "carry": 8, "chain": 3, "mix": 0}  # form 2: no mixing


@pytest.fixture(scope="module")
def loaded():
    return load_model(str(TINY_BPE), device="cpu", threads=1)


@pytest.mark.parametrize("engine", ["int-v2", "int-v1"])
@pytest.mark.parametrize("model", [TINY_BPE, TINY_SP], ids=["byte-level-bpe", "sentencepiece"])
def test_carry_roundtrips_byte_for_byte_and_records_form_2(tmp_path: Path, model: Path,
                                                           engine: str) -> None:
    src = make_tree(tmp_path / "src", FILES)
    out = tmp_path / "a.llma"
    members = pack_llm(src, out, model=model, engine=engine, batch_width=2, **CARRY)
    assert {m.name: m.codec for m in members if m.name in FILES} == dict.fromkeys(FILES, "llm")
    with llmarc.open(out, model=model, device="cpu", batch_width=3) as archive:
        profile = json.loads(archive.models[0].profile)
        profile.pop("model")
        assert profile == {"engine": engine, "precision": 24, "segment_length": 32,
                           "carry": 8, "chain": 3}
        assert archive.read("sub/middle.txt") == FILES["sub/middle.txt"]  # on its own
        archive.extract(tmp_path / "dest")
    for name, data in FILES.items():
        assert (tmp_path / "dest" / name).read_bytes() == data, name
    plain = tmp_path / "plain.llma"
    pack_llm(src, plain, model=model, engine=engine, segment_length=32)
    assert out.read_bytes() != plain.read_bytes()  # the carry changed the streams


def test_a_chain_start_is_coded_as_without_carry_and_the_rest_differ(loaded) -> None:
    """Segments 0 and 3 of a 3-segment chain start cold: their streams are the no-carry
    ones; segments 1, 2 and 4 were predicted after the 8 tokens before them."""
    tokens = loaded.tokenizer.encode(TEXT[:1500].decode()).ids[:32 * 4 + 5]
    carried = split_segments(tokens, 32, carry=8, chain=3)
    assert [len(s.context) for s in carried] == [0, 8, 8, 0, 8]
    assert carried[1].context == tokens[24:32] and carried[4].context == tokens[120:128]
    codec = LLMCodec(loaded, CodingSettings(4, 32, carry=8, chain=3))
    with_carry = [stream for stream, _ in codec.encode_segments(carried)]
    without = [stream for stream, _ in codec.encode_segments(split_segments(tokens, 32))]
    assert [a == b for a, b in zip(with_carry, without, strict=True)] == \
        [True, False, False, True, False]
    jobs = [SegmentJob(stream, len(s.tokens), 10**6, s.context)
            for stream, s in zip(with_carry, carried, strict=True)]
    assert codec.decode_segments(jobs) == [s.tokens for s in carried]


class Rounds(SegmentCoder):
    """A coder that records each decode_segments call (one per round) and 'decodes'
    segment k of a payload to the tokens [k] * count, or fails the ones in ``fail``."""

    def __init__(self, fail: set[bytes] = frozenset()) -> None:
        self.settings = CodingSettings(4, 4, engine="int-v2", carry=2, chain=2)
        self.table = [bytes((i,)) for i in range(256)]
        self.rounds: list[list[SegmentJob]] = []
        self.fail = fail

    def decode_segments(self, jobs, progress=None):
        self.rounds.append(list(jobs))
        return [CorruptArchiveError("bad") if job.stream in self.fail
                else [job.stream[0]] * job.count for job in jobs]


def test_decoding_runs_in_rounds_fed_with_the_tail_of_the_round_before() -> None:
    """Entry A: 5 segments of 4 tokens (chains 0-1, 2-3, 4); entry B: 3 (chains 0-1, 2).
    Round 0 decodes every chain's first segment; round 1 the second, each fed the last
    2 tokens of the first."""
    coder = Rounds()
    a = build_payload(18, [bytes((k,)) for k in range(5)], [])
    b = build_payload(9, [bytes((k,)) for k in (7, 8, 9)], [])
    first, second = coder.decode_many([(a, 18), (b, 9)])
    assert first == bytes([0] * 4 + [1] * 4 + [2] * 4 + [3] * 4 + [4] * 2)
    assert second == bytes([7] * 4 + [8] * 4 + [9] * 1)
    round0, round1 = coder.rounds
    assert [(j.stream, j.context) for j in round0] == [
        (b"\x00", []), (b"\x02", []), (b"\x04", []), (b"\x07", []), (b"\x09", [])]
    assert [(j.stream, j.context) for j in round1] == [
        (b"\x01", [0, 0]), (b"\x03", [2, 2]), (b"\x08", [7, 7])]


def test_a_failed_segment_stops_its_entry_and_no_other() -> None:
    coder = Rounds(fail={b"\x02"})
    a = build_payload(18, [bytes((k,)) for k in range(5)], [])
    b = build_payload(9, [bytes((k,)) for k in (7, 8, 9)], [])
    first, second = coder.decode_many([(a, 18), (b, 9)])
    assert isinstance(first, CorruptArchiveError)
    assert second == bytes([7] * 4 + [8] * 4 + [9] * 1)
    assert [j.stream for j in coder.rounds[1]] == [b"\x08"]  # nothing more of entry A


@pytest.mark.parametrize("change", [
    {"carry": 0}, {"carry": 33}, {"carry": True}, {"carry": None}, {"chain": 1},
    {"chain": 257}, {"chain": "3"}, {"carry": 4, "chain": None}, {"chain": 3, "carry": None},
])
def test_hostile_carry_profiles_are_corrupt(change: dict) -> None:
    base = {"engine": "int-v2", "segment_length": 32, "precision": 24, "carry": 8, "chain": 3}
    assert settings_from_profile(base).carry == 8
    profile = {k: v for k, v in {**base, **change}.items() if v is not None}
    with pytest.raises(CorruptArchiveError):
        settings_from_profile(profile)


def test_carry_beyond_the_window_or_65536_positions_is_corrupt(loaded) -> None:
    window = loaded.context_window  # the tiny models: 2,048
    check_model_limits(loaded, CodingSettings(1, window - 8, carry=8, chain=2))
    with pytest.raises(CorruptArchiveError, match="window"):
        check_model_limits(loaded, CodingSettings(1, window - 8, carry=9, chain=2))
    with pytest.raises(CorruptArchiveError, match="65536"):
        settings_from_profile({"engine": "int-v1", "segment_length": 65536, "precision": 24,
                               "carry": 1, "chain": 2})


@pytest.mark.parametrize("mix", [{}, {"mix": 3}], ids=["carry", "carry-and-mixing"])
def test_a_carry_profile_is_never_written_where_old_readers_would_ignore_it(
        tmp_path: Path, mix: dict) -> None:
    """llm-codec.md §2.2: only forms 2 and 3 of format 3.0 may hold carry and mix (a 1.x
    index is JSON, which a reader of llm-codec <= 1.3 or 1.5 reads without them)."""
    from llmarc.container.writer import ArchiveWriter

    profile = json.dumps({"carry": 8, "chain": 3, "engine": "int-v2", "precision": 24,
                          "segment_length": 32, **mix}, separators=(",", ":"), sort_keys=True)
    with ArchiveWriter(tmp_path / "a.llma", small=False) as writer, \
            pytest.raises(ValueError, match=r"format 3\.0"):
        writer.add_model(ModelRecord(bytes(32), "", profile))


@pytest.mark.parametrize(("counts", "chain"), [
    ([41], 2),  # one book: 21 rows a round with G = 2, 14 with 3: fewer than 32 anyway
    ([290], 8),  # 1 MB of text: 37 rows with G = 8
    ([120], 3),  # 40 rows with G = 3, 30 with 4
    ([16] * 5, 2),  # five 64 KB texts: 40 rows with G = 2, 30 with 3
    ([1] * 100 + [40], 8),  # many small files give the rows: the long one gets G = 8
    ([2], 2),
])
def test_the_pack_picks_the_longest_chain_that_keeps_32_rows(counts: list[int],
                                                               chain: int) -> None:
    assert auto_chain(counts) == chain


def test_an_unspecified_chain_is_picked_from_the_work(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"long.txt": TEXT[:6000], "short.txt": TEXT[:900]})
    out = tmp_path / "a.llma"
    pack_llm(src, out, segment_length=16, carry=4)
    with llmarc.open(out, model=TINY_BPE, device="cpu") as archive:
        profile = json.loads(archive.models[0].profile)
        assert archive.read("long.txt") == TEXT[:6000]
    chain = auto_chain(planned_segments([6000, 900], 16))
    assert profile["carry"] == 4 and profile["chain"] == chain and chain > 2


@pytest.mark.parametrize(("counts", "pays"), [
    ([2], False),  # an 8 KB text: two rounds of one row
    ([30], False),  # 15 rows a round
    ([31], True),  # 16 rows a round: half the CPU batch width
    ([41], True),  # alice29.txt at L = 1024
    ([18, 21, 14, 12, 29], True),  # make bench's five texts
    ([3] * 7, False),
    ([3] * 8, True),  # files of one archive count together
])
def test_carry_auto_pays_when_a_round_keeps_half_the_rows(counts: list[int], pays: bool) -> None:
    assert carry_pays(counts) is pays


@pytest.mark.parametrize(("options", "window", "counts", "expected"), [
    ({}, 8192, [41], (256, auto_chain([41]), 3)),  # the defaults on alice29.txt
    ({}, 8192, [2], (0, 1, 0)),  # the defaults on an 8 KB text
    ({"segment_length": 16}, 8192, [40], (16, auto_chain([40]), 3)),  # C at most L
    ({}, 1200, [41], (0, 1, 0)),  # L + 256 beyond the window: no carry, no error
    ({"engine": "lockstep-v1"}, 8192, [41], (0, 1, 0)),  # a float engine cannot carry
    ({"mix": 2, "chain": 4}, 8192, [41], (256, 4, 2)),
    ({"mix": 2}, 8192, [2], (0, 1, 0)),  # mixing applies only when carry is on
    ({"carry": 8}, 8192, [2], (8, 2, 3)),  # an explicit carry mixes by default
    ({"carry": 8, "mix": 0}, 8192, [2], (8, 2, 0)),
    ({"carry": 0}, 8192, [41], (0, 1, 0)),
])
def test_resolve_carry(options: dict, window: int, counts: list[int],
                       expected: tuple[int, int, int]) -> None:
    assert resolve_carry(LLMOptions(**options), window, counts) == expected


def test_the_default_carries_and_mixes_a_long_text_but_not_a_short_one(tmp_path: Path
                                                                        ) -> None:
    texts = {"short": TEXT[:300], "long": TEXT[:6000]}
    profiles = {}
    for name, data in texts.items():
        out = tmp_path / f"{name}.llma"
        pack_llm(make_tree(tmp_path / name, {"a.txt": data}), out, segment_length=16)
        with llmarc.open(out, model=TINY_BPE, device="cpu") as archive:
            profiles[name] = json.loads(archive.models[0].profile)
            assert archive.read("a.txt") == data
    assert not {"carry", "chain", "mix"} & profiles["short"].keys()
    chain = auto_chain(planned_segments([len(texts["long"])], 16))
    assert {k: profiles["long"][k] for k in ("carry", "chain", "mix")} == {
        "carry": 16, "chain": chain, "mix": 3}


def test_an_update_adds_short_files_beside_a_carried_archive(tmp_path: Path) -> None:
    """The defaults decide per pack: files an update adds are coded without carry when
    they are short, under a model record of their own, and every member still decodes."""
    from llmarc.update import update

    options = LLMOptions(model=str(TINY_BPE), device="cpu", segment_length=16)
    out = tmp_path / "a.llma"
    llmarc.pack(make_tree(tmp_path / "src", {"long.txt": TEXT[:6000]}), out, codec="llm",
                llm=options)
    update(out, [tmp_path / "src", make_tree(tmp_path / "more", {"short.txt": TEXT[:300]})],
           codec="llm", llm=options)
    with llmarc.open(out, model=TINY_BPE, device="cpu") as archive:
        assert [json.loads(m.profile).get("carry") for m in archive.models] == [16, None]
        assert archive.read("long.txt") == TEXT[:6000]
        assert archive.read("short.txt") == TEXT[:300]


@pytest.mark.parametrize(("options", "message"), [
    ({"carry": 33, "segment_length": 32}, "outside 1..32"),
    ({"carry": 8, "chain": 1}, "--chain 1"),
    ({"carry": 8, "segment_length": 2044}, "window of 2048"),
    ({"carry": 8, "engine": "lockstep-v1"}, "int-v1 or int-v2"),
])
def test_impossible_carry_options_are_a_clear_error(tmp_path: Path, options: dict,
                                                    message: str) -> None:
    src = make_tree(tmp_path / "src", {"a.txt": TEXT[:300]})
    with pytest.raises(ModelError, match=message):
        llmarc.pack(src, tmp_path / "a.llma", codec="llm",
                    llm=LLMOptions(model=str(TINY_BPE), device="cpu", **options))
    assert not (tmp_path / "a.llma").exists()


def _caches(stepper) -> list:
    """Every cache tensor of a CPU or torch stepper, as NumPy arrays."""
    if hasattr(stepper, "caches"):  # IntegerStepper: (keys, key scales, values, scales)
        return [part for layer in stepper.caches for part in layer]
    return [t.cpu().numpy() for parts in (stepper.keys, stepper.key_scales, stepper.values,
                                          stepper.value_scales) for t in parts]


@pytest.mark.parametrize("engine", ["int-v2", "int-v1"])
@pytest.mark.parametrize("known", [2, 16, 17, 70])  # tile edges; 70 grows the cache
@pytest.mark.parametrize("path", ["cpu", "torch"])
def test_a_prefilled_context_leaves_the_stepper_as_steps_would(loaded, engine: str,
                                                               known: int, path: str) -> None:
    """The decoder feeds a context in one pass (``prefill`` of the CPU stepper and of
    the torch one, a GPU's): its caches, and so every later step's logits, are bit for
    bit those of stepping the context."""
    import numpy as np

    rng = np.random.default_rng(known)
    tokens = rng.integers(1, 500, size=(3, known + 5))
    tokens[:, 0] = loaded.start_token
    if path == "cpu":
        model = loaded.integer_model(known + 5, engine)
    else:
        from llmarc.inference.integer import ATTENTION_LEVELS
        from llmarc.inference.integer_torch import TorchIntegerModel

        model = TorchIntegerModel(loaded.derived, known + 5, "cpu", ATTENTION_LEVELS[engine])
    stepped, prefilled = model.stepper(3, known + 5), model.stepper(3, known + 5)
    for t in range(known):
        stepped.step(tokens[:, t])
    prefilled.prefill(tokens[:, :known])
    assert stepped.capacity == prefilled.capacity
    for ours, theirs in zip(_caches(prefilled), _caches(stepped), strict=True):
        assert np.array_equal(ours[:, :, :known], theirs[:, :, :known])
    for t in range(known, known + 5):
        assert np.array_equal(prefilled.step(tokens[:, t]), stepped.step(tokens[:, t]))


def test_one_token_segments_in_long_chains_decode_in_batched_rounds(loaded, tmp_path: Path,
                                                                     monkeypatch) -> None:
    """8,192 one-token segments in chains of 256 (the most §3.4 allows), each after the
    first of its chain carrying one token: a decoder cannot take their first token from
    the shared table (§3.2), but a round steps one segment of every chain at hand (16
    chains of a 4,096-segment chunk) together: 256 rounds a chunk, never 8,192 steps
    one after another."""
    import hashlib

    from llmarc.codecs import llm
    from llmarc.container.index import assemble_small
    from llmarc.container.layout import SMALL_HEADER_SIZE, TYPE_FILE, EntryRecord, Index, crc32
    from llmarc.model.fingerprint import canonical_json

    token = next(t for t, piece in enumerate(loaded.table) if piece == b"a")
    settings = CodingSettings(32, 1, carry=1, chain=256)
    (payload,), _ = LLMCodec(loaded, settings).encode_many([[token] * 8192], escapes=[[]])
    data = b"a" * 8192
    entry = EntryRecord("a.txt", TYPE_FILE, 0o644, 0, len(data), 2, b"\0\0",
                        SMALL_HEADER_SIZE, len(payload), hashlib.sha256(data).digest(),
                        crc32(payload))
    record = ModelRecord(loaded.fingerprint, "", canonical_json(build_profile(loaded, settings)))
    path = tmp_path / "chains.llma"
    path.write_bytes(assemble_small(payload, Index("", [record], [entry])))
    rounds: list[int] = []
    decode = LLMCodec.decode_segments

    def counted(self, jobs, progress=None):
        rounds.append(len(jobs))
        return decode(self, jobs, progress)

    monkeypatch.setattr(LLMCodec, "decode_segments", counted)
    with llmarc.open(path, model=TINY_BPE, device="cpu") as archive:
        assert archive.read("a.txt") == data
    assert llm.DECODE_CHUNK == 16 * 256
    assert rounds == [16] * (2 * 256)  # 2 chunks of 16 chains


@pytest.mark.parametrize("vector", ["good-carry-tiny-bpe", "good-mix-tiny-bpe"])
def test_mutated_carry_archives_give_only_typed_errors_or_their_bytes(tmp_path: Path,
                                                                     vector: str) -> None:
    """Seeded mutations of good-carry-tiny-bpe (and of good-mix-tiny-bpe: form 3, mixed
    tables), read with its model: half anywhere in the archive (the index's with its CRC
    fixed, so the form-2/3 record's fields reach the parser), half in an llm member's
    stored bytes with the member's CRC fixed, so the streams reach the decoder's rounds.
    Every outcome is a typed error or the bytes the archive records."""
    import random
    from dataclasses import replace

    from llmarc.container.index import assemble_small, disassemble
    from llmarc.container.layout import SMALL_HEADER_SIZE, crc32
    from llmarc.errors import LlmarcError
    from tests.test_fuzz import _check_member_bytes, mutate

    seed = (Path(__file__).resolve().parent.parent / "spec" / "vectors" / "llm"
            / f"{vector}.llma").read_bytes()
    area, index = disassemble(seed)
    rng = random.Random(20261204)
    path = tmp_path / "m.llma"
    outcomes: dict[str, int] = {}
    for case in range(300):
        if case % 2:
            data = mutate(rng, seed)
        else:
            entry = rng.choice([e for e in index.entries if e.stored_size])
            begin = entry.stored_offset - SMALL_HEADER_SIZE
            changed = bytearray(area)
            for _ in range(rng.choice((1, 1, 2, 3))):
                changed[begin + rng.randrange(entry.stored_size)] ^= 1 << rng.randrange(8)
            stored = bytes(changed[begin:begin + entry.stored_size])
            entries = [replace(e, crc32=crc32(stored)) if e is entry else e
                       for e in index.entries]
            data = assemble_small(bytes(changed), replace(index, entries=entries))
        path.write_bytes(data)
        try:
            with llmarc.open(path, model=TINY_BPE, device="cpu") as archive:
                for member in archive.members():
                    if member.is_file():
                        _check_member_bytes(member, archive.read(member.name))
            outcome = "ok"
        except LlmarcError as exc:
            outcome = type(exc).__name__
        except Exception as exc:  # anything else is a bug: show the reproducer
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc} ({data.hex()[:400]})")
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    # the payload half reaches the decoder: streams that decode to other bytes are
    # caught by the digest, streams that run out or overshoot by the codec's bounds
    assert outcomes.get("ChecksumMismatchError", 0) >= 30, outcomes
    assert outcomes.get("CorruptArchiveError", 0) >= 100, outcomes


def test_a_chain_without_carry_is_a_usage_error(tmp_path: Path, capsys) -> None:
    from llmarc.cli import run

    src = make_tree(tmp_path / "src", {"a.txt": TEXT[:300]})
    assert run(["pack", str(src), str(tmp_path / "a.llma"), "--carry", "0", "--chain", "4",
                "-q"]) == 2
    assert "drop --carry 0" in capsys.readouterr().err
    assert run(["pack", str(src), str(tmp_path / "a.llma"), "--carry", "some", "-q"]) == 2
    assert "must be auto or a number of tokens" in capsys.readouterr().err
    assert not (tmp_path / "a.llma").exists()
