"""Round trips, corruption (every flipped byte, every truncation) and format checks."""

from __future__ import annotations

import hashlib
import os
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import llmarc
from llmarc.container import index as index_module
from llmarc.container import layout
from llmarc.errors import (
    CorruptArchiveError,
    DestinationExistsError,
    LlmarcError,
    MemberNotFoundError,
    SourceError,
    UnsupportedFeatureError,
)

from .conftest import make_tree, raw_archive, snapshot

NAME_CHARS = st.characters(min_codepoint=0x20, max_codepoint=0x2FFF,
                           blacklist_categories=("Cs", "Cc"), blacklist_characters="/\\:")
component = st.text(NAME_CHARS, min_size=1, max_size=12).filter(
    lambda s: s not in (".", "..") and len(s.encode()) <= 255)


@st.composite
def trees(draw):
    spec: dict[str, bytes | None] = {}
    folded: set[str] = set()
    for _ in range(draw(st.integers(0, 8))):
        depth = draw(st.integers(1, 3))
        parts = [draw(component) for _ in range(depth)]
        name = "/".join(parts)
        keys = {llmarc.safety.fold("/".join(parts[:i + 1])) for i in range(depth)}
        if keys & folded:
            continue
        folded |= keys
        spec[name] = None if draw(st.booleans()) and depth < 3 else draw(st.binary(max_size=300))
    return spec


def _tree_ok(spec):
    # a file may not be the parent of another entry
    files = {n for n, c in spec.items() if c is not None}
    return not any(n.startswith(f + "/") for n in spec for f in files)


