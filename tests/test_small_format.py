"""Format 3.0, the small layout (spec/format.md §12; issue 24 item 4).

What must hold: every archive llmarc writes now is 3.0 and roundtrips byte for byte; a
one-file archive of a 700-byte English text with the embedded model is at most 240
bytes (it was ~490 in 1.1); a 1.x reader refuses 3.0 as *unsupported*; every field of
the new index is bounds-checked (corrupt or unsupported, never a traceback or an
allocation the archive merely claims); a wrong model is still refused by name.
"""

from __future__ import annotations

import struct
from pathlib import Path

import pytest

import llmarc
from llmarc.codecs.llm_options import LLMOptions
from llmarc.container import layout
from llmarc.container.compact import put_varint
from llmarc.container.index import disassemble
from llmarc.container.small import decode_small_index, encode_model
from llmarc.errors import (
    ChecksumMismatchError,
    CorruptArchiveError,
    LlmarcError,
    ModelMismatchError,
    UnsupportedFeatureError,
)
from tests.conftest import make_tree

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TINY_BPE = FIXTURES / "tiny-llama-bpe"
TINY_SP = FIXTURES / "tiny-llama-sp"
CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpus"
FILES = {"a.txt": b"The quick brown fox jumps over the lazy dog.\n" * 3,
         "d/b.txt": b"tabs\tand NUL \x00 bytes\n", "e/empty": b""}


def _pack(tmp_path: Path, codec: str = "llm", model: Path = TINY_BPE,
          files: dict[str, bytes] = FILES) -> Path:
    src = make_tree(tmp_path / "src", files)
    out = tmp_path / "a.llma"
    llmarc.pack(src, out, codec=codec, llm=LLMOptions(model=str(model), device="cpu"),
                warn=lambda m: None)
    return out


def _open(path: Path, model: Path = TINY_BPE) -> llmarc.ArchiveReader:
    return llmarc.open(path, model=str(model), device="cpu")


def test_llm_archive_is_3_0_compact_and_roundtrips(tmp_path: Path) -> None:
    out = _pack(tmp_path)
    raw = out.read_bytes()
    assert raw[:12] == layout.MAGIC + struct.pack("<HH", 3, 0)
    with _open(out) as ar:
        assert ar.version == (3, 0) and ar.creator == ""
        (model,) = ar.models
        assert len(model.fingerprint) == 16 and model.name == ""
        for m in ar.members():
            if m.is_file():
                assert ar.read(m.name) == FILES[m.name]
                if m.codec == "llm":  # both texts share one LLM block: a CRC-32 each
                    assert m.sha256 == "" and len(m.codec_params) == 18
        ar.test()
        ar.extract(tmp_path / "out")
    for name, data in FILES.items():
        assert (tmp_path / "out" / name).read_bytes() == data


def test_an_update_with_the_same_model_keeps_one_model_record(tmp_path: Path) -> None:
    """A 3.0 record read back holds 16 bytes of the fingerprint and no name; updating the
    archive with new text coded by the same model must reuse it, not add a second."""
    from llmarc.update import update

    out = _pack(tmp_path)
    (tmp_path / "src" / "new.txt").write_bytes(b"Another line of English text to code.\n" * 4)
    update(out, tmp_path / "src", codec="llm", llm=LLMOptions(model=str(TINY_BPE),
                                                             device="cpu"),
           warn=lambda m: None)
    with _open(out) as ar:
        assert len(ar.models) == 1
        assert ar.read("new.txt") == b"Another line of English text to code.\n" * 4
        ar.test()


