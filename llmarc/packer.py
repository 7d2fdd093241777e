"""Pack a directory tree: scan -> plan (per-entry codec) -> encode -> write.

* ``scan`` walks the source without following symlinks (symlinks and special files are
  skipped with a warning) and never modifies anything;
* ``plan`` decides each entry's codec and groups entries: directories, stored files,
  single zstd frames, solid zstd blocks, and (later) one batch of llm entries;
* ``write_plan`` encodes the groups and streams them into an ``ArchiveWriter``.

The seam for the LLM codec is the ``"llm"`` group: its payloads are computed for a window
of its entries together (``encode_llm_batch``), and a window is written before the next
is read.
"""

from __future__ import annotations

import errno
import hashlib
import itertools
import os
import shutil
import stat
import struct
import tempfile
import unicodedata
import warnings
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO

from .codecs import CODEC_STORE, CODEC_ZSTD
from .codecs import choose as chooser
from .codecs import zstd as zstd_codec
from .codecs.llm_options import LLMOptions
from .codecs.llm_pipeline import (
    TextEncoder,
    llm_available,
    window_bytes,
    windows,
)
from .container.compact import solid_shares
from .container.layout import EMPTY_SHA256, TYPE_DIR, TYPE_FILE, EntryRecord
from .container.reader import ArchiveReader, MemberInfo
from .container.writer import ArchiveWriter
from .errors import ModelError, SourceError, UnsafeArchiveError, UnsupportedFeatureError
from .members import excluded
from .progress import as_sink
from .safety import check_names, validate_name

CHUNK = 1 << 20
#: Solid zstd blocks hold at most this many original bytes (a reader extracting one
#: member decodes at most one block).
SOLID_BLOCK_SIZE = 64 << 20
#: LLM solid blocks (spec/format.md §12.6): files under LLM_BLOCK_MEMBER bytes share one
#: LLM payload of at most LLM_BLOCK_SIZE, so each is predicted after the ones before it
#: (40 files of 1 KB of held-out English: 1.542 -> 1.204 bits/byte, benchmarks/results/
#: pareto.md); the cap bounds what extracting one member decodes (about 16 segments of
#: 1,024 tokens, as many rows).
LLM_BLOCK_SIZE = 64 << 10
LLM_BLOCK_MEMBER = 16 << 10
CODEC_CHOICES = ("auto", "zstd", "store", "llm")
#: ``--codec auto`` sends text files up to this size to the LLM codec.
MAX_AUTO_LLM_SIZE = 16 << 20


class SkippedEntryWarning(UserWarning):
    """A source entry that cannot be archived (symlink, device, unrepresentable name)."""


@dataclass
class SourceEntry:
    name: str  # archive name, '/'-separated
    path: str  # file system path
    type: int
    mode: int
    mtime_ns: int
    size: int
    special_bits: int = 0  # setuid/setgid/sticky: not archived (pack says so)


@dataclass
class Group:
    kind: str  # "dir" | "store" | "zstd" | "solid" | "llm"
    entries: list[SourceEntry] = field(default_factory=list)
    solid: bool = False  # "llm": small files may share LLM solid blocks (llm_units)


Warn = Callable[[str], None]


def _default_warn(message: str) -> None:
    warnings.warn(message, SkippedEntryWarning, stacklevel=3)


# ---------------------------------------------------------------- scan


def shown(path: str) -> str:
    r"""A path as a user can read it on one line: quoted, undecodable bytes as \xNN,
    control characters and combining marks as \uNNNN (so NFC and NFD twins differ)."""
    out = []
    for ch in os.fsencode(path).decode("utf-8", "surrogateescape"):
        o = ord(ch)
        if 0xDC80 <= o <= 0xDCFF:
            out.append(f"\\x{o - 0xDC00:02x}")
        elif ch == "\\":
            out.append("\\\\")
        elif not ch.isprintable() or unicodedata.combining(ch):
            out.append(f"\\x{o:02x}" if o <= 0xFF else f"\\u{o:04x}")
        else:
            out.append(ch)
    return "'" + "".join(out) + "'"


@dataclass
class Problem:
    """A source path that cannot be archived, and why."""

    path: str
    reason: str

    def __str__(self) -> str:
        return f"{shown(self.path)}: {self.reason}"


