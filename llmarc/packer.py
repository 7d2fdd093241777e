"""Pack a directory tree: scan -> plan (per-entry codec) -> encode -> write.

* ``scan`` walks the source without following symlinks (symlinks and special files are
  skipped with a warning) and never modifies anything;
* ``plan`` decides each entry's codec and groups entries: directories, stored files,
  single zstd frames, solid zstd blocks, and (later) one batch of llm entries;
* ``write_plan`` encodes the groups and streams them into an ``ArchiveWriter``.

The seam for the LLM codec is the ``"llm"`` group: its payloads are computed for all of its
entries together (``encode_llm_batch``) before they are written.
"""

from __future__ import annotations

import hashlib
import os
import stat
import struct
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from .codecs import CODEC_STORE, CODEC_ZSTD
from .codecs import choose as chooser
from .codecs import zstd as zstd_codec
from .codecs.llm_pipeline import LLMOptions, encode_text_entries, llm_available
from .container.layout import EMPTY_SHA256, TYPE_DIR, TYPE_FILE, EntryRecord
from .container.reader import ArchiveReader, MemberInfo
from .container.writer import ArchiveWriter
from .errors import ModelError, SourceError, UnsafeArchiveError, UnsupportedFeatureError
from .safety import check_names, validate_name

CHUNK = 1 << 20
#: Solid zstd blocks hold at most this many original bytes (a reader extracting one
#: member decodes at most one block).
SOLID_BLOCK_SIZE = 64 << 20
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


@dataclass
class Group:
    kind: str  # "dir" | "store" | "zstd" | "solid" | "llm"
    entries: list[SourceEntry] = field(default_factory=list)


Warn = Callable[[str], None]


def _default_warn(message: str) -> None:
    warnings.warn(message, SkippedEntryWarning, stacklevel=3)


# ---------------------------------------------------------------- scan


def scan(src_dir: str | os.PathLike[str], *, skip: set[tuple[int, int]] = frozenset(),
         warn: Warn = _default_warn) -> list[SourceEntry]:
    """All entries below ``src_dir`` (not the directory itself), sorted by name."""
    root = os.fspath(src_dir)
    try:
        st = os.stat(root)
    except FileNotFoundError:
        raise SourceError(f"{root!r} does not exist") from None
    if not stat.S_ISDIR(st.st_mode):
        raise SourceError(f"{root!r} is not a directory")
    out: list[SourceEntry] = []

    def walk(path: str, prefix: str) -> None:
        with os.scandir(path) as it:
            items = sorted(it, key=lambda d: d.name)
        for d in items:
            name = prefix + d.name
            try:
                validate_name(name)
                name.encode("utf-8")
            except (UnsafeArchiveError, UnicodeEncodeError):
                warn(f"skipping {d.path!r}: its name cannot be stored portably")
                continue
            st = d.stat(follow_symlinks=False)
            if (st.st_dev, st.st_ino) in skip:
                continue
            if stat.S_ISLNK(st.st_mode):
                warn(f"skipping symbolic link {name!r} (symlinks are not archived)")
            elif stat.S_ISDIR(st.st_mode):
                out.append(SourceEntry(name, d.path, TYPE_DIR, st.st_mode & 0o777,
                                       st.st_mtime_ns, 0))
                walk(d.path, name + "/")
            elif stat.S_ISREG(st.st_mode):
                out.append(SourceEntry(name, d.path, TYPE_FILE, st.st_mode & 0o777,
                                       st.st_mtime_ns, st.st_size))
            else:
                warn(f"skipping special file {name!r} (only files and directories are archived)")

    walk(root, "")
    out.sort(key=lambda e: e.name)
    try:
        check_names((e.name, e.type == TYPE_DIR) for e in out)
    except UnsafeArchiveError as exc:
        raise SourceError(f"cannot pack {root!r}: {exc}") from None
    return out


