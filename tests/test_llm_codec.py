"""The LLM codec end to end, on the tiny seeded LLaMA models shipped in fixtures/.

Every roundtrip goes through the public API (pack -> open -> read/extract/test) and is
checked byte for byte; the tiny models make each run take well under a second.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import llmarc
from llmarc.codecs.llm import build_payload, parse_payload, read_varint, write_varint
from llmarc.codecs.llm_options import LLMOptions
from llmarc.errors import CorruptArchiveError, ModelMismatchError, UnsupportedFeatureError

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TINY_BPE = FIXTURES / "tiny-llama-bpe"
TINY_SP = FIXTURES / "tiny-llama-sp"

EDGE_CASES: dict[str, bytes] = {
    "one-byte.txt": b"a",
    "crlf.txt": b"line one\r\nline two\r\n\r\n",
    "nul.txt": b"before\x00after",
    "invalid-utf8.txt": b"ok \xff\xfe broken \xc3( end",
    "cjk-emoji.txt": "日本語のテキスト 😀🎉 combining é\u0301".encode(),
    "long-line.txt": b"word " * 3000,
    "specials.txt": b"<|endoftext|> <s> </s> <unk> literal",
    "spaces.txt": b"   leading and trailing   \t\t\n",
}


def make_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def pack_llm(src: Path, out: Path, model: Path = TINY_BPE, solid: bool = True,
             **settings) -> list:
    options = LLMOptions(model=str(model), device="cpu", **settings)
    return llmarc.pack(src, out, codec="llm", llm=options, warn=lambda m: None, solid=solid)


@pytest.mark.parametrize("model", [TINY_BPE, TINY_SP], ids=["byte-level-bpe", "sentencepiece"])
def test_edge_cases_roundtrip_byte_for_byte(tmp_path: Path, model: Path) -> None:
    src = make_tree(tmp_path / "src", EDGE_CASES)
    out = tmp_path / "a.llma"
    members = pack_llm(src, out, model=model, segment_length=64)
    codecs = {m.name: m.codec for m in members}
    assert codecs["cjk-emoji.txt"] == "llm" and codecs["long-line.txt"] == "llm"
    with llmarc.open(out, model=model, device="cpu") as archive:
        for name, data in EDGE_CASES.items():
            assert archive.read(name) == data, name
        archive.extract(tmp_path / "dest")
    for name, data in EDGE_CASES.items():
        assert (tmp_path / "dest" / name).read_bytes() == data


@pytest.mark.parametrize("engine", ["int-v2", "int-v1", "lockstep-v1"])
def test_many_segments_and_files_share_rows(tmp_path: Path, engine: str) -> None:
    """Files spanning many segments, coded 4 rows at a time, decode one member alone."""
    text = (FIXTURES / "tiny-training.txt").read_bytes()
    files = {f"part{i}.txt": text[i * 1500 : (i + 1) * 1500 + i * 97] for i in range(6)}
    src = make_tree(tmp_path / "src", files)
    out = tmp_path / "a.llma"
    pack_llm(src, out, segment_length=32, batch_width=4, engine=engine, carry=0)
    with llmarc.open(out, model=TINY_BPE, device="cpu", batch_width=3) as archive:
        profile = json.loads(archive.models[0].profile)
        components = profile.pop("model")  # the model's short component digests
        assert set(components) == {"arch", "start", "table", "weights"}
        if engine != "lockstep-v1":  # only what changes the numbers is recorded
            assert profile == {"engine": engine, "precision": 24, "segment_length": 32}
        else:  # the float engine's numbers depend on B, dtype, threads: recorded
            assert profile["batch_width"] == 4 and profile["segment_length"] == 32
        assert archive.read("part3.txt") == files["part3.txt"]  # decoded on its own
        archive.test()


def test_int_v1_escapes_bytes_the_vocabulary_lacks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A byte with no single-byte token is carried as an escape: the entry stays llm.

    The fixture vocabularies have every byte, so the tokenizer is told to escape three
    (SmolLM2 really lacks 21, see benchmarks)."""
    from llmarc.model.tokenize import LosslessTokenizer

    missing = [0x04, 0xFC, 0xFF]
    original = LosslessTokenizer.__init__

    def lacking(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        self.set_escaped(frozenset(missing))

    monkeypatch.setattr(LosslessTokenizer, "__init__", lacking)
    data = b"text with " + bytes(missing[:3]) + b" rare bytes " + bytes(missing[:1]) * 4
    src = make_tree(tmp_path / "src", {"a.txt": data, "only.txt": bytes(missing[:1]) * 3})
    out = tmp_path / "a.llma"
    members = {m.name: m for m in pack_llm(src, out, solid=False)}
    assert members["a.txt"].codec == "llm"
    assert members["only.txt"].codec != "llm"  # on its own: nothing left to tokenize
    with llmarc.open(out, model=TINY_BPE, device="cpu") as archive:
        assert archive.read("a.txt") == data


def test_bfloat16_path_roundtrips_on_cpu(tmp_path: Path) -> None:
    """The GPU dtype exercised on CPU: same code path, recorded and adopted dtype."""
    src = make_tree(tmp_path / "src", {"a.txt": EDGE_CASES["cjk-emoji.txt"] * 3})
    out = tmp_path / "a.llma"
    pack_llm(src, out, dtype="bfloat16", segment_length=40, engine="lockstep-v1")
    with llmarc.open(out, model=TINY_BPE, device="cpu") as archive:
        assert json.loads(archive.models[0].profile)["dtype"] == "bfloat16"
        assert archive.read("a.txt") == EDGE_CASES["cjk-emoji.txt"] * 3


def test_another_model_is_refused_naming_both(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"a.txt": b"hello world"})
    out = tmp_path / "a.llma"
    pack_llm(src, out)
    with (
        llmarc.open(out, model=TINY_SP, device="cpu") as archive,
        # a small 3.0 archive records no model name (format.md §12.5): the fingerprint
        pytest.raises(ModelMismatchError, match=r"unnamed.*6844a71039c6ce45.*tiny-llama-sp"
                      r".*weights"),
    ):
        archive.read("a.txt")