@dataclass
class PackReport:
    """What ``pack`` could not archive exactly (the CLI turns it into an exit status)."""

    skipped: list[Problem] = field(default_factory=list)  # not archived (with skip_failed)
    changed: list[str] = field(default_factory=list)  # changed while read (archived)
    vanished: list[str] = field(default_factory=list)  # deleted after the scan
    archive_size: int = 0  # bytes of the finished archive (also when written to a stream)

    @property
    def clean(self) -> bool:
        return not (self.skipped or self.changed or self.vanished)


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "symbolic link (links are not archived)"
    if stat.S_ISFIFO(mode):
        return "FIFO (named pipe; only files and directories are archived)"
    if stat.S_ISSOCK(mode):
        return "socket (only files and directories are archived)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "device (only files and directories are archived)"
    return "special file (only files and directories are archived)"


def _name_problem(name: str) -> str | None:
    """Why ``name`` cannot be an archive member name (spec/format.md §8), or None."""
    try:
        raw = name.encode("utf-8")
    except UnicodeEncodeError:
        return "its name is not valid UTF-8 (archive names are UTF-8)"
    leaf = name.rsplit("/", 1)[-1]
    if any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in leaf):
        return "its name contains a control character (tab, newline, DEL, ...)"
    if "\\" in leaf:
        return "its name contains a backslash"
    if len(leaf.encode("utf-8")) > 255:
        return "its name is longer than 255 bytes"
    if len(raw) > 4096:
        return "its path is longer than 4096 bytes"
    if leaf in (".", ".."):
        return "its name is a '.' or '..' component"
    if "/" in name:  # the parent passed already: checking only the leaf keeps depth linear
        return None
    try:
        validate_name(name)
    except UnsafeArchiveError as exc:
        return f"its name cannot be stored safely ({exc})"
    return None


def scan(src_dir: str | os.PathLike[str], *, skip: set[tuple[int, int]] = frozenset(),
         warn: Warn = _default_warn, problems: list[Problem] | None = None,
         exclude: Sequence[str] = ()) -> list[SourceEntry]:
    """All entries below ``src_dir`` (not the directory itself), sorted by name; for a
    regular file, that file alone under its base name (names are relative to the source
    either way; tar and zip would keep the path as typed). Entries matching an
    ``exclude`` pattern (llmarc.members) are left out, and nothing below an excluded
    directory is read.

    The walk is iterative (any depth) and never follows symlinks. Everything that cannot
    be archived (symlinks, FIFOs, sockets, devices, unreadable files or directories, names
    the format cannot store, and everything below such a directory) goes to ``problems``;
    without a ``problems`` list the first one raises SourceError."""
    root = os.fspath(src_dir)
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise SourceError(f"{root!r} does not exist") from None
    found: list[Problem] = [] if problems is None else problems
    if stat.S_ISREG(st.st_mode):
        return _scan_file(root, st, found, problems is None)
    if not stat.S_ISDIR(st.st_mode):
        raise SourceError(f"{root!r} is neither a directory nor a regular file")
    out: list[SourceEntry] = []
    stack: list[tuple[str, str, str | None]] = [(root, "", None)]  # path, prefix, why bad
    while stack:
        path, prefix, bad = stack.pop()
        try:
            dir_fd = open_long(path, _O_DIR if prefix else _O_DIR & ~os.O_NOFOLLOW)
        except OSError as exc:
            found.append(Problem(path, f"cannot read the directory ({exc.strerror})"))
            continue
        try:
            _scan_dir(dir_fd, path, prefix, bad, skip, out, found, stack, exclude)
        except OSError as exc:
            found.append(Problem(path, f"cannot read the directory ({exc.strerror})"))
        finally:
            os.close(dir_fd)
        if problems is None and found:
            raise SourceError(f"cannot archive {found[0]}")
    out.sort(key=lambda e: e.name.encode("utf-8"))
    try:
        check_names((e.name, e.type == TYPE_DIR) for e in out)
    except UnsafeArchiveError as exc:
        raise SourceError(f"cannot pack {root!r}: {exc}") from None
    return out


_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
_O_FILE = os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
#: Paths longer than this are opened a piece at a time (PATH_MAX is 4096 on Linux).
_PIECE_BYTES = 2048


