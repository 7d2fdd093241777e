"""Streaming ArchiveWriter: header, entries' stored bytes in one pass, index, footer.

The archive is written to a temporary file in the target's directory and renamed onto the
target only when complete; any failure (or Ctrl-C) removes the temporary file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Callable, Iterable

from .._version import CREATOR
from ..errors import DestinationExistsError
from ..safety import check_names
from .layout import (
    HEADER_SIZE,
    EntryRecord,
    Extension,
    Index,
    ModelRecord,
    crc32,
    encode_footer,
    encode_header,
    encode_index,
)


class ArchiveWriter:
    """Write one archive. Use as a context manager; ``close()`` commits, errors abort."""

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = False,
                 creator: str = CREATOR,
                 verify: Callable[[str], object] | None = None) -> None:
        self.path = os.fspath(path)
        self.verify = verify  # called on the complete temporary file before the rename
        if os.path.lexists(self.path) and not overwrite:
            raise DestinationExistsError(f"{self.path!r} already exists (use overwrite)")
        if os.path.isdir(self.path):
            raise DestinationExistsError(f"{self.path!r} is a directory")
        directory = os.path.dirname(os.path.abspath(self.path))
        fd, self.tmp_path = tempfile.mkstemp(
            prefix=f".{os.path.basename(self.path)[:100]}.", suffix=".llmarc-tmp", dir=directory)
        # mkstemp creates 0600; a finished archive gets the usual 0666 & ~umask.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        self._f = os.fdopen(fd, "wb")
        self.index = Index(creator=creator)
        self._done = False
        try:
            self._f.write(encode_header())
        except BaseException:
            self.abort()
            raise
        self.pos = HEADER_SIZE

    @property
    def temp_identity(self) -> tuple[int, int]:
        """(st_dev, st_ino) of the temporary file, so a packer can skip it."""
        st = os.fstat(self._f.fileno())
        return st.st_dev, st.st_ino

    def write_stored(self, chunks: Iterable[bytes]) -> tuple[int, int, int]:
        """Append stored bytes; return (stored_offset, stored_size, crc32)."""
        start, crc = self.pos, 0
        for chunk in chunks:
            if chunk:
                self._f.write(chunk)
                crc = crc32(chunk, crc)
                self.pos += len(chunk)
        return start, self.pos - start, crc

    def add_model(self, model: ModelRecord) -> int:
        """Add a model record; return its index for the llm codec's params."""
        self.index.models.append(model)
        return len(self.index.models) - 1

    def add_entry(self, entry: EntryRecord) -> None:
        self.index.entries.append(entry)

    def add_extension(self, ext: Extension) -> None:
        self.index.extensions = (*self.index.extensions, ext)

    def close(self) -> None:
        """Validate the index, write it and the footer, and rename onto the target."""
        if self._done:
            return
        try:
            check_names((e.name, e.type == 1) for e in self.index.entries)
            index = encode_index(self.index)
            self._f.write(index)
            self._f.write(encode_footer(self.pos, len(index), crc32(index)))
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
            if self.verify is not None:
                self.verify(self.tmp_path)
            os.replace(self.tmp_path, self.path)
            self._done = True
        except BaseException:
            self.abort()
            raise

    def abort(self) -> None:
        """Discard everything written (idempotent)."""
        if self._done:
            return
        self._done = True
        try:
            self._f.close()
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.tmp_path)

    def __enter__(self) -> ArchiveWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
