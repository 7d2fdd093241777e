"""The compact entry table of format 1.1 (spec/format.md §4.2): roundtrip, size, bounds."""

from __future__ import annotations

import hashlib
import struct
import tracemalloc
import zlib

import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

import llmarc
from llmarc.container import compact, layout
from llmarc.container import index as index_module
from llmarc.container.layout import (
    EMPTY_SHA256,
    EXT_COMPACT_ENTRIES,
    HEADER_SIZE,
    TYPE_DIR,
    TYPE_FILE,
    EntryRecord,
    Extension,
)
from llmarc.errors import CorruptArchiveError, UnsupportedFeatureError

I64 = st.integers(-(2**63), 2**63 - 1)


def _file(name: str, size: int, pos: int, mtime: int = 0, stored: int | None = None,
          codec: int = 0) -> EntryRecord:
    stored = size if stored is None else stored
    return EntryRecord(name, TYPE_FILE, 0o644, mtime, size, codec, b"", pos, stored,
                       hashlib.sha256(name.encode()).digest(), zlib.crc32(name.encode()))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.text(st.characters(min_codepoint=0x21, max_codepoint=0x2FFF,
                                                blacklist_characters="/\\"),
                                  min_size=1, max_size=12),
                          I64, st.integers(0, 5000), st.booleans()),
                min_size=1, max_size=30, unique_by=lambda t: t[0]),
       st.sampled_from([0, 3]))
def test_roundtrip_any_names_mtimes_and_sizes(items, level):
    entries, pos = [], HEADER_SIZE
    for name, mtime, size, is_dir in sorted(items):
        if is_dir:
            entries.append(EntryRecord(name, TYPE_DIR, 0o755, mtime, 0, 0, b"", 0, 0,
                                       EMPTY_SHA256, 0))
        else:
            entries.append(_file(name, size, pos, mtime))
            pos += size
    table = compact.encode_table(entries, level)
    assert compact.decode_table(table, pos) == entries


def test_solid_members_roundtrip_with_crc_and_implicit_fields():
    datas = [b"alpha" * 3, b"", b"beta" * 7]
    block = zstandard.ZstdCompressor().compress(b"".join(datas))
    shares = compact.solid_shares([len(d) for d in datas], len(block))
    entries, skip = [], 0
    for i, (d, share) in enumerate(zip(datas, shares, strict=True)):
        entries.append(EntryRecord(f"s/{i}", TYPE_FILE, 0o600, 5, len(d), 1,
                                   struct.pack("<QQ", skip, share), HEADER_SIZE, len(block),
                                   b"", zlib.crc32(block), (), zlib.crc32(d)))
        skip += len(d)
    entries.insert(1, EntryRecord("s", TYPE_DIR, 0o755, 5, 0, 0, b"", 0, 0, EMPTY_SHA256, 0))
    entries.append(_file("z", 3, HEADER_SIZE + len(block)))
    decoded = compact.decode_table(compact.encode_table(entries), HEADER_SIZE + len(block) + 3)
    assert decoded == entries
    assert sum(shares) == len(block)


def test_ten_thousand_small_entries_cost_a_few_bytes_each():
    entries, pos = [], HEADER_SIZE
    for i in range(10_000):
        e = _file(f"src/dir{i // 100:03d}/part{i:05d}.txt", 40 + i % 97, pos,
                  1_700_000_000_000_000_000 + i * 4_000_000, stored=0, codec=1)
        entries.append(EntryRecord(e.name, e.type, e.mode, e.mtime_ns, e.size, 1,
                                   struct.pack("<QQ", 0, 0), HEADER_SIZE, 1000, b"", 7, (),
                                   zlib.crc32(e.name.encode())))
    table = compact.encode_table(entries)
    assert len(table) < 10_000 * 8  # 1.0: about 114 bytes per entry


def test_a_1_0_reader_refuses_the_table_by_name():
    value = compact.encode_table([_file("a", 1, HEADER_SIZE)])
    raw = layout.encode_ext_area((Extension(EXT_COMPACT_ENTRIES, value),))
    with pytest.raises(UnsupportedFeatureError, match="0x8001"):
        layout.decode_ext_area(raw, "archive")  # what a reader without tag 0x8001 does


def test_a_bomb_table_stops_at_its_declared_size_without_allocating_it():
    frame = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(
        b"\0" * (64 << 20))
    value = bytes((1,)) + struct.pack("<I", 1000) + frame
    tracemalloc.start()
    try:
        with pytest.raises(CorruptArchiveError, match="more than the declared"):
            compact.decode_table(value)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_a_table_frame_declaring_another_size_is_refused_before_decoding():
    """The header checks of an entry's frame apply to the table's (format.md §4.2)."""
    frame = zstandard.ZstdCompressor(level=19).compress(b"\0" * (64 << 20))
    with pytest.raises(CorruptArchiveError, match="declares 67108864 bytes"):
        compact.decode_table(bytes((1,)) + struct.pack("<I", 1000) + frame)


def test_a_huge_declared_size_is_never_allocated():
    frame = zstandard.ZstdCompressor(write_content_size=False).compress(b"\x00")
    value = bytes((1,)) + struct.pack("<I", 200 << 20) + frame
    tracemalloc.start()
    try:
        with pytest.raises(CorruptArchiveError, match="decodes to 1 bytes"):
            compact.decode_table(value)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20


def test_front_coded_names_are_capped_as_a_whole(monkeypatch):
    body = bytearray()
    compact.put_varint(body, 50)
    for i in range(50):
        compact.put_varint(body, 0 if i == 0 else 99)  # keep 99 bytes, add one
        compact.put_varint(body, 100 if i == 0 else 1)
        body += (b"a" * 99 + b"b") if i == 0 else bytes((0x41 + i,))
        body += bytes((TYPE_DIR, 0)) + b"\xed\x03\x00\x00\x00"
    value = bytes((0,)) + struct.pack("<I", len(body)) + bytes(body)
    assert len(compact.decode_table(value)) == 50
    monkeypatch.setattr(compact, "MAX_NAME_TOTAL", 49 * 100)
    with pytest.raises(CorruptArchiveError, match="names add up"):
        compact.decode_table(value)


def test_tables_that_do_not_tile_are_refused_by_the_encoder():
    with pytest.raises(ValueError, match="tile"):
        compact.encode_table([_file("a", 5, HEADER_SIZE + 1)])


def test_packed_archives_are_1_1_and_list_every_member(tmp_path):
    src = tmp_path / "src"
    for i in range(300):
        d = src / f"d{i % 7}"
        d.mkdir(parents=True, exist_ok=True)
        (d / f"f{i}.txt").write_bytes(f"file {i}\n".encode() * (i % 5))
    members = llmarc.pack(src, tmp_path / "a.llma", codec="zstd")
    with llmarc.open(tmp_path / "a.llma") as ar:
        assert ar.version == (3, 0)
        assert [m.name for m in ar.members()] == [m.name for m in members]
        for m in ar.members():
            if m.is_file():
                assert ar.read(m.name) == (src / m.name).read_bytes()
    raw = (tmp_path / "a.llma").read_bytes()
    footer = layout.decode_trailer(raw[-8:], len(raw))
    _, index = index_module.disassemble(raw)
    assert len(index.entries) == len(members)
    assert footer.index_size < 300 * 16  # 1.0 needed over 100 bytes per entry