def open_long(path: str, flags: int) -> int:
    """``os.open(path, flags)`` for paths of any length: a deep tree's paths exceed
    PATH_MAX, so those are opened a few hundred components at a time with ``dir_fd``."""
    try:
        return os.open(path, flags)
    except OSError as exc:
        if exc.errno != errno.ENAMETOOLONG:
            raise
    parts = path.split("/")
    pieces: list[str] = []
    current: list[str] = []
    for part in parts[:-1]:
        if current and len("/".join(current)) + len(part) + 1 > _PIECE_BYTES:
            pieces.append("/".join(current))
            current = []
        current.append(part)
    pieces.append("/".join(current) or "/")
    fd = os.open(pieces[0], _O_DIR & ~os.O_NOFOLLOW)
    try:
        for piece in pieces[1:]:
            new = os.open(piece, _O_DIR & ~os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = new
        return os.open(parts[-1], flags, dir_fd=fd)
    finally:
        os.close(fd)


def _scan_file(path: str, st: os.stat_result, found: list[Problem],
               strict: bool) -> list[SourceEntry]:
    """``scan`` of a single file: one member named by its base name. The path given on
    the command line is followed if it is a symlink, as the root directory is."""
    name = os.path.basename(os.path.normpath(path))
    why = _name_problem(name)
    if why is None:
        try:
            os.close(os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0)))
        except OSError as exc:
            why = f"cannot be read ({exc.strerror})"
    if why is not None:
        found.append(Problem(path, why))
        if strict:
            raise SourceError(f"cannot archive {found[-1]}")
        return []
    return [SourceEntry(name, os.path.realpath(path), TYPE_FILE, st.st_mode & 0o777,
                        st.st_mtime_ns, st.st_size, st.st_mode & 0o7000)]


def _scan_dir(dir_fd: int, path: str, prefix: str, bad: str | None,
              skip: set[tuple[int, int]], out: list[SourceEntry], found: list[Problem],
              stack: list[tuple[str, str, str | None]], exclude: Sequence[str] = ()) -> None:
    """One directory of ``scan`` (listed through its fd, so depth is no limit)."""
    with os.scandir(dir_fd) as it:
        items = list(it)
    for d in items:
        name = prefix + d.name
        if exclude and excluded(name, exclude, ancestors=False):
            continue
        full = os.path.join(path, d.name)
        try:
            st = d.stat(follow_symlinks=False)
        except FileNotFoundError:
            continue  # vanished between listing and stat: nothing to lose
        except OSError as exc:
            found.append(Problem(full, f"cannot stat ({exc.strerror})"))
            continue
        if (st.st_dev, st.st_ino) in skip:
            continue
        is_dir = stat.S_ISDIR(st.st_mode)
        why = bad or _name_problem(name)
        if why is None and not (is_dir or stat.S_ISREG(st.st_mode)):
            why = _kind(st.st_mode)
        if why is None and not is_dir:
            try:
                os.close(os.open(d.name, _O_FILE | os.O_NONBLOCK, dir_fd=dir_fd))
            except FileNotFoundError:
                continue
            except OSError as exc:
                why = f"cannot be read ({exc.strerror})"
        if why is not None:
            found.append(Problem(full, why))
            if is_dir:  # everything below is lost too: list it, never drop it silently
                stack.append((full, name + "/", bad or "inside a directory that cannot be "
                              "archived"))
            continue
        if is_dir:
            out.append(SourceEntry(name, full, TYPE_DIR, st.st_mode & 0o777,
                                   st.st_mtime_ns, 0, st.st_mode & 0o7000))
            stack.append((full, name + "/", None))
        else:
            out.append(SourceEntry(name, full, TYPE_FILE, st.st_mode & 0o777,
                                   st.st_mtime_ns, st.st_size, st.st_mode & 0o7000))


#: Test seam: called as ``_on_read(path, bytes_read_so_far)`` after every chunk read
#: (tests append to a file mid-read to exercise change detection).
_on_read: Callable[[str, int], None] | None = None


def _read(path: str) -> Iterator[bytes]:
    """The bytes of a regular file, opened without following a symlink swapped in."""
    fd = open_long(path, _O_FILE)
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise SourceError(f"{path!r} is no longer a regular file")
        while chunk := f.read(CHUNK):
            yield chunk


