"""Every LLM codec archive vector in spec/vectors/llm/ behaves as its manifest says."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

import llmarc
import llmarc.errors

ROOT = Path(__file__).resolve().parent.parent
VECTORS = ROOT / "spec" / "vectors" / "llm"
MANIFEST = json.loads((VECTORS / "manifest.json").read_text(encoding="utf-8"))


def test_manifest_lists_every_file() -> None:
    assert sorted(p.name for p in VECTORS.glob("*.llma")) == sorted(MANIFEST)


@pytest.mark.parametrize("name", sorted(MANIFEST))
def test_llm_vector(name: str, tmp_path: Path) -> None:
    spec = MANIFEST[name]
    with llmarc.open(VECTORS / name, model=ROOT / spec["model"], device="cpu") as archive:
        if "members" in spec:
            archive.test()
            for member, digest in spec["members"].items():
                assert hashlib.sha256(archive.read(member)).hexdigest() == digest
            archive.extract(tmp_path)
            for member, digest in spec["members"].items():
                assert hashlib.sha256((tmp_path / member).read_bytes()).hexdigest() == digest
        else:
            with pytest.raises(getattr(llmarc.errors, spec["error"])):
                archive.extract(tmp_path)
            # Intact members may have been extracted; nothing wrong ever is.
            genuine = set(MANIFEST["good-tiny-bpe.llma"]["members"].values())
            for path in (p for p in tmp_path.rglob("*") if p.is_file()):
                assert hashlib.sha256(path.read_bytes()).hexdigest() in genuine, path
