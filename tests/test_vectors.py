"""Every container test vector in spec/vectors/{good,bad,unsupported} behaves as listed."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pytest

import llmarc
import llmarc.errors

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text(encoding="utf-8"))


def test_manifest_lists_every_file():
    for kind in ("good", "bad", "unsupported"):
        assert sorted(p.name for p in (VECTORS / kind).glob("*.llma")) == sorted(MANIFEST[kind])


@pytest.mark.parametrize("name", sorted(MANIFEST["good"]))
def test_good_vector(name, tmp_path):
    expected = MANIFEST["good"][name]["members"]
    with llmarc.open(VECTORS / "good" / name) as ar:
        got = {m.name: ("dir" if m.is_dir() else m.sha256) for m in ar.members()}
        assert set(got) == set(expected)
        for member, digest in got.items():  # 1.1 solid members record a CRC-32 instead,
            # 3.0 DIGEST128 members the SHA-256's first 16 bytes (format.md §12.4)
            assert digest in (expected[member], "") or (
                len(digest) == 32 and expected[member].startswith(digest))
        ar.test()
        for m in ar.members():
            if m.is_file():
                assert hashlib.sha256(ar.read(m.name)).hexdigest() == expected[m.name]
        ar.extract(tmp_path)
    for member, digest in expected.items():
        p = tmp_path / member
        if digest == "dir":
            assert p.is_dir()
        else:
            assert hashlib.sha256(p.read_bytes()).hexdigest() == digest


def _exercise(path: Path, dest: Path) -> None:
    with llmarc.open(path) as ar:
        ar.test()
        ar.extract(dest)


@pytest.mark.parametrize("name", sorted(MANIFEST["bad"]))
def test_bad_vector(name, tmp_path):
    error = getattr(llmarc.errors, MANIFEST["bad"][name]["error"])
    with pytest.raises(error):
        _exercise(VECTORS / "bad" / name, tmp_path / "out")
    leftovers = list((tmp_path / "out").rglob("*")) if (tmp_path / "out").exists() else []
    assert [p for p in leftovers if p.is_file()] == []
    assert not os.path.exists(tmp_path / "evil.txt")


@pytest.mark.parametrize("name", sorted(MANIFEST["unsupported"]))
def test_unsupported_vector(name, tmp_path):
    with pytest.raises(llmarc.UnsupportedFeatureError):
        _exercise(VECTORS / "unsupported" / name, tmp_path / "out")