class _Source:
    """One file read once, hashed, counted and checked for change.

    At most the size seen when the file was opened is read; the stored size is the number
    of bytes actually read and the stored mtime the one seen at open. If size or mtime
    differ after the read (the file changed as we read it), ``changed`` is set: the
    writer reads it again, and reports it if it keeps changing. A file gone
    since the scan sets ``vanished`` (a warning, the pack goes on); one that can no longer
    be opened sets ``failed``."""

    def __init__(self, entry: SourceEntry, progress=None, *, sha: bool = True) -> None:
        self.entry = entry
        self.progress = progress
        self.sha = hashlib.sha256() if sha else None
        self.crc = 0
        self.size = 0
        self.mode = entry.mode
        self.mtime_ns = entry.mtime_ns
        self.changed = self.vanished = False
        self.failed: str | None = None

    @property
    def ok(self) -> bool:
        return not (self.vanished or self.failed)

    def __iter__(self) -> Iterator[bytes]:
        path = self.entry.path
        try:
            fd = open_long(path, _O_FILE)
        except FileNotFoundError:
            self.vanished = True
            return
        except OSError as exc:
            self.failed = f"cannot be read ({exc.strerror})"
            return
        with os.fdopen(fd, "rb") as f:
            before = os.fstat(fd)
            if not stat.S_ISREG(before.st_mode):
                self.failed = "is no longer a regular file"
                return
            self.mode, self.mtime_ns = before.st_mode & 0o777, before.st_mtime_ns
            # Read at most the size seen at open: a file appended to faster than we read
            # (a busy log) would otherwise never end; growth shows in ``changed``.
            remaining = before.st_size
            while remaining and (chunk := f.read(min(CHUNK, remaining))):
                remaining -= len(chunk)
                if self.sha is not None:
                    self.sha.update(chunk)
                self.crc = zlib.crc32(chunk, self.crc)
                self.size += len(chunk)
                if self.progress is not None:
                    self.progress.advance(len(chunk))
                yield chunk
                if _on_read is not None:
                    _on_read(path, self.size)
            after = os.fstat(fd)
        self.changed = (after.st_size != self.size or after.st_mtime_ns != before.st_mtime_ns
                        or before.st_size != self.size)


# ---------------------------------------------------------------- plan


def plan(entries: list[SourceEntry], codec: str = "auto", *, solid: bool = True,
         llm_available: bool = False) -> list[Group]:
    """Decide each entry's codec and group entries for encoding, in archive order.

    In auto mode, text files up to ``MAX_AUTO_LLM_SIZE`` are LLM candidates (the LLM codec
    codes a few hundred tokens per second on a CPU; larger text goes to zstd)."""
    if codec not in CODEC_CHOICES:
        raise SourceError(f"unknown codec {codec!r} (choose from {', '.join(CODEC_CHOICES)})")
    if codec == "llm" and not llm_available:
        raise UnsupportedFeatureError("codec llm requires the LLM codec")
    allowed = frozenset({"store", "zstd"} | ({"llm"} if llm_available else set()))
    dirs = Group("dir")
    stored: list[SourceEntry] = []
    zstd: list[SourceEntry] = []
    llm = Group("llm", solid=solid)
    for e in entries:
        if e.type == TYPE_DIR:
            dirs.entries.append(e)
            continue
        if e.size == 0 or codec == "store":
            choice = "store"
        elif codec in ("zstd", "llm"):
            choice = codec
        else:
            try:
                sample = b""
                for chunk in _read(e.path):
                    sample = chunk[:chooser.SAMPLE_SIZE]
                    break
                choice = chooser.choose(sample, e.size, _read(e.path), allowed
                                        if e.size <= MAX_AUTO_LLM_SIZE else allowed - {"llm"})
            except OSError:
                choice = "zstd"  # unreadable or gone: the writing pass reports it
        {"store": stored, "zstd": zstd}.get(choice, llm.entries).append(e)
    groups = [dirs] + [Group("store", [e]) for e in stored]
    block: list[SourceEntry] = []
    block_size = 0
    for e in zstd:
        if not solid or e.size >= SOLID_BLOCK_SIZE:
            groups.append(Group("zstd", [e]))
            continue
        if block and block_size + e.size > SOLID_BLOCK_SIZE:
            groups.append(Group("solid", block))
            block, block_size = [], 0
        block.append(e)
        block_size += e.size
    if block:
        groups.append(Group("solid", block))
    if llm.entries:
        groups.append(llm)
    return [g for g in groups if g.entries]


