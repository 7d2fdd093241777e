"""LLM solid blocks (spec/format.md §12.6, spec/llm-codec.md §3.5): small text files
coded as one LLM payload, so each is predicted after the files before it.

Roundtrips are byte for byte; the hostile cases are built by hand (the writer refuses to
make them) and must give the spec's error class at open or at read."""

from __future__ import annotations

import struct
import zlib
from dataclasses import replace
from pathlib import Path

import pytest

import llmarc
from llmarc import packer
from llmarc.codecs.llm_options import LLMOptions
from llmarc.container import compact
from llmarc.container.index import assemble_small, disassemble
from llmarc.container.layout import (
    EXT_LLM_BLOCKS,
    Extension,
    Index,
    encode_ext_area,
)
from llmarc.errors import ChecksumMismatchError, CorruptArchiveError, UnsupportedFeatureError
from llmarc.update import delete, update

from .conftest import TINY_BPE, make_tree

FIXTURES = Path(__file__).resolve().parents[1] / "fixtures"
TEXT = (FIXTURES / "tiny-training.txt").read_bytes()
#: Five small texts (two of them in a subfolder) and one over LLM_BLOCK_MEMBER.
FILES = {f"notes/n{i}.txt": TEXT[i * 700:(i + 1) * 700] for i in range(3)} | {
    "a.txt": TEXT[3000:3500], "b.txt": TEXT[4000:4900]}
OPTIONS = LLMOptions(model=str(TINY_BPE), device="cpu", segment_length=64)


def _pack(tmp_path: Path, files: dict[str, bytes] = FILES, **kw) -> Path:
    src = make_tree(tmp_path / "src", files)
    out = tmp_path / "a.llma"
    llmarc.pack(src, out, codec="llm", llm=kw.pop("llm", OPTIONS), warn=lambda m: None, **kw)
    return out


def _open(path: Path) -> llmarc.ArchiveReader:
    return llmarc.open(path, model=str(TINY_BPE), device="cpu")


def _extracted(tmp_path: Path, archive: Path) -> dict[str, bytes]:
    dest = tmp_path / "out"
    with _open(archive) as ar:
        ar.extract(dest)
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*")
            if p.is_file()}


def test_small_texts_share_one_block_and_roundtrip(tmp_path: Path) -> None:
    out = _pack(tmp_path)
    with _open(out) as ar:
        files = [m for m in ar.members() if m.is_file()]
        assert ar._llm_blocks and ar.extensions == ()  # the tag is the format's own
        (block,) = set(ar._blocks.values())
        assert block.codec == 2 and block.total == sum(map(len, FILES.values()))
        assert len(block.members) == len(files) == len(FILES)
        assert all(m.codec == "llm" and m.sha256 == "" and len(m.codec_params) == 18
                   for m in files)  # a CRC-32 each; llm params + skip + share in memory
        assert sum(m.packed_size for m in files) == block.stored_size
        assert ar.read("b.txt") == FILES["b.txt"]  # one member: the block decodes whole
        ar.test()
    assert _extracted(tmp_path, out) == FILES


def test_the_block_payload_codes_the_members_back_to_back(tmp_path: Path) -> None:
    """A block's stored bytes are exactly the LLM payload of its members' concatenation
    (llm-codec.md §3.5): the payload of one file holding them all."""
    out = _pack(tmp_path)
    with _open(out) as ar:
        (block,) = set(ar._blocks.values())
        order = [ar._entries[i].name for i in block.members]
        payload = b"".join(ar._stored(block.offset, block.stored_size))
    one = _pack(tmp_path / "one", {"all.txt": b"".join(FILES[n] for n in order)})
    with _open(one) as ar:
        (e,) = ar._entries
        assert b"".join(ar._stored(e.stored_offset, e.stored_size)) == payload


def test_no_solid_and_large_files_stay_single_members(tmp_path: Path) -> None:
    big = (TEXT * 8)[:packer.LLM_BLOCK_MEMBER]
    out = _pack(tmp_path, FILES | {"big.txt": big}, solid=False)
    with _open(out) as ar:
        assert not ar._blocks and not ar._llm_blocks
    out = _pack(tmp_path / "2", FILES | {"big.txt": big})
    with _open(out) as ar:
        assert ar._entries[ar._by_name["big.txt"]].stored_offset not in {
            b.offset for b in ar._blocks.values()}
        # big.txt comes between b.txt and notes/ in source order: it ends a block
        assert sorted(len(b.members) for b in set(ar._blocks.values())) == [2, 3]


