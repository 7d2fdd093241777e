"""Change an existing archive: add or replace members from a source, or delete members.

As ``zip -u``/``zip -d``, ``7z u``/``7z d`` and ``tar --delete`` do, but never in place:
the archive is rewritten into a temporary file beside it and renamed over it only when
complete (ArchiveWriter), so a failure or Ctrl-C leaves the old archive as it was.

Members that stay are copied as their stored bytes, CRC-checked on the way: an LLM entry
is never coded again (that costs minutes of model time; its model record is carried
over), a zstd frame is never recompressed. Only a solid block that loses some of its
members is redone, because its members share one frame or payload: a zstd block is
decoded and compressed again; an LLM block's other members are coded again from their
files when ``update`` has them (``_broken_llm_blocks``), else decoded and kept as a solid
zstd block (no model needed).
"""

from __future__ import annotations

import itertools
import os
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace

from .codecs import CODEC_LLM, CODEC_ZSTD
from .codecs import zstd as zstd_codec
from .codecs.llm import decode_params, encode_params
from .codecs.llm_options import LLMOptions
from .container.compact import solid_shares
from .container.layout import LLM_PARAMS_BYTES, TYPE_DIR, TYPE_FILE, EntryRecord
from .container.reader import ArchiveReader, MemberInfo
from .container.writer import ArchiveWriter
from .errors import ChecksumMismatchError, SourceError
from .packer import (
    CODEC_CHOICES,
    PackReport,
    Problem,
    SourceEntry,
    UnarchivableError,
    Warn,
    _default_warn,
    code_entries,
    llm_unavailable,
    scan,
    written_members,
)
from .progress import as_sink


@dataclass
class UpdateReport(PackReport):
    """What ``update`` did, beside what ``pack`` reports (skipped, changed, vanished)."""

    copied: list[str] = field(default_factory=list)  # members kept as stored
    coded: list[str] = field(default_factory=list)  # files added or replaced
    deleted: list[str] = field(default_factory=list)  # members removed


def update(archive: str | os.PathLike[str],
           src: str | os.PathLike[str] | Sequence[str | os.PathLike[str]], *,
           delete_missing: bool = False, codec: str = "auto", level: int = 19,
           solid: bool = True, exclude: Sequence[str] = (), progress=None,
           warn: Warn | None = None, llm: LLMOptions | None = None,
           skip_failed: bool = False, report: UpdateReport | None = None,
           ) -> list[MemberInfo]:
    """Make ``archive`` hold the current contents of ``src`` (a directory's contents, or
    one file, named as ``pack`` names them; or a list of such sources, whose names must
    not collide); return the members.

    New files are added; a file whose size or mtime differs from its member's is coded
    again (zip -u and 7z u decide by time too); a member whose file is unchanged is
    copied as stored (its mode follows the file). Members that are not in ``src`` stay,
    unless ``delete_missing`` (zip's ``-FS``). Other arguments as for ``pack``."""
    if codec not in CODEC_CHOICES:
        raise ValueError(f"unknown codec {codec!r} (choose from {', '.join(CODEC_CHOICES)})")
    progress = as_sink(progress)
    warn = warn or _default_warn
    llm = llm or LLMOptions()
    report = report if report is not None else UpdateReport()
    path = os.fspath(archive)
    with ArchiveReader(path, llm=llm, warn=warn) as reader, \
            ArchiveWriter(path, overwrite=True, warn=warn) as writer:
        st = os.stat(path)
        problems: list[Problem] = []
        skip = {writer.temp_identity, (st.st_dev, st.st_ino)}
        roots = [src] if isinstance(src, (str, os.PathLike)) else list(src)
        sources: list[SourceEntry] = []
        origin: dict[str, SourceEntry] = {}
        for root in roots:
            for entry in scan(root, skip=skip, warn=warn, problems=problems, exclude=exclude):
                first = origin.setdefault(entry.name, entry)
                if first is entry:
                    sources.append(entry)
                elif entry.type != TYPE_DIR and os.path.realpath(first.path) != \
                        os.path.realpath(entry.path):  # a directory twice is one member
                    raise SourceError(f"{entry.name!r} comes from both {first.path!r} and "
                                      f"{entry.path!r}; the archive was not changed")
        if problems and not skip_failed:
            raise UnarchivableError(
                f"{len(problems)} path{'s' if len(problems) > 1 else ''} cannot be "
                f"archived, first {problems[0]} (use --skip-unreadable to skip them); the "
                "archive was not changed", problems)
        for p in problems:
            warn(f"skipping {p}")
        report.skipped.extend(problems)
        old = _entries(reader)
        keep, modes, fresh = _compare(reader, sources)
        named = {s.name for s in sources}
        for i, e in enumerate(old):
            if e.name not in named:
                if delete_missing:
                    report.deleted.append(e.name)
                else:
                    keep.append(i)
        again = _broken_llm_blocks(reader, keep, named)
        if again:  # coded again from their unchanged files, in source order
            keep = [i for i in keep if i not in again]
            names = {old[i].name for i in again} | {s.name for s in fresh}
            fresh = [s for s in sources if s.name in names]
        _copy(reader, keep, writer, modes)
        report.copied.extend(old[i].name for i in keep)
        report.coded.extend(s.name for s in fresh if s.type == TYPE_FILE)
        unavailable = llm_unavailable(codec, llm)
        if codec == "auto" and unavailable and any(s.type == TYPE_FILE for s in fresh):
            warn(f"LLM codec unavailable, text will use zstd: {unavailable}")
        code_entries(fresh, writer, "updating", codec=codec, unavailable=unavailable,
                     solid=solid, level=level, llm=llm, warn=warn, report=report,
                     skip_failed=skip_failed, progress=progress)
    return written_members(path, report)


