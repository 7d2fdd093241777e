"""Hostile archives: names, collisions, planted symlinks, overwrite refusal."""

from __future__ import annotations

import os

import pytest

import llmarc
from llmarc.errors import DestinationExistsError, UnsafeArchiveError
from llmarc.safety import check_names, validate_name

from .conftest import raw_archive

BAD_NAMES = [
    "/etc/passwd", "../x", "a/../../x", "a/./b", "./a", "a//b", "a/", "", "C:evil",
    "c:/x", "a\\b", "..\\x", "a\0b", "a\nb", "a\x1bb", "a\x7fb", "x" * 256,
    "/".join(["d"] * 2049) + "x" * 10,
]


@pytest.mark.parametrize("name", BAD_NAMES)
def test_bad_names_rejected(name):
    with pytest.raises(UnsafeArchiveError):
        validate_name(name)


@pytest.mark.parametrize("name", ["a", "a/b/c", "ünï/日本", "..a", "a..", ".hidden", "a b"])
def test_good_names_accepted(name):
    validate_name(name)


@pytest.mark.parametrize("names", [
    [("a", False), ("a", False)],
    [("a", False), ("a/b", False)],  # a file used as a directory
])
def test_collisions_rejected(names):
    with pytest.raises(UnsafeArchiveError):
        check_names(names)


@pytest.mark.parametrize("names", [
    [("Readme", False), ("README", False)],
    [("caf\u00e9", False), ("cafe\u0301", False)],  # NFC/NFD twins
    [("Stra\u00dfe", True), ("STRASSE", True)],  # casefold twins
    [("A", False), ("a/b", False)],
])
def test_twins_are_legal_in_an_archive(names):
    """Format 1.1: twins are archived; only extraction onto a folding file system refuses
    them (tests/test_pack_trees.py)."""
    check_names(names)


@pytest.mark.parametrize("name", ["../evil", "/abs", "a/../../evil", "a\\..\\evil"])
def test_hostile_archive_refused_at_open(tmp_path, name):
    p = tmp_path / "h.llma"
    p.write_bytes(raw_archive([(name, b"pwned")]))
    with pytest.raises(UnsafeArchiveError):
        llmarc.open(p)
    assert not (tmp_path.parent / "evil").exists()


def test_duplicates_refused_at_open(tmp_path):
    for files in ([("x", b"1"), ("x", b"2")],):
        p = tmp_path / "d.llma"
        p.write_bytes(raw_archive(files))
        with pytest.raises(UnsafeArchiveError):
            llmarc.open(p)


def test_planted_symlink_in_dest_is_not_followed(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(outside, dest / "sub")
    p = tmp_path / "s.llma"
    p.write_bytes(raw_archive([("sub/f", b"data")], dirs=("sub",)))
    with llmarc.open(p) as ar, pytest.raises(UnsafeArchiveError, match="symbolic link"):
        ar.extract(dest, overwrite=True)
    assert os.listdir(outside) == []
    p.write_bytes(raw_archive([("sub/f", b"data")]))  # implied parent only
    with llmarc.open(p) as ar, pytest.raises(UnsafeArchiveError):
        ar.extract(dest, overwrite=True)
    assert os.listdir(outside) == []


def test_symlink_leaf_is_replaced_not_followed(tmp_path):
    target = tmp_path / "victim"
    target.write_bytes(b"keep")
    dest = tmp_path / "dest"
    dest.mkdir()
    os.symlink(target, dest / "f")
    p = tmp_path / "s.llma"
    p.write_bytes(raw_archive([("f", b"new")]))
    with llmarc.open(p) as ar:
        with pytest.raises(DestinationExistsError):
            ar.extract(dest)
        ar.extract(dest, overwrite=True)
    assert target.read_bytes() == b"keep"
    assert not (dest / "f").is_symlink() and (dest / "f").read_bytes() == b"new"


def test_setuid_bits_in_archive_are_rejected(tmp_path):
    p = tmp_path / "s.llma"
    p.write_bytes(raw_archive([("f", b"x", 0o4755)]))
    with pytest.raises(llmarc.CorruptArchiveError):
        llmarc.open(p)


def test_existing_files_are_not_overwritten_and_no_temp_left(tmp_path):
    p = tmp_path / "a.llma"
    p.write_bytes(raw_archive([("a", b"1"), ("b", b"2")]))
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "b").write_bytes(b"mine")
    with llmarc.open(p) as ar, pytest.raises(DestinationExistsError):
        ar.extract(dest)
    assert sorted(os.listdir(dest)) == ["b"]  # refused before writing anything
    assert (dest / "b").read_bytes() == b"mine"


def test_bad_sha_leaves_no_file(tmp_path):
    from llmarc.container import index as index_module
    from llmarc.container import layout

    idx = layout.Index("t", entries=[layout.EntryRecord(
        "f", layout.TYPE_FILE, 0o644, 0, 3, 0, b"", 32, 3, bytes(32), layout.crc32(b"abc"))])
    p = tmp_path / "b.llma"
    p.write_bytes(index_module.assemble(b"abc", idx))
    with llmarc.open(p) as ar, pytest.raises(llmarc.ChecksumMismatchError):
        ar.extract(tmp_path / "dest")
    assert os.listdir(tmp_path / "dest") == []