# ---------------------------------------------------------------- encode + write


class _Outcome:
    """Collects what happened to sources while writing (vanished, failed, changed)."""

    def __init__(self, report: PackReport, warn: Warn, skip_failed: bool) -> None:
        self.report, self.warn, self.skip_failed = report, warn, skip_failed

    def accept(self, src: _Source) -> bool:
        """True if ``src`` was read and belongs in the archive; warn or fail otherwise."""
        path = src.entry.path
        if src.vanished:
            self.report.vanished.append(path)
            self.warn(f"{shown(path)} vanished while packing; not archived")
            return False
        if src.failed:
            if not self.skip_failed:
                raise SourceError(f"cannot archive {shown(path)}: it {src.failed} (use "
                                  "--skip-unreadable to skip such files)")
            self.report.skipped.append(Problem(path, src.failed))
            self.warn(f"skipping {shown(path)}: it {src.failed}")
            return False
        if src.changed:
            self.report.changed.append(path)
            self.warn(f"{shown(path)}: file changed as we read it ({1 + REREADS} times; "
                      f"archived as last read: {src.size} bytes, the mtime before that read)")
        return True


@dataclass
class Coded:
    """What ``encode_llm_batch`` made of some sources: one member (any codec), or the
    members of one LLM solid block (spec/format.md §12.6), whose payload codes their
    bytes back to back."""

    sources: list[_Source]
    datas: list[bytes]
    codec_id: int
    params: bytes  # the llm params of a block (its members' own add skip and share)
    payload: bytes


def llm_units(sizes: list[int], blocks: bool) -> list[list[int]]:
    """Indexes of the llm entries (by their scanned ``sizes``), in order, grouped as the
    LLM codes them: runs of files under LLM_BLOCK_MEMBER bytes into solid blocks of at
    most LLM_BLOCK_SIZE (``blocks``: the archive can hold them), every other file on its
    own."""
    units: list[list[int]] = []
    run: list[int] = []
    total = 0
    for i, size in enumerate(sizes):
        small = blocks and size < LLM_BLOCK_MEMBER
        if run and (not small or total + size > LLM_BLOCK_SIZE):
            units.append(run)
            run, total = [], 0
        if small:
            run.append(i)
            total += size
        else:
            units.append([i])
    if run:
        units.append(run)
    return units


def encode_llm_batch(entries: list[SourceEntry], writer: ArchiveWriter, *, level: int,
                     options: LLMOptions, forced: bool, progress=None, warn: Warn | None = None,
                     outcome: _Outcome | None = None, solid: bool = True) -> Iterator[Coded]:
    """Encode the llm-candidate entries, a window of text at a time (llm_pipeline's
    WINDOW_BYTES: the caller writes a window's entries before the next is read, so
    memory holds one window, not the corpus).

    Yields each entry coded on its own (the LLM payload where it won or was forced, else
    its zstd frame or its plain bytes), or (``solid``, in a format 3.0 archive) small
    files grouped (``llm_units``) as one LLM solid block; a block the LLM does not win is
    yielded as its members, each on its own.  A window's entries are read into memory:
    the LLM codec is for text, capped in auto mode by ``plan``.
    """
    # A sink that can defer is told these bytes now and credits them as their tokens
    # are coded: counted as read, they made the bar say done before the model started.
    deferring = hasattr(progress, "defer")
    # Blocks, carry and chains are chosen from the scanned sizes before any window: the
    # archive does not depend on the window size (a memory knob). A window holds whole
    # blocks.
    grouped = [[entries[i] for i in unit] for unit in
               llm_units([e.size for e in entries], solid and writer.small)]
    if options.carry is None and not writer.small:  # only format 3.0 records carry
        options = replace(options, carry=0)
    with TextEncoder(options, forced=forced, add_model=writer.add_model, progress=progress,
                     status=getattr(progress, "note", None),
                     sizes=[sum(e.size for e in unit) for unit in grouped]) as encoder:
        for window in windows(grouped, lambda u: sum(e.size for e in u),
                              window_bytes(options)):
            units: list[tuple[list[_Source], list[bytes]]] = []
            for unit in window:
                read = [(src, data) for src, data in (_read_source(e, progress) for e in unit)
                        if outcome is None or outcome.accept(src)]
                if read:
                    units.append(([src for src, _ in read], [data for _, data in read]))
            if deferring:
                progress.defer(sum(len(d) for _, datas in units for d in datas))
            frames: dict[int, bytes] = {}

            def zstd_frame(data: bytes, frames: dict[int, bytes] = frames) -> bytes:
                if id(data) not in frames:
                    frames[id(data)] = b"".join(zstd_codec.encode([data], level, len(data)))
                return frames[id(data)]

            texts = [b"".join(datas) for _, datas in units]
            names = [srcs[0].entry.name + (f" and {len(srcs) - 1} more" if len(srcs) > 1
                                           else "") for srcs, _ in units]
            results = encoder.encode(texts, names, lambda d: len(zstd_frame(d)))
            for (srcs, datas), result in zip(units, results, strict=True):
                if result is not None:
                    yield Coded(srcs, datas, result.codec_id, result.params, result.payload)
                    continue
                for src, data in zip(srcs, datas, strict=True):  # on its own: zstd or stored
                    if data and len(zstd_frame(data)) < len(data):
                        yield Coded([src], [data], CODEC_ZSTD, b"", zstd_frame(data))
                    else:
                        yield Coded([src], [data], CODEC_STORE, b"", data)