def delete(archive: str | os.PathLike[str], members: Iterable[str | MemberInfo], *,
           exclude: Sequence[str] = (), warn: Warn | None = None) -> list[MemberInfo]:
    """Remove ``members`` (names as ``list`` prints them or globs; a directory takes
    everything below it; ``exclude`` spares names) from ``archive``; return the members
    removed. Nothing is decoded except a solid block that loses some of its members."""
    path = os.fspath(archive)
    with ArchiveReader(path, warn=warn) as reader, \
            ArchiveWriter(path, overwrite=True, warn=warn) as writer:
        gone = reader.select(members, exclude)
        names = {m.name for m in gone}
        keep = [i for i, e in enumerate(_entries(reader)) if e.name not in names]
        _copy(reader, keep, writer, {})
    return gone


# ---------------------------------------------------------------- internals


def _entries(reader: ArchiveReader) -> list[EntryRecord]:
    """The reader's validated entry records (this module rewrites them)."""
    return reader._entries  # the container package's own validated records


def _compare(reader: ArchiveReader, sources: list[SourceEntry],
             ) -> tuple[list[int], dict[int, int], list[SourceEntry]]:
    """(members to copy, their new modes, sources to code): a file is unchanged when
    its size and mtime equal its member's; directories always come from the source."""
    old = _entries(reader)
    by_name = {e.name: i for i, e in enumerate(old)}
    keep: list[int] = []
    modes: dict[int, int] = {}
    fresh: list[SourceEntry] = []
    for s in sources:
        i = by_name.get(s.name)
        e = old[i] if i is not None else None
        if (e is not None and s.type == TYPE_FILE and e.type == TYPE_FILE
                and e.size == s.size and e.mtime_ns == s.mtime_ns):
            keep.append(i)  # type: ignore[arg-type]
            modes[i] = s.mode  # type: ignore[index]
        else:
            fresh.append(s)
    return keep, modes, fresh