@settings(max_examples=25, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(spec=trees(), codec=st.sampled_from(["auto", "zstd", "store"]), solid=st.booleans())
def test_random_tree_roundtrip(tmp_path_factory, spec, codec, solid):
    if not _tree_ok(spec):
        return
    base = tmp_path_factory.mktemp("rt")
    src = make_tree(base / "src", spec)
    for i, p in enumerate(sorted(src.rglob("*"))):
        if p.is_file():
            os.chmod(p, 0o600 + (i % 2) * 0o044)
        os.utime(p, ns=(1_500_000_000_123_456_789 + i, 1_500_000_000_123_456_789 + i))
    before = snapshot(src)
    llmarc.pack(src, base / "a.llma", codec=codec, level=3, solid=solid)
    assert snapshot(src) == before  # sources untouched
    with llmarc.open(base / "a.llma") as ar:
        ar.test()
        ar.extract(base / "out")
        for m in ar.members():
            if m.is_file():
                assert ar.read(m.name) == (src / m.name).read_bytes()
    assert snapshot(base / "out") == before


def test_roundtrip_metadata_unicode_empty_and_big(tmp_path):
    big = hashlib.shake_256(b"seed").digest(3 * 1024 * 1024 + 17)  # incompressible, multi-MB
    src = make_tree(tmp_path / "src", {
        "empty-dir": None, "ünïcødé/日本語.txt": "こんにちは\n".encode() * 50,
        "empty.txt": b"", "big.bin": big, "deep/er/still/x": b"x" * 100_000,
    })
    os.chmod(src / "empty.txt", 0o4755)  # setuid must be stripped
    os.chmod(src / "deep/er", 0o555)  # a read-only directory still gets its contents
    os.utime(src / "empty-dir", ns=(123, 456_789_000_000))
    try:
        members = llmarc.pack(src, tmp_path / "a.llma", level=3)
        by_name = {m.name: m for m in members}
        assert by_name["big.bin"].codec == "store"
        assert by_name["deep/er/still/x"].codec == "zstd"
        assert by_name["empty.txt"].mode == 0o755
        assert by_name["empty-dir"].type == "dir"
        assert by_name["big.bin"].sha256 == hashlib.sha256(big).hexdigest()
        with llmarc.open(tmp_path / "a.llma") as ar:
            ar.extract(tmp_path / "out")
        got, want = snapshot(tmp_path / "out"), snapshot(src)
        want["empty.txt"] = ("file", 0o755, *want["empty.txt"][2:])
        assert got == want
    finally:
        os.chmod(src / "deep/er", 0o755)
        os.chmod(tmp_path / "out/deep/er", 0o755)


def test_api_surface(small_archive, tmp_path):
    with llmarc.open(small_archive) as ar:
        assert ar.version == (3, 0)
        assert ar.creator == ""  # format 3.0: no creator below 4 KiB of data (§12.5)
        assert ar.models == []
        names = [m.name for m in ar.members()]
        assert set(names) == {"d", "d/a.txt", "b.txt", "e", "r.bin"}
        m = ar.getmember("d/a.txt")
        assert m.type == "file" and m.codec == "zstd" and m.size == 72
        assert 0 < m.bits_per_byte < 8
        assert ar.read("d") == b""
        with pytest.raises(MemberNotFoundError):
            ar.getmember("nope")
        with pytest.raises(KeyError):
            ar.read("nope")
        got = ar.extract(tmp_path / "one", ["d"])
        assert {g.name for g in got} == {"d", "d/a.txt"}
        assert not (tmp_path / "one/b.txt").exists()
        with pytest.raises(DestinationExistsError):
            ar.extract(tmp_path / "one", ["d/a.txt"])
        (tmp_path / "one/d/a.txt").write_bytes(b"changed")
        ar.extract(tmp_path / "one", ["d/a.txt"], overwrite=True)
        assert (tmp_path / "one/d/a.txt").read_bytes() == b"hello hello hello hello\n" * 3
    with pytest.raises(DestinationExistsError):
        llmarc.pack(tmp_path / "one", small_archive)


def test_pack_errors_and_no_partial_archive(tmp_path, monkeypatch):
    with pytest.raises(SourceError):
        llmarc.pack(tmp_path / "missing", tmp_path / "x.llma")
    os.mkfifo(tmp_path / "f")  # a single regular file packs (issue 23); a FIFO never
    with pytest.raises(SourceError, match="neither a directory nor a regular file"):
        llmarc.pack(tmp_path / "f", tmp_path / "x.llma")
    src = make_tree(tmp_path / "src", {"a": b"1" * 1000, "b": b"2" * 1000})
    from llmarc import packer

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(packer.zstd_codec, "encode", boom)
    with pytest.raises(KeyboardInterrupt):
        llmarc.pack(src, tmp_path / "x.llma", codec="zstd")
    assert sorted(os.listdir(tmp_path)) == ["f", "src"]


def test_pack_skips_symlinks_and_includes_nothing_of_the_archive(tmp_path):
    src = make_tree(tmp_path / "src", {"a": b"data"})
    os.symlink("/etc/passwd", src / "link")
    os.symlink("a", src / "link2")
    with pytest.raises(SourceError, match="2 paths"):  # never dropped silently
        llmarc.pack(src, src / "self.llma")
    report = llmarc.packer.PackReport()
    with pytest.warns(llmarc.SkippedEntryWarning):
        members = llmarc.pack(src, src / "self.llma", skip_failed=True, report=report)
    assert [m.name for m in members] == ["a"]
    assert sorted(os.path.basename(p.path) for p in report.skipped) == ["link", "link2"]


def test_case_twins_in_source_are_archived(tmp_path):
    src = make_tree(tmp_path / "src", {"A.txt": b"1", "a.txt": b"2"})
    members = llmarc.pack(src, tmp_path / "x.llma")
    assert sorted(m.name for m in members) == ["A.txt", "a.txt"]


@pytest.mark.parametrize("solid", [True, False])
def test_every_flipped_byte_is_a_typed_error(small_archive, tmp_path, solid):
    if not solid:
        llmarc.pack(small_archive.parent / "src", tmp_path / "ns.llma", codec="zstd", level=3,
                    solid=False)
        small_archive = tmp_path / "ns.llma"
    data = small_archive.read_bytes()
    target = tmp_path / "flip.llma"
    for i in range(len(data)):
        for mask in (0x01, 0x80):
            bad = bytearray(data)
            bad[i] ^= mask
            target.write_bytes(bad)
            with pytest.raises(LlmarcError), llmarc.open(target) as ar:
                ar.test()


def test_every_truncation_is_a_typed_error(small_archive, tmp_path):
    data = small_archive.read_bytes()
    target = tmp_path / "cut.llma"
    for n in range(len(data)):
        target.write_bytes(data[:n])
        with pytest.raises(CorruptArchiveError):
            llmarc.open(target)
    target.write_bytes(data + b"\0")
    with pytest.raises(CorruptArchiveError):
        llmarc.open(target)


def test_versions_extensions_and_codecs():
    ok = raw_archive([("a", b"x")])
    assert layout.decode_header(ok).major == 1
    newer_minor = raw_archive([("a", b"x")], minor=7)
    assert layout.decode_header(newer_minor).minor == 7
    with pytest.raises(UnsupportedFeatureError, match=r"2\.0"):  # reserved (§12)
        layout.decode_header(raw_archive([("a", b"x")], major=2))
    with pytest.raises(UnsupportedFeatureError, match=r"4\.0"):
        layout.decode_header(raw_archive([("a", b"x")], major=4))
    assert layout.decode_header(layout.encode_small_header() + bytes(13)).major == 3
    idx = layout.Index("t", extensions=(layout.Extension(0x0001, b"ignored"),))
    decoded = index_module.decode_index(index_module.encode_index(idx))
    assert decoded.extensions[0].value == b"ignored"
    idx = layout.Index("t", extensions=(layout.Extension(0x8123, b""),))
    with pytest.raises(UnsupportedFeatureError, match="0x8123"):
        index_module.decode_index(index_module.encode_index(idx))


def test_model_table_roundtrip():
    prof = layout.canonical_json({"b": 1, "a": [1, 2], "dtype": "float32"})
    m = layout.ModelRecord(bytes(range(32)), "SmolLM2-135M", prof)
    idx = index_module.decode_index(index_module.encode_index(layout.Index("t", models=[m])))
    assert idx.models == [m]
    bad = layout.ModelRecord(bytes(32), "x", '{"b": 1}')  # not canonical
    with pytest.raises(CorruptArchiveError):
        index_module.decode_index(index_module.encode_index(layout.Index("t", models=[bad])))


def test_unknown_codec_is_unsupported_but_listable(tmp_path):
    data = raw_archive([("a", b"x")])
    # rewrite the codec id of the only entry: easiest through the layout API
    _, idx = index_module.disassemble(data)  # a 1.0 archive (raw_archive)
    e = idx.entries[0]
    idx.entries[0] = layout.EntryRecord(e.name, e.type, e.mode, e.mtime_ns, e.size, 9, b"",
                                        e.stored_offset, e.stored_size, e.sha256, e.crc32)
    p = tmp_path / "u.llma"
    p.write_bytes(index_module.assemble(b"x", idx))
    with llmarc.open(p) as ar:
        assert ar.members()[0].codec == "#9"
        with pytest.raises(UnsupportedFeatureError, match="codec id 9"):
            ar.read("a")
        with pytest.raises(UnsupportedFeatureError):
            ar.extract(tmp_path / "out")
    assert not (tmp_path / "out" / "a").exists()


def _index_bytes(archive: bytes) -> bytes:
    """The index of a written (format 3.0) archive: before the 8-byte trailer."""
    (size,) = struct.unpack("<I", archive[-8:-4])
    return archive[len(archive) - 8 - size:-8]


def test_zstd_bomb_stops_at_declared_size(tmp_path):
    import zstandard

    frame = zstandard.ZstdCompressor(level=1).compress(b"\0" * (50 << 20))
    idx = layout.Index("t", entries=[layout.EntryRecord(
        "bomb", layout.TYPE_FILE, 0o644, 0, 10, 1, b"", 32, len(frame),
        hashlib.sha256(b"\0" * 10).digest(), layout.crc32(frame))])
    p = tmp_path / "bomb.llma"
    p.write_bytes(index_module.assemble(frame, idx))
    with llmarc.open(p) as ar, pytest.raises(CorruptArchiveError, match="more than"):
        ar.read("bomb")


def test_huge_declared_offsets_and_sizes(tmp_path):
    for off, ssize, size in [(2**63, 1, 1), (32, 2**40, 2**40), (32, 1, 2**63 + 5)]:
        idx = layout.Index("t", entries=[layout.EntryRecord(
            "a", layout.TYPE_FILE, 0o644, 0, size, 0, b"", off, ssize, bytes(32), 0)])
        p = tmp_path / "h.llma"
        p.write_bytes(index_module.assemble(b"x", idx))
        with pytest.raises(CorruptArchiveError):
            llmarc.open(p)


def test_llm_entry_naming_a_missing_model_is_corrupt(tmp_path):
    idx = layout.Index("t", entries=[layout.EntryRecord(
        "t.txt", layout.TYPE_FILE, 0o644, 0, 5, 2, b"\0\0", 32, 1, bytes(32),
        layout.crc32(b"z"))])
    p = tmp_path / "llm.llma"
    p.write_bytes(index_module.assemble(b"z", idx))
    with llmarc.open(p) as ar:
        assert ar.getmember("t.txt").codec == "llm"
        with pytest.raises(CorruptArchiveError, match="names model 0 but the table has 0"):
            ar.test()


def test_reader_reads_only_footer_index_and_member(small_archive, monkeypatch):
    seen: list[tuple[int, int]] = []
    real = os.pread

    def spy(fd, n, off):
        seen.append((off, n))
        return real(fd, n, off)

    monkeypatch.setattr(os, "pread", spy)
    with llmarc.open(small_archive) as ar:
        ar.members()
        opened = list(seen)
        ar.read("r.bin")
        read_calls = seen[len(opened):]
        e = ar._entries[ar._by_name["r.bin"]]
    size = small_archive.stat().st_size
    (isize,) = struct.unpack("<I", small_archive.read_bytes()[-8:-4])
    off = size - 8 - isize
    assert opened == [(0, 32), (size - 8, 8), (off, isize)]  # the header read once
    assert read_calls
    assert all(o >= e.stored_offset and o + n <= e.stored_offset + e.stored_size
               for o, n in read_calls)


def test_choose_classifies():
    from llmarc.codecs import choose

    assert choose.is_text("héllo wörld\n".encode() * 20)
    assert not choose.is_text(b"\0\1\2\3" * 20)
    assert not choose.is_text(bytes(range(128, 256)) * 4)
    assert choose.choose(b"", 0, iter([]), frozenset({"zstd", "store"})) == "store"
    rnd = os.urandom(4096)
    assert choose.choose(rnd, 4096, iter([rnd]), frozenset({"zstd", "store"})) == "store"
    txt = b"abc " * 1000
    assert choose.choose(txt, 4000, iter([txt]), frozenset({"zstd", "store"})) == "zstd"
    assert choose.choose(txt, 4000, iter([txt]), frozenset({"zstd", "store", "llm"})) == "llm"


def test_solid_block_member_read_and_partial_extract(tmp_path):
    spec = {f"f{i:02d}.txt": f"file {i} ".encode() * (i * 50 + 1) for i in range(12)}
    src = make_tree(tmp_path / "src", spec)
    llmarc.pack(src, tmp_path / "s.llma", codec="zstd", level=3)
    with llmarc.open(tmp_path / "s.llma") as ar:
        ms = ar.members()
        assert sum(m.packed_size for m in ms) == Path(tmp_path / "s.llma").stat().st_size - \
            12 - 8 - len(_index_bytes((tmp_path / "s.llma").read_bytes()))
        for name, data in spec.items():
            assert ar.read(name) == data
        ar.extract(tmp_path / "o", ["f03.txt", "f07.txt"])
    assert sorted(os.listdir(tmp_path / "o")) == ["f03.txt", "f07.txt"]


def test_a_new_archive_gets_the_usual_permissions(tmp_path):
    import stat

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a").write_bytes(b"x")
    umask = os.umask(0o022)
    try:
        llmarc.pack(tmp_path / "src", tmp_path / "a.llma")
    finally:
        os.umask(umask)
    assert stat.S_IMODE((tmp_path / "a.llma").stat().st_mode) == 0o644