def _read_source(e: SourceEntry, progress) -> tuple[_Source, bytes]:
    """One source and its bytes, read again (up to REREADS times) while it changes; a
    sink that can defer is credited later, as the tokens are coded."""
    deferring = hasattr(progress, "defer")
    for attempt in range(1 + REREADS):
        src = _Source(e, None if deferring else progress)
        data = b"".join(src)
        if not src.changed or attempt == REREADS:
            break
        if progress is not None and not deferring:
            progress.advance(-src.size)
    return src, data


#: A file that changed while it was read is read again this many times (a single file:
#: its stored bytes are rewound; a solid block: the whole block) before it is reported.
REREADS = 2


def _undo(writer: ArchiveWriter, start: int, progress, srcs: list[_Source]) -> None:
    writer.rewind(start)
    if progress is not None:
        progress.advance(-sum(s.size for s in srcs))


def write_plan(groups: list[Group], writer: ArchiveWriter, *, level: int = 19,
               progress=None, llm: LLMOptions | None = None, forced_llm: bool = False,
               warn: Warn | None = None, report: PackReport | None = None,
               skip_failed: bool = False) -> None:
    """Encode and write every group. Sources are read exactly once, while being written;
    a source that vanished or failed leaves no bytes behind (the writer rewinds)."""
    outcome = _Outcome(report if report is not None else PackReport(),
                       warn or _default_warn, skip_failed)

    def record(src: _Source, codec: int, params: bytes, stored: tuple, sha: bytes,
               data_crc: int | None = None) -> EntryRecord:
        off, ssize, crc = stored
        return EntryRecord(src.entry.name, TYPE_FILE, src.mode, src.mtime_ns, src.size, codec,
                           params, off, ssize, sha, crc, (), data_crc)

    for g in groups:
        if g.kind == "dir":
            for e in g.entries:
                writer.add_entry(EntryRecord(e.name, TYPE_DIR, e.mode, e.mtime_ns, 0, 0, b"",
                                             0, 0, EMPTY_SHA256, 0))
        elif g.kind in ("store", "zstd"):
            start = writer.pos
            codec = CODEC_STORE if g.kind == "store" else CODEC_ZSTD
            for attempt in range(1 + REREADS):
                src = _Source(g.entries[0], progress)
                chunks = src if codec == CODEC_STORE else zstd_codec.encode(src, level,
                                                                             g.entries[0].size)
                stored = writer.write_stored(chunks)
                if not src.changed or attempt == REREADS:
                    break
                _undo(writer, start, progress, [src])  # changed while read: read it again
            if not outcome.accept(src):
                writer.rewind(start)
                continue
            writer.add_entry(record(src, codec, b"", stored, src.sha.digest()))
        elif g.kind == "solid":
            # One frame, no flush between members: with thousands of tiny files a flush
            # per member cost as much as the data (1.1 records no per-member share).
            start = writer.pos
            hint = sum(e.size for e in g.entries)
            for attempt in range(1 + REREADS):
                srcs = [_Source(e, progress, sha=False) for e in g.entries]
                stored = writer.write_stored(
                    zstd_codec.encode(itertools.chain.from_iterable(srcs), level, hint))
                if not any(s.changed for s in srcs) or attempt == REREADS:
                    break
                _undo(writer, start, progress, srcs)  # a member changed: redo the block
            kept = [s for s in srcs if outcome.accept(s)]
            if not kept:
                writer.rewind(start)
                continue
            shares = solid_shares([s.size for s in kept], stored[1])
            skip = 0
            for src, share in zip(kept, shares, strict=True):
                writer.add_entry(record(src, CODEC_ZSTD, struct.pack("<QQ", skip, share),
                                        stored, b"", src.crc & 0xFFFFFFFF))
                skip += src.size
        elif g.kind == "llm":
            batch = encode_llm_batch(g.entries, writer, level=level, options=llm or LLMOptions(),
                                     forced=forced_llm, progress=progress, warn=warn,
                                     outcome=outcome, solid=g.solid)
            for coded in batch:
                stored = writer.write_stored([coded.payload])
                if len(coded.sources) == 1:
                    data = coded.datas[0]
                    entry = record(coded.sources[0], coded.codec_id, coded.params, stored,
                                   hashlib.sha256(data).digest())
                    writer.add_entry(replace(entry, size=len(data)))
                    continue
                sizes = [len(d) for d in coded.datas]
                skips = itertools.accumulate([0, *sizes[:-1]])
                for src, data, skip, share in zip(coded.sources, coded.datas, skips,
                                                  solid_shares(sizes, stored[1]), strict=True):
                    entry = record(src, coded.codec_id,
                                   coded.params + struct.pack("<QQ", skip, share), stored,
                                   b"", zlib.crc32(data))
                    writer.add_entry(replace(entry, size=len(data)))
        else:  # pragma: no cover - plan() only makes the kinds above
            raise ValueError(g.kind)