@pytest.mark.parametrize(("sizes", "units"), [
    ([], []),
    ([100], [[0]]),
    ([100, 200, 300], [[0, 1, 2]]),
    ([100, 20 << 10, 300, 400], [[0], [1], [2, 3]]),
    ([40 << 10, 30 << 10, 10 << 10], [[0], [1], [2]]),  # 40 KiB is over the member cap
    ([15 << 10] * 5, [[0, 1, 2, 3], [4]]),  # 64 KiB a block at most
    ([0, 5, 0], [[0, 1, 2]]),
])
def test_llm_units(sizes: list[int], units: list[list[int]]) -> None:
    assert packer.llm_units(sizes, True) == units
    assert packer.llm_units(sizes, False) == [[i] for i in range(len(sizes))]


def test_a_1_1_archive_has_no_blocks(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr("llmarc.container.writer.WRITE_SMALL", False)
    out = _pack(tmp_path)
    with _open(out) as ar:
        assert ar.version[0] == 1 and not ar._blocks
    assert _extracted(tmp_path, out) == FILES


def test_blocks_with_context_carry_roundtrip(tmp_path: Path) -> None:
    options = LLMOptions(model=str(TINY_BPE), device="cpu", segment_length=32, carry=8)
    out = _pack(tmp_path, llm=options)
    with _open(out) as ar:
        assert len(set(ar._blocks.values())) == 1 and "carry" in ar.models[0].profile
    assert _extracted(tmp_path, out) == FILES


def test_update_recodes_the_rest_of_a_block_from_its_files(tmp_path: Path) -> None:
    out = _pack(tmp_path)
    changed = TEXT[6000:6600]
    (tmp_path / "src" / "a.txt").write_bytes(changed)
    update(out, tmp_path / "src", codec="llm", llm=OPTIONS, warn=lambda m: None)
    with _open(out) as ar:
        blocks = set(ar._blocks.values())
        assert len(blocks) == 1 and blocks.pop().codec == 2  # still one LLM block
    assert _extracted(tmp_path, out) == FILES | {"a.txt": changed}


def test_delete_keeps_the_rest_of_a_block_as_zstd(tmp_path: Path) -> None:
    out = _pack(tmp_path)
    delete(out, ["notes/n1.txt"])
    with _open(out) as ar:
        (block,) = set(ar._blocks.values())
        assert block.codec == 1 and len(block.members) == len(FILES) - 1
        assert not ar._llm_blocks  # no LLM block left: no tag either
    rest = {k: v for k, v in FILES.items() if k != "notes/n1.txt"}
    assert _extracted(tmp_path, out) == rest


def test_a_member_with_a_wrong_crc_fails_alone(tmp_path: Path) -> None:
    out = _pack(tmp_path)
    data, index = disassemble(out.read_bytes())
    i = next(j for j, e in enumerate(index.entries) if e.name == "a.txt")
    index.entries[i] = _with(index.entries[i], data_crc32=index.entries[i].data_crc32 ^ 1)
    bad = tmp_path / "bad.llma"
    bad.write_bytes(_archive(data, index))
    with _open(bad) as ar:
        with pytest.raises(ChecksumMismatchError):
            ar.read("a.txt")
        assert ar.read("b.txt") == FILES["b.txt"]


def test_a_damaged_payload_fails_every_member(tmp_path: Path) -> None:
    out = _pack(tmp_path)
    data, index = disassemble(out.read_bytes())
    damaged = bytearray(data)
    damaged[len(data) // 2] ^= 0x55  # the data area is the block's payload alone
    crc = zlib.crc32(bytes(damaged))  # the stored CRC agrees: only decoding can tell
    index.entries[:] = [_with(e, crc32=crc) if e.type == 0 else e for e in index.entries]
    bad = tmp_path / "bad.llma"
    bad.write_bytes(_archive(bytes(damaged), index))
    with _open(bad) as ar, pytest.raises(llmarc.DamagedMembersError) as caught:
        ar.test(keep_going=True)
    assert {m.name for m, _ in caught.value.failures} == set(FILES)


# ---------------------------------------------------------------- hostile records


def _with(e, **fields):
    return replace(e, **fields)


def _archive(data: bytes, index: Index, exts: bytes | None = None) -> bytes:
    """A 3.0 archive whose archive extension area is ``exts`` (default: as the writer
    makes it, the tag 0x8002 when the entries hold an LLM block); no validation."""
    return assemble_small(data, index, ext_area=exts)


@pytest.fixture(scope="module")
def block_archive(tmp_path_factory) -> tuple[bytes, Index]:
    return disassemble(_pack(tmp_path_factory.mktemp("block")).read_bytes())


def _hostile(tmp_path: Path, raw: bytes) -> Path:
    path = tmp_path / "hostile.llma"
    path.write_bytes(raw)
    return path


def test_the_writers_own_form_opens(tmp_path: Path, block_archive) -> None:
    data, index = block_archive
    with _open(_hostile(tmp_path, _archive(data, index))) as ar:
        assert ar.read("a.txt") == FILES["a.txt"]


@pytest.mark.parametrize("exts", [
    b"",  # no tag: a solid flag with codec 2 is corrupt (§4.2)
    encode_ext_area((Extension(EXT_LLM_BLOCKS, b"x"),)),  # the tag's value must be empty
])
def test_a_block_needs_the_empty_tag(tmp_path: Path, block_archive, exts: bytes) -> None:
    data, index = block_archive
    with pytest.raises(CorruptArchiveError):
        _open(_hostile(tmp_path, _archive(data, index, exts)))


def test_the_tag_is_unknown_to_a_1_x_archive_and_to_entries() -> None:
    from llmarc.container.layout import decode_ext_area

    area = encode_ext_area((Extension(EXT_LLM_BLOCKS, b""),))
    with pytest.raises(UnsupportedFeatureError, match="0x8002"):
        decode_ext_area(area, "entry 'a'")  # what 1.x archive areas and entries know


def test_a_next_record_of_another_codec_is_corrupt(tmp_path: Path, block_archive) -> None:
    data, index = block_archive
    entries = list(index.entries)
    i = next(j for j, e in enumerate(entries) if e.name == "b.txt")
    entries[i] = _with(entries[i], codec_id=1, codec_params=entries[i].codec_params[2:])
    with pytest.raises(CorruptArchiveError, match="another codec"):
        _open(_hostile(tmp_path, _archive(data, Index("", index.models, entries))))


@pytest.mark.parametrize("cut", [0, 1, 3])
def test_a_first_record_needs_two_bytes_of_params(tmp_path: Path, block_archive,
                                                  monkeypatch, cut: int) -> None:
    data, index = block_archive
    monkeypatch.setattr(compact, "LLM_PARAMS_BYTES", cut)  # what the encoder writes
    raw = _archive(data, index)
    monkeypatch.undo()
    with pytest.raises(CorruptArchiveError, match="solid block flags"):
        _open(_hostile(tmp_path, raw))


@pytest.mark.parametrize("length", [0, 3, 19])
def test_plain_llm_params_are_checked_at_open_with_the_tag(tmp_path: Path,
                                                           length: int) -> None:
    lone = _pack(tmp_path / "lone", {"x.txt": FILES["a.txt"]})
    ldata, lindex = disassemble(lone.read_bytes())
    (e,) = lindex.entries
    e = _with(e, codec_params=bytes(length), sha256=e.sha256[:16])
    tag = encode_ext_area((Extension(EXT_LLM_BLOCKS, b""),))
    with pytest.raises(CorruptArchiveError, match="llm params"):
        _open(_hostile(tmp_path, _archive(ldata, Index("", lindex.models, [e]), tag)))


def test_a_block_of_no_bytes_is_corrupt(tmp_path: Path, block_archive) -> None:
    data, index = block_archive
    entries = [_with(e, size=0) for e in index.entries]
    with pytest.raises(CorruptArchiveError, match="holds no byte"):
        _open(_hostile(tmp_path, _archive(data, Index("", index.models, entries))))


@pytest.mark.parametrize("delta", [-1, 1])
def test_sizes_that_disagree_with_the_payload_are_corrupt(tmp_path: Path, block_archive,
                                                          delta: int) -> None:
    data, index = block_archive
    entries = list(index.entries)
    i = next(j for j, e in enumerate(entries) if e.name == "b.txt")
    entries[i] = _with(entries[i], size=entries[i].size + delta)
    path = _hostile(tmp_path, _archive(data, Index("", index.models, entries)))
    with _open(path) as ar, pytest.raises(CorruptArchiveError):
        ar.read("a.txt")


def test_the_first_record_of_a_block_names_the_model(tmp_path: Path, block_archive) -> None:
    data, index = block_archive
    entries = [_with(e, codec_params=struct.pack("<H", 7) + e.codec_params[2:])
               for e in index.entries]
    path = _hostile(tmp_path, _archive(data, Index("", index.models, entries)))
    with _open(path) as ar, pytest.raises(CorruptArchiveError):
        ar.read("a.txt")