def _read(path: str) -> Iterator[bytes]:
    """The bytes of a regular file, opened without following a symlink swapped in."""
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0))
    with os.fdopen(fd, "rb") as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise SourceError(f"{path!r} is no longer a regular file")
        while chunk := f.read(CHUNK):
            yield chunk


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
    llm = Group("llm")
    for e in entries:
        if e.type == TYPE_DIR:
            dirs.entries.append(e)
            continue
        if e.size == 0 or codec == "store":
            choice = "store"
        elif codec in ("zstd", "llm"):
            choice = codec
        else:
            sample = b""
            for chunk in _read(e.path):
                sample = chunk[:chooser.SAMPLE_SIZE]
                break
            choice = chooser.choose(sample, e.size, _read(e.path),
                                    allowed if e.size <= MAX_AUTO_LLM_SIZE else allowed - {"llm"})
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


class _Tee:
    """Read a file's chunks while hashing and counting them (and reporting progress)."""

    def __init__(self, path: str, progress) -> None:
        self.path = path
        self.progress = progress
        self.sha = hashlib.sha256()
        self.size = 0

    def __iter__(self) -> Iterator[bytes]:
        for chunk in _read(self.path):
            self.sha.update(chunk)
            self.size += len(chunk)
            if self.progress is not None:
                self.progress.advance(len(chunk))
            yield chunk


def encode_llm_batch(entries: list[SourceEntry], writer: ArchiveWriter, *, level: int,
                     options: LLMOptions, forced: bool, progress=None, warn: Warn | None = None,
                     ) -> Iterator[tuple[SourceEntry, bytes, int, bytes, bytes, int]]:
    """Encode all llm-candidate entries together.

    Yields (entry, sha256, codec id, codec params, payload, size): the LLM payload where
    it won (or was forced), else the entry's zstd frame or its plain bytes.  Entries are
    read into memory: the LLM codec is for text, capped in auto mode by ``plan``.
    """
    datas = [b"".join(_read(e.path)) for e in entries]
    if progress is not None:
        progress.advance(sum(len(d) for d in datas))
    zstd_sizes: dict[int, bytes] = {}

    def zstd_frame(data: bytes) -> bytes:
        if id(data) not in zstd_sizes:
            zstd_sizes[id(data)] = b"".join(zstd_codec.encode([data], level, len(data)))
        return zstd_sizes[id(data)]

    results = encode_text_entries(
        datas, [e.name for e in entries], options, forced=forced,
        zstd_size=lambda d: len(zstd_frame(d)), add_model=writer.add_model, progress=progress,
        status=getattr(progress, "note", None))
    for e, data, result in zip(entries, datas, results, strict=True):
        sha = hashlib.sha256(data).digest()
        if result is not None:
            yield e, sha, result.codec_id, result.params, result.payload, len(data)
        elif data and len(zstd_frame(data)) < len(data):
            yield e, sha, CODEC_ZSTD, b"", zstd_frame(data), len(data)
        else:
            yield e, sha, CODEC_STORE, b"", data, len(data)