class UnarchivableError(SourceError):
    """Some source paths cannot be archived (``problems`` lists them all)."""

    def __init__(self, message: str, problems: list[Problem]) -> None:
        super().__init__(message)
        self.problems = problems


def llm_unavailable(codec: str, llm: LLMOptions) -> str | None:
    """Why the LLM codec will not run for ``codec`` (None: it will). ``--codec llm``
    where it cannot run is refused here, before any file is read."""
    unavailable = llm_available(llm) if codec in ("auto", "llm") else "not requested"
    if codec == "llm" and unavailable:
        raise ModelError(unavailable)
    return unavailable


def code_entries(entries: list[SourceEntry], writer: ArchiveWriter, label: str, *,
                 codec: str, unavailable: str | None, solid: bool, level: int,
                 llm: LLMOptions, warn: Warn, report: PackReport, skip_failed: bool,
                 progress: Any) -> None:
    """Choose each entry's codec and write them all, under one progress display
    (``label``): what a pack and an update do once they know which entries are new."""
    groups = plan(entries, codec, solid=solid, llm_available=not unavailable)
    if progress is not None:
        progress.start(sum(e.size for e in entries), label)
    try:
        write_plan(groups, writer, level=level, progress=progress, llm=llm,
                   forced_llm=codec == "llm", warn=warn, report=report,
                   skip_failed=skip_failed)
    finally:
        if progress is not None:
            progress.close()


def written_members(path: str | os.PathLike[str], report: PackReport) -> list[MemberInfo]:
    """The members of the archive just written at ``path`` (its size into ``report``)."""
    report.archive_size = os.path.getsize(path)
    with ArchiveReader(path) as reader:
        return reader.members()