def test_auto_keeps_the_smaller_of_llm_and_zstd(tmp_path: Path) -> None:
    """The random tiny model predicts badly: auto must fall back to zstd or store."""
    src = make_tree(tmp_path / "src", {"a.txt": b"abc " * 400, "b.bin": bytes(range(256))})
    out = tmp_path / "a.llma"
    options = LLMOptions(model=str(TINY_BPE), device="cpu")
    members = llmarc.pack(src, out, codec="auto", llm=options, warn=lambda m: None)
    by_name = {m.name: m for m in members}
    assert by_name["a.txt"].codec == "zstd"
    assert by_name["b.bin"].codec in ("zstd", "store")
    with llmarc.open(out) as archive:
        assert archive.models == []  # no llm entry kept, so no model recorded
        assert archive.read("a.txt") == b"abc " * 400


def test_pack_verify_decodes_before_renaming(tmp_path: Path) -> None:
    src = make_tree(tmp_path / "src", {"a.txt": b"verify me " * 20})
    out = tmp_path / "a.llma"
    options = LLMOptions(model=str(TINY_BPE), device="cpu")
    llmarc.pack(src, out, codec="llm", llm=options, verify=True, warn=lambda m: None)
    assert out.exists()


def test_coding_statistics_account_for_every_token(tmp_path: Path) -> None:
    """The per-entry statistics the benchmarks report are consistent with the archive."""
    import math

    text = (FIXTURES / "tiny-training.txt").read_bytes()
    files = {"a.txt": text[:700], "b.txt": text[700:1000]}
    src = make_tree(tmp_path / "src", files)
    seen: dict = {}
    options = LLMOptions(model=str(TINY_BPE), device="cpu", segment_length=64,
                         on_encoded=seen.update)
    members = llmarc.pack(src, tmp_path / "a.llma", codec="llm", llm=options,
                          warn=lambda m: None, solid=False)  # per file, not one block
    assert set(seen) == set(files)
    for member in members:
        stats = seen[member.name]
        assert stats.payload_bytes == member.packed_size
        assert len(stats.ranks) == stats.tokens > 0 and min(stats.ranks) >= 0
        assert stats.tbyt_bits >= stats.model_bits > 0  # ceil never rounds down
        # quantization costs < -log2(1 - V/2^P) + 1/256 bit per token (spec/entropy.md 2.2)
        vocab = 300
        bound = -math.log2(1 - vocab / 2**24) + 1 / 256
        assert stats.coded_bits <= stats.model_bits + stats.tokens * bound
        segments = -(-stats.tokens // 64)
        # each stream is at most ceil((coded + 1)/8) bytes, plus the varint header
        assert 8 * stats.payload_bytes <= stats.coded_bits + segments * 9 + 8 * (1 + 2 * segments)


def corrupt_payload_byte(out: Path, name: str, model: Path) -> Path:
    """Flip one byte inside a member's stored payload and fix its CRC, so that the
    damage reaches the LLM decoder instead of the container's CRC check."""
    from dataclasses import replace

    from llmarc.container.index import data_start, disassemble, reassemble
    from llmarc.container.layout import crc32

    archive = out.read_bytes()
    data, index = disassemble(archive)
    entry = next(e for e in index.entries if e.name == name)
    area = bytearray(data)
    start = entry.stored_offset - data_start(archive)
    area[start + entry.stored_size - 1] ^= 0x5A
    payload = bytes(area[start : start + entry.stored_size])
    index.entries = [replace(e, crc32=crc32(payload)) if e is entry else e
                     for e in index.entries]
    broken = out.with_name("broken.llma")
    broken.write_bytes(reassemble(archive, bytes(area), index))
    return broken


def test_a_corrupted_llm_stream_gives_a_typed_error(tmp_path: Path) -> None:
    text = (FIXTURES / "tiny-training.txt").read_bytes()[:800]
    src = make_tree(tmp_path / "src", {"a.txt": text})
    out = tmp_path / "a.llma"
    pack_llm(src, out, segment_length=128)
    broken = corrupt_payload_byte(out, "a.txt", TINY_BPE)
    with llmarc.open(broken, model=TINY_BPE, device="cpu") as archive:
        with pytest.raises(CorruptArchiveError):  # includes ChecksumMismatchError
            archive.read("a.txt")
        with pytest.raises(CorruptArchiveError):
            archive.extract(tmp_path / "dest")
    assert not (tmp_path / "dest" / "a.txt").exists()


def test_unknown_engine_is_unsupported(tmp_path: Path) -> None:
    from llmarc.codecs.llm import settings_from_profile

    with pytest.raises(UnsupportedFeatureError, match="lockstep-v9"):
        settings_from_profile({"engine": "lockstep-v9"})


@pytest.mark.parametrize(
    "profile",
    [{"segment_length": 0}, {"segment_length": True}, {"precision": 11}, {"precision": 2.5},
     {"segment_length": None}],
)
@pytest.mark.parametrize("engine", ["int-v1", "int-v2"])
def test_hostile_integer_profiles_are_rejected(profile: dict, engine: str) -> None:
    from llmarc.codecs.llm import settings_from_profile

    base = {"engine": engine, "segment_length": 8, "precision": 24}
    assert settings_from_profile(base).segment_length == 8
    with pytest.raises(CorruptArchiveError):
        settings_from_profile({**base, **profile})


@pytest.mark.parametrize(
    "text", ['{"engine":NaN}', '{"engine":"int-v1","precision":1e400}', "[" * 5000 + "]" * 5000,
             '["int-v1"]', '{"engine":"int-v1","engine":"int-v1"}'],
)
def test_hostile_profile_json_is_corrupt_not_a_traceback(text: str) -> None:
    from llmarc.codecs.llm import parse_profile

    with pytest.raises(CorruptArchiveError):
        parse_profile(text)


def test_escapes_and_payload_bounds() -> None:
    from llmarc.codecs.llm import apply_escapes

    escapes = [(0, 0xFF), (4, 0xFE), (5, 0xFD)]
    payload = build_payload(2, [b"xy"], escapes)
    assert parse_payload(payload, 9, 8, with_escapes=True) == (2, escapes, [b"xy"])
    assert apply_escapes(b"abcdef", escapes) == b"\xffabc\xfe\xfddef"
    with pytest.raises(CorruptArchiveError):  # escapes past the entry's end
        parse_payload(payload, 4, 8, with_escapes=True)
    with pytest.raises(CorruptArchiveError):  # more escapes claimed than bytes present
        parse_payload(write_varint(1) + write_varint(10**6) + b"\x00", 10**7, 8, True)
    with pytest.raises(CorruptArchiveError):  # a million segments claimed by a tiny payload
        parse_payload(write_varint(10**6) + b"\x00" * 4, 10**7, 1)


def test_each_segment_is_bounded_by_the_text_size_less_the_other_tokens() -> None:
    """§3.3: the text is the original size less the escapes (here 30 - 2 = 28 bytes), and
    the other segments' tokens give at least a byte each, so segments of 8, 8 and 4 of 20
    tokens may give at most 16, 16 and 12 bytes; a segment past its bound is corrupt
    before the segments are joined."""
    from llmarc.codecs.llm import CodingSettings, SegmentCoder, SegmentJob

    class Recording(SegmentCoder):
        def __init__(self) -> None:
            self.settings = CodingSettings(4, 8, engine="int-v1")
            self.table = [bytes((i,)) for i in range(256)]
            self.jobs: list[SegmentJob] = []

        def decode_segments(self, jobs, progress=None):
            self.jobs += jobs
            return [[0x61] * job.count for job in jobs]

    coder = Recording()
    payload = build_payload(20, [b"s"] * 3, [(0, 0xFF), (5, 0xFE)])
    (data,) = coder.decode_many([(payload, 30)])
    assert [job.byte_limit for job in coder.jobs] == [16, 16, 12]
    assert data == b"\xff" + b"a" * 4 + b"\xfe" + b"a" * 16  # short: the caller's length check


@pytest.mark.parametrize(
    "profile",
    [
        {"batch_width": 0},
        {"batch_width": 10**9},
        {"segment_length": 10**9},
        {"precision": 40},
        {"segment_length": "many"},
        {"threads": 0},
        {"threads": 10**6},
        {"dtype": "float8"},
    ],
)
def test_hostile_profiles_are_rejected_before_allocating(profile: dict) -> None:
    from llmarc.codecs.llm import settings_from_profile

    base = {"engine": "lockstep-v1", "batch_width": 2, "segment_length": 8, "precision": 24,
            "threads": 2, "dtype": "float32"}
    with pytest.raises(CorruptArchiveError):
        settings_from_profile({**base, **profile})


def test_varints_and_payload_framing() -> None:
    for value in (0, 1, 127, 128, 300, 2**35):
        assert read_varint(write_varint(value), 0) == (value, len(write_varint(value)))
    with pytest.raises(CorruptArchiveError):
        read_varint(b"\x80\x00", 0)  # non-minimal
    with pytest.raises(CorruptArchiveError):
        read_varint(b"\x80" * 11, 0)
    payload = build_payload(5, [b"abc", b"de"])
    assert parse_payload(payload, 100, 3) == (5, [], [b"abc", b"de"])
    with pytest.raises(CorruptArchiveError):
        parse_payload(payload + b"x", 100, 3)  # lengths do not add up
    with pytest.raises(CorruptArchiveError):
        parse_payload(payload, 4, 3)  # more tokens than bytes
    with pytest.raises(CorruptArchiveError):
        parse_payload(build_payload(0, []), 10, 3)  # zero tokens for ten bytes


def test_real_smollm2_on_alice_is_exact_and_under_1_6_bits_per_byte(tmp_path: Path) -> None:
    """The embedded model on ~4 KB of real English: exact roundtrip, < 1.6 bits/byte."""
    alice = Path(__file__).resolve().parents[2] / "shared" / "corpus" / "alice29.txt"
    text = alice.read_bytes()[2000:6000]
    src = make_tree(tmp_path / "src", {"alice.txt": text})
    out = tmp_path / "a.llma"
    options = LLMOptions(model="smollm2", device="cpu", segment_length=256)  # 5 segments
    members = llmarc.pack(src, out, codec="llm", llm=options, warn=lambda m: None)
    assert members[0].codec == "llm"
    assert members[0].bits_per_byte < 1.6, members[0].bits_per_byte
    with llmarc.open(out, model="smollm2", device="cpu") as archive:
        assert archive.read("alice.txt") == text


def test_a_different_environment_warns_and_still_decodes(tmp_path: Path) -> None:
    """Environment keys (library versions, ISA) cannot be adopted: warn, let SHA-256 decide."""
    from dataclasses import replace

    from llmarc.container.index import disassemble, reassemble
    from llmarc.container.layout import canonical_json

    src = make_tree(tmp_path / "src", {"a.txt": b"environment check"})
    out = tmp_path / "a.llma"
    pack_llm(src, out, engine="lockstep-v1")
    archive = out.read_bytes()
    data, index = disassemble(archive)
    profile = {**json.loads(index.models[0].profile), "torch": "0.0.1", "cpu_capability": "X"}
    index.models[0] = replace(index.models[0], profile=canonical_json(profile))
    changed = tmp_path / "changed.llma"
    changed.write_bytes(reassemble(archive, data, index))
    warnings: list[str] = []
    with llmarc.open(changed, model=TINY_BPE, device="cpu", warn=warnings.append) as archive:
        assert archive.read("a.txt") == b"environment check"
    assert len(warnings) == 1 and "torch" in warnings[0] and "cpu_capability" in warnings[0]


def test_cli_packs_lists_and_extracts_with_a_local_model(tmp_path: Path) -> None:
    import subprocess
    import sys

    src = make_tree(tmp_path / "src", {"a.txt": b"hello from the command line\n"})
    archive, dest = tmp_path / "a.llma", tmp_path / "dest"
    model = ["--model", str(TINY_BPE), "--device", "cpu"]

    def llmarc_cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llmarc.cli", *args], capture_output=True,
                              text=True, timeout=300)

    packed = llmarc_cli("pack", str(src), str(archive), "--codec", "llm", "--verify",
                        "--segment-length", "16", "--quiet", *model)
    assert packed.returncode == 0, packed.stderr
    listing = json.loads(llmarc_cli("list", str(archive), "--json").stdout)
    assert listing[0]["codec"] == "llm" and listing[0]["bits_per_byte"] > 0
    extracted = llmarc_cli("extract", str(archive), "-C", str(dest), "--quiet", *model)
    assert extracted.returncode == 0, extracted.stderr
    assert (dest / "a.txt").read_bytes() == b"hello from the command line\n"
    info = llmarc_cli("info", str(archive))
    # format 3.0 records no model name below 4 KiB of data (format.md §12.5)
    assert '"weights":"8330b871"' in info.stdout and '"segment_length":16' in info.stdout
