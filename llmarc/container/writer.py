"""Streaming ArchiveWriter: header, entries' stored bytes in one pass, index, footer.

The archive is written to a temporary file in the target's directory and renamed onto the
target only when complete; any failure (or Ctrl-C, SIGTERM, SIGHUP via the CLI) removes the
temporary file. Only SIGKILL (or a crash) can leave one behind, so the temporary name
carries the writer's process id (``.OUT.pack<pid>.XXXXXXXX.llmarc-tmp``): the next pack to
the same place removes those whose process is gone and reports the others.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import tempfile
from collections.abc import Callable, Iterable
from dataclasses import replace

from .._version import CREATOR
from ..codecs import CODEC_LLM
from ..errors import DestinationExistsError
from ..safety import check_names
from .index import encode_index
from .json_safe import parse_profile_json
from .layout import (
    DIGEST128_BYTES,
    HEADER_SIZE,
    SHORT_FINGERPRINT,
    SMALL_HEADER_SIZE,
    EntryRecord,
    Extension,
    Index,
    ModelRecord,
    crc32,
    encode_footer,
    encode_header,
    encode_small_header,
    encode_trailer,
)
from .small import encode_small_index

#: Below this many bytes of data a 3.0 archive gets no creator and no model display names
#: (spec/format.md §12.5): 13 + 33 bytes were a fifth of a 700-byte text's archive, and a
#: reader needs neither (the fingerprint, not the name, identifies a model).
SMALL_DATA_NAMES = 4096
#: Whether new archives are format 3.0 (True) or 1.1.
WRITE_SMALL = True


def small_form(index: Index, data_size: int) -> Index:
    """What llmarc writes of ``index`` in a 3.0 archive: llm members' SHA-256 cut to its
    first 16 bytes, and no creator or model names when the data area is small."""
    entries = [replace(e, sha256=e.sha256[:DIGEST128_BYTES]) if e.codec_id == CODEC_LLM
               and len(e.sha256) == 32 else e for e in index.entries]
    if data_size >= SMALL_DATA_NAMES:
        return Index(index.creator, index.models, entries, index.extensions)
    models = [replace(m, name="") for m in index.models]
    return Index("", models, entries, index.extensions)

TEMP_SUFFIX = ".llmarc-tmp"


def _temp_prefix(path: str) -> str:
    return f".{os.path.basename(path)[:100]}."


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: someone else's live process
        return True
    return True


def clean_stale_temps(path: str) -> list[str]:
    """Remove temporary files an earlier, killed pack to ``path`` left behind (its
    process is gone); return one message per file removed or left alone."""
    directory = os.path.dirname(os.path.abspath(path))
    prefix = _temp_prefix(path)
    end = re.escape(TEMP_SUFFIX)
    mine = re.compile(re.escape(prefix) + r"pack(\d+)\.[A-Za-z0-9_]{8}" + end)
    older = re.compile(re.escape(prefix) + r"[A-Za-z0-9_]{8}" + end)
    notes: list[str] = []
    try:
        names = os.listdir(directory)
    except OSError:
        return notes
    for name in names:
        if not name.startswith(prefix) or not name.endswith(TEMP_SUFFIX):
            continue
        shown = os.path.join(os.path.dirname(path), name)
        m = mine.fullmatch(name)
        if m and not _alive(int(m.group(1))):
            try:
                os.unlink(os.path.join(directory, name))
                notes.append(f"removed {shown!r}, left by an interrupted pack (process "
                             f"{m.group(1)} is gone)")
            except OSError as exc:
                notes.append(f"cannot remove {shown!r}, left by an interrupted pack: "
                             f"{exc.strerror}")
        elif m:
            notes.append(f"{shown!r} belongs to pack process {m.group(1)}, which is still "
                         "running; left alone")
        elif older.fullmatch(name):
            notes.append(f"{shown!r} looks like a temporary file of an interrupted pack; "
                         "remove it if no llmarc is running")
    return notes


class ArchiveWriter:
    """Write one archive. Use as a context manager; ``close()`` commits, errors abort."""

    def __init__(self, path: str | os.PathLike[str], *, overwrite: bool = False,
                 creator: str = CREATOR,
                 verify: Callable[[str], object] | None = None,
                 warn: Callable[[str], object] | None = None,
                 small: bool | None = None) -> None:
        """``small``: write format 3.0 (spec/format.md §12); False: 1.1; None: the
        module's WRITE_SMALL (True; the vector scripts turn it off to remake 1.1
        vectors as they were)."""
        self.path = os.fspath(path)
        small = WRITE_SMALL if small is None else small
        self.small = small
        self.verify = verify  # called on the complete temporary file before the rename
        if os.path.isdir(self.path):
            raise DestinationExistsError(
                f"{self.path!r} is a directory; give the archive a file name, e.g. "
                f"{os.path.join(self.path, 'archive.llma')!r}")
        if os.path.lexists(self.path) and not overwrite:
            raise DestinationExistsError(
                f"{self.path!r} already exists (use --overwrite to replace it)")
        shown_dir = os.path.dirname(self.path) or "."
        directory = os.path.dirname(os.path.abspath(self.path))
        if not os.path.isdir(directory):
            raise OSError(errno.ENOENT,
                          f"cannot create {self.path!r}: the directory {shown_dir!r} does not "
                          "exist")
        for note in clean_stale_temps(self.path):
            if warn is not None:
                warn(note)
        try:
            fd, self.tmp_path = tempfile.mkstemp(
                prefix=f"{_temp_prefix(self.path)}pack{os.getpid()}.", suffix=TEMP_SUFFIX,
                dir=directory)
        except OSError as exc:
            raise OSError(exc.errno, f"cannot create {self.path!r} in {shown_dir!r}: "
                          f"{exc.strerror}") from None
        # mkstemp creates 0600; a finished archive gets the usual 0666 & ~umask.
        umask = os.umask(0)
        os.umask(umask)
        os.fchmod(fd, 0o666 & ~umask)
        self._f = os.fdopen(fd, "wb")
        self.index = Index(creator=creator)
        self._done = False
        try:
            self._write(encode_small_header() if small else encode_header())
        except BaseException:
            self.abort()
            raise
        self.pos = SMALL_HEADER_SIZE if small else HEADER_SIZE

    def _write(self, data: bytes) -> None:
        """Write, naming the archive (not the temporary file) if the disk is full."""
        try:
            self._f.write(data)
        except OSError as exc:
            raise self._named(exc) from None

    def _named(self, exc: OSError) -> OSError:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EIO):
            return OSError(exc.errno, f"cannot write {self.path!r}: {exc.strerror} (the "
                           "partial archive was removed)")
        return exc

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
                self._write(chunk)
                crc = crc32(chunk, crc)
                self.pos += len(chunk)
        return start, self.pos - start, crc

    def rewind(self, pos: int) -> None:
        """Drop everything written after ``pos`` (stored bytes of a source that vanished
        or failed while being read, which must leave no gap in the data area)."""
        self._f.flush()
        self._f.seek(pos)
        self._f.truncate()
        self.pos = pos

    def add_model(self, model: ModelRecord) -> int:
        """Add a model record; return its index for the llm codec's params. A record
        already in the table is not added twice (an update copies the old archive's
        records, then codes new entries with the same model): the same profile and
        fingerprint, where a 3.0 record read back holds only the fingerprint's first 16
        bytes and may have lost its display name (format.md §12)."""
        for index, kept in enumerate(self.index.models):
            if kept.profile == model.profile and _same_fingerprint(kept, model):
                return index
        if not self.small and {"carry", "mix"} & set(parse_profile_json(model.profile)):
            # spec/llm-codec.md §2.2: a 1.x record is JSON, whose unknown keys a reader
            # of llm-codec <= 1.3 ignores; only format 3.0's forms 2 and 3 make it refuse.
            raise ValueError("a profile with context carry or mixing needs format 3.0")
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
            if self.small:
                index = encode_small_index(small_form(self.index,
                                                      self.pos - SMALL_HEADER_SIZE))
                self._write(index + encode_trailer(index))
            else:
                index = encode_index(self.index, compact=True)
                self._write(index)
                self._write(encode_footer(self.pos, len(index), crc32(index)))
            try:
                self._f.flush()
                os.fsync(self._f.fileno())
                self._f.close()
            except OSError as exc:
                raise self._named(exc) from None
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
            with contextlib.suppress(OSError):  # a full disk fails the flush again
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


def _same_fingerprint(a: ModelRecord, b: ModelRecord) -> bool:
    """Whether two records name one model: equal fingerprints, or one the other's prefix
    (a 3.0 form-1 record keeps 16 of the 32 bytes)."""
    short, full = sorted((a.fingerprint, b.fingerprint), key=len)
    return len(short) >= SHORT_FINGERPRINT and full.startswith(short)