def _broken_llm_blocks(reader: ArchiveReader, keep: list[int], named: set[str]) -> set[int]:
    """Kept members of LLM solid blocks that lose a member and whose files are in the
    source (unchanged: kept members are): coded again from those files, so they keep the
    model's ratio. The rest of such a block (files not in the source) is decoded and
    stored as a solid zstd block by ``_copy``, which needs no model."""
    keep_set = set(keep)
    again: set[int] = set()
    for block in set(reader._blocks.values()):
        if block.codec == CODEC_LLM and not keep_set.issuperset(block.members):
            again.update(i for i in block.members
                         if i in keep_set and _entries(reader)[i].name in named)
    return again


def _copy(reader: ArchiveReader, keep: list[int], writer: ArchiveWriter,
          modes: dict[int, int]) -> None:
    """Write the kept members into ``writer`` as stored, in stored order (see module)."""
    old = _entries(reader)
    keep_set = set(keep)
    models: dict[int, int] = {}  # old model index -> new

    def params(e: EntryRecord, block: bool = False) -> bytes:
        """``e``'s params with its model index (an llm member's params; an llm ``block``
        member's first two bytes, before its skip and share) renumbered for the new table."""
        if e.codec_id != CODEC_LLM:
            return e.codec_params
        cut = LLM_PARAMS_BYTES if block else len(e.codec_params)
        own, rest = e.codec_params[:cut], e.codec_params[cut:]
        index = decode_params(own)
        if index not in models:
            models[index] = writer.add_model(reader.models[index])
        return encode_params(models[index]) + rest

    def add(i: int, **fields) -> None:
        e = old[i]
        writer.add_entry(replace(e, mode=modes.get(i, e.mode), **fields))

    for ext in reader.extensions:
        writer.add_extension(ext)
    done_blocks: set[int] = set()
    for i in sorted(keep_set, key=lambda i: (old[i].stored_offset, i)):
        e = old[i]
        if e.type == TYPE_DIR:
            add(i)
            continue
        block = reader._blocks.get(i)
        if block is None:
            off, size, crc = _copy_bytes(reader, writer, e.stored_offset, e.stored_size,
                                         e.crc32, f"member {e.name!r}")
            add(i, codec_params=params(e), stored_offset=off, stored_size=size, crc32=crc)
        elif block.offset not in done_blocks:
            done_blocks.add(block.offset)
            members = [j for j in block.members if j in keep_set]
            if len(members) == len(block.members):  # the whole frame stays
                off, size, crc = _copy_bytes(reader, writer, block.offset,
                                             block.stored_size, block.crc32,
                                             f"solid block at offset {block.offset}")
                for j in members:
                    add(j, codec_params=params(old[j], True), stored_offset=off, stored_size=size,
                        crc32=crc)
            else:
                _recompress(reader, writer, members, add)


def _copy_bytes(reader: ArchiveReader, writer: ArchiveWriter, offset: int, size: int,
                crc: int, what: str) -> tuple[int, int, int]:
    """Copy stored bytes, refusing damaged ones (a rewrite must not carry damage on)."""
    stored = writer.write_stored(reader._stored(offset, size))
    if stored[2] != crc:
        raise ChecksumMismatchError(f"{what}: CRC-32 of the stored bytes does not match; "
                                    "the archive was not changed")
    return stored


def _recompress(reader: ArchiveReader, writer: ArchiveWriter, members: list[int],
                add) -> None:
    """The remaining members of a solid block, decoded (and verified) and compressed
    again as one new frame."""
    old = _entries(reader)
    datas: dict[int, bytes] = {}
    for i, chunks in reader._iter_payloads(members):
        datas[i] = b"".join(reader._hashed(chunks, old[i]))
    ordered = [datas[i] for i in members]
    off, size, crc = writer.write_stored(
        zstd_codec.encode(iter(ordered), 19, sum(map(len, ordered))))
    shares = solid_shares([len(d) for d in ordered], size)
    skips = itertools.accumulate([0] + [len(d) for d in ordered[:-1]])
    for i, share, skip in zip(members, shares, skips, strict=True):
        add(i, codec_id=CODEC_ZSTD, codec_params=struct.pack("<QQ", skip, share),
            stored_offset=off, stored_size=size, crc32=crc)