def test_a_1_x_reader_refuses_3_0_as_unsupported(tmp_path: Path,
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """What a reader of 1.x does with the first 12 bytes (format.md §2): unsupported."""
    raw = _pack(tmp_path, "zstd").read_bytes()
    monkeypatch.setattr(layout, "READ_MAJOR", 1)
    with pytest.raises(UnsupportedFeatureError, match=r"3\.0"):
        layout.decode_header(raw[:32])


def test_every_flipped_index_byte_is_a_typed_error(tmp_path: Path) -> None:
    raw = _pack(tmp_path).read_bytes()
    (size,) = struct.unpack("<I", raw[-8:-4])
    start = len(raw) - 8 - size
    target = tmp_path / "flip.llma"
    for i in [*range(12), *range(start, len(raw))]:
        bad = bytearray(raw)
        bad[i] ^= 0x10
        target.write_bytes(bad)
        with pytest.raises(LlmarcError), _open(target) as ar:
            ar.test()


def test_every_truncation_is_corrupt(tmp_path: Path) -> None:
    raw = _pack(tmp_path, "zstd").read_bytes()
    target = tmp_path / "cut.llma"
    for n in range(len(raw)):
        target.write_bytes(raw[:n])
        with pytest.raises(CorruptArchiveError):
            llmarc.open(target)


def test_wrong_model_is_refused_naming_the_components(tmp_path: Path) -> None:
    out = _pack(tmp_path)
    with _open(out, TINY_SP) as ar, pytest.raises(ModelMismatchError, match="differ"):
        ar.read("a.txt")


def _model_index(fields: bytes, *, models: int = 1) -> bytes:
    """A plain 3.0 index body: no creator, no extensions, ``models`` copies of one raw
    model record, no entries."""
    body = bytearray((0, 0, 0))  # encoding plain, creator "", extension area ""
    put_varint(body, models)
    body += fields * models
    body.append(0)  # entry_count
    return bytes(body)


def _form1(**change: int) -> bytes:
    """A form-1 record with one field replaced (values as varints where the spec says)."""
    v = {"form": 1, "name_len": 0, "engine": 2, "precision": 24, "length": 1024,
         "start": 1, **change}
    out = bytearray((v["form"],)) + bytes(16)
    put_varint(out, v["name_len"])
    out += bytes((v["engine"], v["precision"]))
    put_varint(out, v["length"])
    out += bytes(12)
    put_varint(out, v["start"])
    return bytes(out)


def _form2(carry: int = 256, chain: int = 8, **change: int) -> bytes:
    """A form-2 record (form 1's fields, then carry and chain: context carry)."""
    out = bytearray(_form1(**{"form": 2, **change}))
    put_varint(out, carry)
    put_varint(out, chain)
    return bytes(out)


def _form3(mix: int = 3, **change: int) -> bytes:
    """A form-3 record (form 2's fields, then mix: adaptive mixing)."""
    out = bytearray(_form2(**{"form": 3, **change}))
    put_varint(out, mix)
    return bytes(out)


@pytest.mark.parametrize(("fields", "error"), [
    (_form1(), None),
    (_form1(form=7), UnsupportedFeatureError),
    (_form1(engine=0), UnsupportedFeatureError),
    (_form1(engine=3), UnsupportedFeatureError),
    (_form1(precision=11), CorruptArchiveError),
    (_form1(precision=29), CorruptArchiveError),
    (_form1(length=0), CorruptArchiveError),
    (_form1(length=65537), CorruptArchiveError),
    (_form1(start=2**32), CorruptArchiveError),
    (_form1(name_len=256), CorruptArchiveError),
    (_form1(name_len=2**60), CorruptArchiveError),  # never allocated
    (_form1()[:20], CorruptArchiveError),  # cut inside the record
    (bytes((0,)) + bytes(32) + b"\x00\x05{bad}", CorruptArchiveError),  # form 0, bad JSON
    (bytes((0,)) + bytes(32) + b"\x00\x80\x80\x04", CorruptArchiveError),  # profile > 64 KiB
    (_form2(), None),
    (_form2(carry=1024), None),  # carry may be the whole segment length
    (_form2(chain=256), None),
    (_form2(carry=0), CorruptArchiveError),
    (_form2(carry=1025), CorruptArchiveError),  # more than L
    (_form2(chain=1), CorruptArchiveError),
    (_form2(chain=257), CorruptArchiveError),
    (_form2(engine=3), UnsupportedFeatureError),
    (_form2()[:-1], CorruptArchiveError),  # chain missing
    (_form3(), None),
    (_form3(mix=1), None),
    (_form3(mix=4), None),
    (_form3(mix=0), CorruptArchiveError),
    (_form3(mix=5), CorruptArchiveError),
    (_form3(precision=25), CorruptArchiveError),  # mixing needs P <= 24
    (_form3(carry=0), CorruptArchiveError),  # form 2's checks still apply
    (_form3()[:-1], CorruptArchiveError),  # mix missing
    (_form1(form=4), UnsupportedFeatureError),
])
def test_hostile_model_records(fields: bytes, error: type[Exception] | None) -> None:
    raw = _model_index(fields)
    if error is None:
        (model,) = decode_small_index(raw, 12).models
        assert encode_model(model) == fields
        return
    with pytest.raises(error):
        decode_small_index(raw, 12)


@pytest.mark.parametrize("raw", [
    b"",  # no encoding byte
    b"\x00\x80\x80\x80\x80\x08",  # creator of 2^31 bytes
    b"\x00\x00\xff\xff\xff\xff\x0f",  # extension area beyond everything
    b"\x00\x00\x00\x80\x02",  # 256 models
    b"\x01\x81\x80\x80\x80\x01",  # zstd body claiming 256 MiB + 1
    b"\x01\x05\x28\xb5\x2f\xfd",  # zstd body: a cut frame
    b"\x00\x00\x00\x00\x00\x00",  # a trailing byte after the entries
])
def test_hostile_index_headers_are_corrupt(raw: bytes) -> None:
    with pytest.raises(CorruptArchiveError):
        decode_small_index(raw, 12)


def test_digest128_mismatch_is_a_checksum_error(tmp_path: Path) -> None:
    out = _pack(tmp_path, files={"a.txt": FILES["a.txt"]})  # alone: no block, DIGEST128
    archive = out.read_bytes()
    _, index = disassemble(archive)
    entry = next(e for e in index.entries if e.name == "a.txt")
    pos = archive.rindex(entry.sha256)
    bad = bytearray(archive)
    bad[pos] ^= 1
    (size,) = struct.unpack("<I", archive[-8:-4])
    index_bytes = bytes(bad[len(bad) - 8 - size:-8])
    if index_bytes[0] != 0:
        pytest.skip("the index was compressed: the digest is not there verbatim")
    bad[-8:] = layout.encode_trailer(index_bytes)
    (tmp_path / "bad.llma").write_bytes(bad)
    with _open(tmp_path / "bad.llma") as ar, pytest.raises(ChecksumMismatchError):
        ar.read("a.txt")


@pytest.mark.parametrize("name", ["lcet10.txt", "plrabn12.txt"])
def test_smollm2_700_byte_text_is_at_most_240_bytes(tmp_path: Path, name: str) -> None:
    """Issue 24's bound, with the embedded model and default options: the first 700
    bytes of two held-out English texts (1.1 wrote 493 and 508 bytes)."""
    text = (CORPUS / name).read_bytes()[:700]
    src = tmp_path / "text.txt"
    src.write_bytes(text)
    out = tmp_path / "t.llma"
    members = llmarc.pack(src, out, llm=LLMOptions(model="smollm2", device="cpu"),
                          warn=lambda m: None)
    assert members[0].codec == "llm"
    assert out.stat().st_size <= 240, out.stat().st_size
    with llmarc.open(out, model="smollm2", device="cpu") as ar:
        assert ar.read("text.txt") == text