def pack(src_dir: str | os.PathLike[str], archive_path: str | os.PathLike[str] | BinaryIO, *,
         codec: str = "auto", level: int = 19, progress=None, overwrite: bool = False,
         solid: bool = True, warn: Warn | None = None, llm: LLMOptions | None = None,
         verify: bool = False, skip_failed: bool = False,
         report: PackReport | None = None, exclude: Sequence[str] = ()) -> list[MemberInfo]:
    """Archive the contents of ``src_dir`` (or the one file it names) into
    ``archive_path``; return the members.

    The archive appears under its name only when complete (temporary file + rename);
    ``overwrite`` allows replacing an existing archive. ``archive_path`` may be a binary
    stream (``sys.stdout.buffer`` for ``llmarc pack SRC -``): the archive is then built
    in a temporary file (the writer rewinds over files that change while read) and
    copied to the stream once complete. ``exclude``: glob patterns of names to leave
    out, matched as tar's ``--exclude`` (llmarc.members).

    Nothing is dropped silently: paths that cannot be archived (symlinks, FIFOs,
    sockets, devices, unreadable files, names the format cannot store) raise
    ``UnarchivableError`` listing all of them, unless ``skip_failed``, which skips each
    with a warning (``warn`` callback, default ``warnings.warn``) and lists it in
    ``report.skipped``. Files that change while read are archived as read and listed in
    ``report.changed``; files deleted after the scan in ``report.vanished``.

    ``llm`` selects the model and settings of the LLM codec (default: the embedded
    model). With ``codec="auto"`` and no usable model, text goes to zstd with a warning.
    ``verify`` decodes the whole finished archive and checks every checksum before it
    is renamed into place.

    ``progress``: None, a callable that receives a ``llmarc.ProgressInfo`` on every
    change (bytes and the LLM's tokens, rates and ETA), or a sink (llmarc.progress)."""
    progress = as_sink(progress)
    if not zstd_codec.MIN_LEVEL <= level <= zstd_codec.MAX_LEVEL:
        raise SourceError(f"level must be in {zstd_codec.MIN_LEVEL}..{zstd_codec.MAX_LEVEL}")
    if codec not in CODEC_CHOICES:
        raise SourceError(f"unknown codec {codec!r} (choose from {', '.join(CODEC_CHOICES)})")
    src = os.fspath(src_dir)
    if not os.path.exists(src):
        raise SourceError(f"{src!r} does not exist")
    report = report if report is not None else PackReport()
    if not isinstance(archive_path, (str, os.PathLike)):
        with tempfile.TemporaryDirectory(prefix="llmarc-pack-") as spool_dir:
            spool = os.path.join(spool_dir, "archive.llma")
            members = pack(src, spool, codec=codec, level=level, progress=progress,
                           solid=solid, warn=warn, llm=llm, verify=verify,
                           skip_failed=skip_failed, report=report, exclude=exclude)
            with open(spool, "rb") as f:
                shutil.copyfileobj(f, archive_path, CHUNK)
            archive_path.flush()
        return members
    warn = warn or _default_warn
    llm = llm or LLMOptions()

    def verify_archive(path: str) -> None:
        with ArchiveReader(path, llm=llm, warn=warn) as reader:
            reader.test(progress=progress)

    with ArchiveWriter(archive_path, overwrite=overwrite, warn=warn,
                       verify=verify_archive if verify else None) as writer:
        skip = {writer.temp_identity}
        if os.path.exists(archive_path):
            st = os.stat(archive_path)
            skip.add((st.st_dev, st.st_ino))
        # after the refusals above (an existing OUT...): finding the model is not free
        unavailable = llm_unavailable(codec, llm)
        problems: list[Problem] = []
        entries = scan(src, skip=skip, warn=warn, problems=problems, exclude=exclude)
        if problems and not skip_failed:
            raise UnarchivableError(
                f"{len(problems)} path{'s' if len(problems) > 1 else ''} below {src!r} "
                f"cannot be archived, first {problems[0]} (use --skip-unreadable to skip "
                "them)", problems)
        for p in problems:
            warn(f"skipping {p}")
        special = [e for e in entries if e.special_bits]
        if special:
            many = len(special) > 1
            warn(f"setuid, setgid and sticky bits are not archived: {len(special)} "
                 f"{'paths lose' if many else 'path loses'} them, first "
                 f"{shown(special[0].path)}")
        report.skipped.extend(problems)
        if codec == "auto" and unavailable:
            warn(f"LLM codec unavailable, text will use zstd: {unavailable}")
        code_entries(entries, writer, "packing", codec=codec, unavailable=unavailable,
                     solid=solid, level=level, llm=llm, warn=warn, report=report,
                     skip_failed=skip_failed, progress=progress)
    return written_members(archive_path, report)
