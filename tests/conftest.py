"""Shared helpers for the container, safety, CLI and vector tests."""

from __future__ import annotations

import os

# Before anything imports torch: OpenMP threads wait passively (the tests share busy
# machines; spinning waits make them crawl).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import hashlib
import importlib.util
import struct
from pathlib import Path
from types import ModuleType

import pytest

from llmarc.container.index import assemble
from llmarc.container.layout import (
    EMPTY_SHA256,
    HEADER_SIZE,
    TYPE_DIR,
    TYPE_FILE,
    EntryRecord,
    Index,
    crc32,
)
from llmarc.model.sources import MODEL_ENV

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
TINY_BPE = FIXTURES / "tiny-llama-bpe"


@pytest.fixture(autouse=True)
def _tiny_default_model(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests that do not name a model get the tiny seeded LLaMA as the default.

    ``--codec auto`` (the default) runs the LLM codec on every text file; with the real
    SmolLM2 each pack would load 135M parameters and code at ~100 tokens/s.  The tests
    that are about the embedded model name it (``smollm2``) explicitly."""
    monkeypatch.setenv(MODEL_ENV, str(TINY_BPE))


def load_script(path: Path) -> ModuleType:
    """Import a script that is not in a package (a vector generator) as a module."""
    spec = importlib.util.spec_from_file_location(path.stem, path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def raw_archive(files: list[tuple], *, dirs: tuple[str, ...] = (), **kw) -> bytes:
    """An archive of stored files [(name, data[, mode, mtime])] built with no validation,
    so tests can make archives the real writer refuses to write (hostile names...)."""
    data = bytearray()
    entries = [EntryRecord(d, TYPE_DIR, 0o755, 0, 0, 0, b"", 0, 0, EMPTY_SHA256, 0)
               for d in dirs]
    for item in files:
        name, payload = item[0], item[1]
        mode = item[2] if len(item) > 2 else 0o644
        entries.append(EntryRecord(name, TYPE_FILE, mode, 1_000_000_000, len(payload), 0, b"",
                                   HEADER_SIZE + len(data), len(payload),
                                   hashlib.sha256(payload).digest(), crc32(payload)))
        data += payload
    return assemble(bytes(data), Index("test", entries=entries), **kw)


def make_tree(root: Path, spec: dict[str, bytes | None]) -> Path:
    """Create files (bytes) and directories (None) below root."""
    root.mkdir(parents=True, exist_ok=True)
    for name, content in spec.items():
        p = root / name
        if content is None:
            p.mkdir(parents=True, exist_ok=True)
        else:
            p.parent.mkdir(parents=True, exist_ok=True)
            p.write_bytes(content)
    return root


def snapshot(root: Path) -> dict[str, tuple]:
    """name -> (kind, mode, mtime_ns, sha256) for everything below root."""
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in dirnames + filenames:
            p = Path(dirpath, n)
            st = p.lstat()
            rel = p.relative_to(root).as_posix()
            if p.is_dir():
                out[rel] = ("dir", st.st_mode & 0o7777, st.st_mtime_ns, None)
            else:
                out[rel] = ("file", st.st_mode & 0o7777, st.st_mtime_ns,
                            hashlib.sha256(p.read_bytes()).hexdigest())
    return out


@pytest.fixture
def small_archive(tmp_path: Path) -> Path:
    """A small archive with a dir, a solid zstd block, a stored file and an empty file."""
    import llmarc

    src = make_tree(tmp_path / "src", {
        "d": None, "d/a.txt": b"hello hello hello hello\n" * 3, "b.txt": b"bbbbbbbbbbbbbbbb",
        "e": b"", "r.bin": bytes(range(7, 107)),
    })
    out = tmp_path / "small.llma"
    llmarc.pack(src, out, codec="zstd", level=3)
    return out


__all__ = ["make_tree", "raw_archive", "snapshot", "struct"]