def write_plan(groups: list[Group], writer: ArchiveWriter, *, level: int = 19,
               progress=None, llm: LLMOptions | None = None, forced_llm: bool = False,
               warn: Warn | None = None) -> None:
    def record(e: SourceEntry, size: int, codec: int, params: bytes, stored: tuple,
               sha: bytes) -> EntryRecord:
        off, ssize, crc = stored
        return EntryRecord(e.name, TYPE_FILE, e.mode, e.mtime_ns, size, codec, params, off,
                           ssize, sha, crc)

    for g in groups:
        if g.kind == "dir":
            for e in g.entries:
                writer.add_entry(EntryRecord(e.name, TYPE_DIR, e.mode, e.mtime_ns, 0, 0, b"",
                                             0, 0, EMPTY_SHA256, 0))
        elif g.kind == "store":
            tee = _Tee(g.entries[0].path, progress)
            stored = writer.write_stored(tee)
            writer.add_entry(record(g.entries[0], tee.size, CODEC_STORE, b"", stored,
                                    tee.sha.digest()))
        elif g.kind == "zstd":
            e = g.entries[0]
            tee = _Tee(e.path, progress)
            stored = writer.write_stored(zstd_codec.encode(tee, level, e.size))
            writer.add_entry(record(e, tee.size, CODEC_ZSTD, b"", stored, tee.sha.digest()))
        elif g.kind == "solid":
            tees = [_Tee(e.path, progress) for e in g.entries]
            hint = sum(e.size for e in g.entries)
            shares: list[int] = []
            stored = writer.write_stored(zstd_codec.encode_solid(tees, level, hint, shares))
            skip = 0
            for e, t, share in zip(g.entries, tees, shares, strict=True):
                writer.add_entry(record(e, t.size, CODEC_ZSTD, struct.pack("<QQ", skip, share),
                                        stored, t.sha.digest()))
                skip += t.size
        elif g.kind == "llm":
            batch = encode_llm_batch(g.entries, writer, level=level, options=llm or LLMOptions(),
                                     forced=forced_llm, progress=progress, warn=warn)
            for e, sha, codec_id, params, payload, size in batch:
                stored = writer.write_stored([payload])
                writer.add_entry(record(e, size, codec_id, params, stored, sha))
        else:  # pragma: no cover - plan() only makes the kinds above
            raise ValueError(g.kind)


def pack(src_dir: str | os.PathLike[str], archive_path: str | os.PathLike[str], *,
         codec: str = "auto", level: int = 19, progress=None, overwrite: bool = False,
         solid: bool = True, warn: Warn | None = None, llm: LLMOptions | None = None,
         verify: bool = False) -> list[MemberInfo]:
    """Archive the contents of ``src_dir`` into ``archive_path``; return the members.

    The archive appears under its name only when complete (temporary file + rename);
    ``overwrite`` allows replacing an existing archive. Symlinks and special files are
    skipped with a warning (``warn`` callback, default ``warnings.warn``).

    ``llm`` selects the model and settings of the LLM codec (default: the embedded
    model). With ``codec="auto"`` and no usable model, text goes to zstd with a warning.
    ``verify`` decodes the whole finished archive and checks every SHA-256 before it
    is renamed into place."""
    if not zstd_codec.MIN_LEVEL <= level <= zstd_codec.MAX_LEVEL:
        raise SourceError(f"level must be in {zstd_codec.MIN_LEVEL}..{zstd_codec.MAX_LEVEL}")
    if codec not in CODEC_CHOICES:
        raise SourceError(f"unknown codec {codec!r} (choose from {', '.join(CODEC_CHOICES)})")
    src = os.fspath(src_dir)
    if not os.path.isdir(src):
        raise SourceError(f"{src!r} is not a directory" if os.path.exists(src)
                          else f"{src!r} does not exist")
    warn = warn or _default_warn
    llm = llm or LLMOptions()
    unavailable = llm_available(llm) if codec in ("auto", "llm") else "not requested"
    if codec == "llm" and unavailable:
        raise ModelError(unavailable)
    if codec == "auto" and unavailable:
        warn(f"LLM codec unavailable, text will use zstd: {unavailable}")

    def verify_archive(path: str) -> None:
        with ArchiveReader(path, llm=llm, warn=warn) as reader:
            reader.test(progress=progress)

    with ArchiveWriter(archive_path, overwrite=overwrite,
                       verify=verify_archive if verify else None) as writer:
        skip = {writer.temp_identity}
        if os.path.exists(archive_path):
            st = os.stat(archive_path)
            skip.add((st.st_dev, st.st_ino))
        entries = scan(src, skip=skip, warn=warn)
        groups = plan(entries, codec, solid=solid, llm_available=not unavailable)
        if progress is not None:
            progress.start(sum(e.size for e in entries), "packing")
        try:
            write_plan(groups, writer, level=level, progress=progress, llm=llm,
                       forced_llm=codec == "llm", warn=warn)
        finally:
            if progress is not None:
                progress.close()
    with ArchiveReader(archive_path) as reader:
        return reader.members()
