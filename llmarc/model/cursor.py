"""Bounds-checked reads of a model file: its bytes mapped, and a little-endian cursor.

Model files are read by llmarc's own code (spec/model.md), not by the libraries that
wrote them, so that what an archive means never depends on a library's version.  They
are also input from disk that may be truncated or damaged: every read here checks the
remaining length first and raises :class:`~llmarc.errors.ModelError` naming the file,
so a bad model file is one clear line, never a traceback or a huge allocation.
"""

from __future__ import annotations

import mmap
import struct
from pathlib import Path
from typing import Any

from llmarc.errors import ModelError


class Cursor:
    """Sequential reads from ``data[position:]`` that never run past ``len(data)``."""

    def __init__(self, data: bytes | memoryview, what: str, position: int = 0) -> None:
        self.data = memoryview(data)
        self.what = what
        self.position = position

    @property
    def remaining(self) -> int:
        return len(self.data) - self.position

    def fail(self, reason: str) -> ModelError:
        """The error for a malformed file, naming it and the offset."""
        return ModelError(f"{self.what}: {reason} (at byte {self.position})")

    def take(self, size: int) -> memoryview:
        if size < 0 or size > self.remaining:
            raise self.fail(f"needs {size} bytes, {self.remaining} remain")
        view = self.data[self.position:self.position + size]
        self.position += size
        return view

    def unpack(self, fmt: str) -> tuple:
        """``struct.unpack`` of the little-endian format ``fmt`` at the cursor."""
        return struct.unpack("<" + fmt, self.take(struct.calcsize("<" + fmt)))

    def u8(self) -> int:
        return self.take(1)[0]

    def u32(self) -> int:
        return self.unpack("I")[0]

    def u64(self) -> int:
        return self.unpack("Q")[0]

    def varint(self) -> int:
        """Protocol-buffer varint (unsigned LEB128, at most 10 bytes)."""
        value = shift = 0
        for _ in range(10):
            byte = self.u8()
            value |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return value
            shift += 7
        raise self.fail("varint longer than 10 bytes")


def release_pages(mapped: Any, begin: int, size: int) -> None:
    """Drop bytes ``begin .. begin + size`` of a mapped file from this process's resident
    memory (the pages stay in the page cache, and a later read maps them back), once a
    tensor has been read from them: the model file's pages (SmolLM2: 90 MB) would
    otherwise count in the RSS for as long as the mapping lives, on top of the engine's
    own copy of the weights.  Whole pages: a neighbour's first or last page dropped with
    them is read again if needed."""
    if not isinstance(mapped, mmap.mmap) or not hasattr(mmap, "MADV_DONTNEED") or size <= 0:
        return
    start = begin - begin % mmap.PAGESIZE
    end = min(len(mapped), begin + size)
    if end > start:
        mapped.madvise(mmap.MADV_DONTNEED, start, end - start)


def map_file(path: Path) -> Any:
    """The file's bytes, mapped read-only (pages are read as tensors are used, and shared
    with the page cache); an unreadable file is a ModelError naming it."""
    try:
        with path.open("rb") as handle:
            try:
                return mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ)
            except ValueError:  # an empty file cannot be mapped
                return b""
    except OSError as exc:
        raise ModelError(f"cannot read {path}: {exc.strerror}") from exc
