"""ArchiveReader: list, read, extract and test a .llma archive, treating it as hostile.

Opening reads only the header, the footer and the index, and validates all of them
(checksums, limits, names, stored ranges) before anything is decoded. Payloads are
CRC-checked before decoding and SHA-256-checked after.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
import stat
import sys
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import BinaryIO

from .. import safety
from ..codecs import CODEC_LLM, CODEC_STORE, CODEC_ZSTD, codec_name, llm_pipeline
from ..codecs import store as store_codec
from ..codecs import zstd as zstd_codec
from ..codecs.llm_options import LLMOptions
from ..codecs.llm_pipeline import LLMDecoder
from ..errors import (
    ChecksumMismatchError,
    CorruptArchiveError,
    DamagedMembersError,
    DestinationExistsError,
    LlmarcError,
    MemberNotFoundError,
    UnsupportedFeatureError,
)
from ..members import excluded, is_pattern, matching
from ..progress import as_sink
from .index import decode_index
from .layout import (
    BLOCK_LLM,
    EMPTY_SHA256,
    EXT_LLM_BLOCKS,
    FOOTER_SIZE,
    HEADER_SIZE,
    LLM_PARAMS_BYTES,
    SMALL_HEADER_SIZE,
    SMALL_MAJOR,
    TRAILER_SIZE,
    TYPE_DIR,
    TYPE_NAMES,
    EntryRecord,
    Extension,
    ModelRecord,
    block_position,
    crc32,
    decode_footer,
    decode_header,
    decode_trailer,
    digest_matches,
    small_index_crc,
)
from .small import decode_small_index

CHUNK = 1 << 20
#: One string for every directory's (and empty file's) digest: a hex string each cost
#: 113 MB for the million directories an index may hold.
_EMPTY_HEX = EMPTY_SHA256.hex()


@dataclass(frozen=True, slots=True)
class MemberInfo:
    """One archive member, as ``list`` shows it."""

    name: str
    type: str  # "file" or "dir"
    mode: int  # permission bits only
    mtime_ns: int
    size: int  # original size in bytes
    packed_size: int  # stored bytes (for a solid block member: its share of the frame)
    codec: str  # "store", "zstd", "llm" (or "#<id>" for an unknown codec)
    codec_params: bytes
    sha256: str  # hex SHA-256 of the original bytes

    @property
    def bits_per_byte(self) -> float:
        """Stored bits per original byte (0.0 for empty members)."""
        return 8.0 * self.packed_size / self.size if self.size else 0.0

    def is_dir(self) -> bool:
        return self.type == "dir"

    def is_file(self) -> bool:
        return self.type == "file"


@dataclass(frozen=True)
class _Block:
    """A solid block: one zstd frame (§6.2) or one LLM payload (§12.6) whose output is
    its members' bytes back to back."""

    offset: int
    stored_size: int
    crc32: int
    members: tuple[int, ...]  # entry indexes, in order of their bytes in the output
    codec: int
    total: int  # the sum of the members' sizes: the output's length


def _seekable_fd(stream: BinaryIO) -> int:
    """A private descriptor the reader can ``pread``: the stream's own file if it is a
    regular file (``< a.llma``), else a copy spooled to an unnamed temporary file (a
    pipe: the footer and index are at the end, so the whole archive must be read)."""
    with contextlib.suppress(AttributeError, OSError, ValueError):
        fd = stream.fileno()
        if stat.S_ISREG(os.fstat(fd).st_mode):
            return os.dup(fd)
    with tempfile.TemporaryFile(prefix="llmarc-stdin-") as spool:
        shutil.copyfileobj(stream, spool, CHUNK)
        spool.flush()
        return os.dup(spool.fileno())


def _raising(exc: BaseException) -> Iterator[bytes]:
    """Chunks that raise ``exc`` when read: a member that failed, for keep_going."""
    raise exc
    yield b""  # pragma: no cover - makes this a generator


class ArchiveReader:
    """A read-only view of one archive. Use ``llmarc.open(path)``."""

    def __init__(self, path: str | os.PathLike[str] | BinaryIO, *,
                 llm: LLMOptions | None = None,
                 warn: Callable[[str], None] | None = None) -> None:
        self.llm_options = llm or LLMOptions()
        self.warn = warn
        self._llm_decoder: LLMDecoder | None = None
        if isinstance(path, (str, os.PathLike)):
            self.path = os.fspath(path)
            self._fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        else:
            self.path = str(getattr(path, "name", "<stream>"))
            self._fd = _seekable_fd(path)
        try:
            if stat.S_ISDIR(os.fstat(self._fd).st_mode):  # open(2) accepts a directory
                raise IsADirectoryError(errno.EISDIR, "is a directory, not an archive",
                                        self.path)
            self._load()
        except BaseException:
            os.close(self._fd)
            self._fd = -1
            raise

    # ------------------------------------------------------------------ loading

    def _pread(self, size: int, offset: int) -> bytes:
        data = os.pread(self._fd, size, offset)
        if len(data) != size:
            raise CorruptArchiveError("archive is truncated")
        return data

    def _load(self) -> None:
        file_size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, HEADER_SIZE, 0)
        header = decode_header(head)
        small = header.major == SMALL_MAJOR
        if small:  # format 3.0 (§12): 12-byte header, 8-byte trailer
            footer = decode_trailer(os.pread(self._fd, TRAILER_SIZE, max(
                0, file_size - TRAILER_SIZE)), file_size)
        else:
            if file_size < HEADER_SIZE + FOOTER_SIZE:
                raise CorruptArchiveError("archive is truncated (no footer)")
            footer = decode_footer(self._pread(FOOTER_SIZE, file_size - FOOTER_SIZE),
                                   file_size)
        raw = self._pread(footer.index_size, footer.index_offset)
        if (small_index_crc(head, raw) if small else crc32(raw)) != footer.index_crc32:
            raise ChecksumMismatchError("index checksum mismatch")
        index = (decode_small_index(raw, footer.index_offset) if small
                 else decode_index(raw, footer.index_offset))
        self._data_start = SMALL_HEADER_SIZE if small else HEADER_SIZE
        self.version: tuple[int, int] = (header.major, header.minor)
        self.creator: str = index.creator
        self.models: list[ModelRecord] = index.models
        # LLM solid blocks exist only where a 3.0 archive declares them (§12.6)
        self._llm_blocks = small and any(e.tag == EXT_LLM_BLOCKS for e in index.extensions)
        self.extensions: tuple[Extension, ...] = tuple(
            e for e in index.extensions if e.tag != EXT_LLM_BLOCKS)
        self._entries = index.entries
        self._data_end = footer.index_offset
        for e in self._entries:  # name_len is 1..4096 (spec §5): a field rule, so corrupt
            if not e.name:
                raise CorruptArchiveError("an entry has an empty name (name_len 0)")
        safety.check_names((e.name, e.type == TYPE_DIR) for e in self._entries)
        self._by_name = {e.name: i for i, e in enumerate(self._entries)}
        self._check_ranges()
        self._infos = [self._info(i) for i in range(len(self._entries))]
        self._verified: set[tuple[int, int]] = set()

    def _check_ranges(self) -> None:
        """Stored ranges lie in the data area, tile it exactly, and are shared only by the
        members of a solid block (whose bytes tile the block's output in order)."""
        ranges: dict[tuple[int, int], list[int]] = {}
        for i, e in enumerate(self._entries):
            if e.type == TYPE_DIR:
                continue
            if e.stored_offset < self._data_start \
                    or e.stored_offset + e.stored_size > self._data_end:
                raise CorruptArchiveError(f"member {e.name!r} has its data outside the archive")
            if e.codec_id == CODEC_STORE and (e.codec_params or e.stored_size != e.size):
                raise CorruptArchiveError(f"stored member {e.name!r} has inconsistent sizes")
            if e.codec_id == CODEC_ZSTD and len(e.codec_params) not in (0, 16):
                raise CorruptArchiveError(f"zstd member {e.name!r} has invalid codec params")
            if e.codec_id == CODEC_ZSTD and not e.codec_params:
                zstd_codec.check_claim(e.size, e.stored_size, f"member {e.name!r}")
            if e.stored_size:
                ranges.setdefault((e.stored_offset, e.stored_size), []).append(i)
        pos = self._data_start
        self._blocks: dict[int, _Block] = {}  # entry index -> its block
        for (off, size), idx in sorted(ranges.items()):
            if off != pos:
                raise CorruptArchiveError("stored data ranges overlap or leave gaps")
            pos = off + size
            params = [self._block_position(i) for i in idx]
            if len(idx) > 1 or params[0] is not None:
                if any(p is None for p in params):
                    raise CorruptArchiveError("members share stored bytes without a solid block")
                head = self._entries[idx[0]]
                expect = shared = 0
                for i, (skip, share) in zip(idx, params, strict=True):  # type: ignore[misc]
                    e = self._entries[i]
                    if skip != expect or e.crc32 != head.crc32 or e.codec_id != head.codec_id \
                            or e.codec_params[:-16] != head.codec_params[:-16]:
                        raise CorruptArchiveError("solid block members are inconsistent")
                    expect += e.size
                    shared += share
                if shared != size:
                    raise CorruptArchiveError("solid block shares do not add up to its size")
                if head.codec_id == BLOCK_LLM and not expect:
                    raise CorruptArchiveError(f"LLM solid block at offset {off} holds no byte")
                if head.codec_id != BLOCK_LLM:  # an LLM payload bounds its own work (§12.6)
                    zstd_codec.check_claim(expect, size, f"solid block at offset {off}")
                block = _Block(off, size, head.crc32, tuple(idx), head.codec_id, expect)
                for i in idx:
                    self._blocks[i] = block
        if pos != self._data_end:
            raise CorruptArchiveError("stored data ranges leave a gap before the index")

    def _block_position(self, i: int) -> tuple[int, int] | None:
        """(skip, share) of entry ``i`` if it is a solid block member (an llm one only
        where the archive declares LLM blocks), else None."""
        return block_position(self._entries[i], self._llm_blocks)

    def _info(self, i: int) -> MemberInfo:
        e = self._entries[i]
        solid = self._block_position(i) if i in self._blocks else None
        packed = solid[1] if solid else e.stored_size
        digest = _EMPTY_HEX if e.sha256 == EMPTY_SHA256 else e.sha256.hex()
        return MemberInfo(e.name, TYPE_NAMES[e.type], e.mode, e.mtime_ns, e.size, packed,
                          codec_name(e.codec_id), e.codec_params, digest)

    # ------------------------------------------------------------------ listing

    def members(self) -> list[MemberInfo]:
        return list(self._infos)

    @property
    def archive_size(self) -> int:
        """Bytes of the whole archive (header, data, index, footer)."""
        return os.fstat(self._fd).st_size

    def damaged(self) -> list[tuple[MemberInfo, LlmarcError]]:
        """Members whose stored bytes fail their CRC-32: a pass over the data at disk
        speed, no decoding and no model (``tar t`` reads the whole archive as well)."""
        out: list[tuple[MemberInfo, LlmarcError]] = []
        for i, e in enumerate(self._entries):
            if e.type == TYPE_DIR:
                continue
            block = self._blocks.get(i)
            where = (block.offset, block.stored_size, block.crc32) if block else (
                e.stored_offset, e.stored_size, e.crc32)
            try:
                self._verify_crc(*where, f"member {e.name!r}")
            except LlmarcError as exc:
                out.append((self._infos[i], exc))
        return out

    def getmember(self, name: str) -> MemberInfo:
        return self._infos[self._index(name)]

    def _index(self, name: str | MemberInfo) -> int:
        key = name.name if isinstance(name, MemberInfo) else name
        try:
            return self._by_name[key]
        except KeyError:
            raise MemberNotFoundError(f"no member named {key!r} in the archive") from None

    def __iter__(self) -> Iterator[MemberInfo]:
        return iter(self._infos)

    def __len__(self) -> int:
        return len(self._infos)

    def __contains__(self, name: object) -> bool:
        return name in self._by_name

    # ------------------------------------------------------------------ payloads

    def _stored(self, offset: int, size: int) -> Iterator[bytes]:
        end = offset + size
        while offset < end:
            n = min(CHUNK, end - offset)
            yield self._pread(n, offset)
            offset += n

    def _verify_crc(self, offset: int, size: int, expected: int, what: str) -> None:
        if (offset, size) in self._verified:
            return
        crc = 0
        for chunk in self._stored(offset, size):
            crc = crc32(chunk, crc)
        if crc != expected:
            raise ChecksumMismatchError(f"{what}: CRC-32 of the stored bytes does not match")
        self._verified.add((offset, size))

    def _check_codec(self, e: EntryRecord) -> None:
        if e.type == TYPE_DIR:
            return
        if e.codec_id not in (CODEC_STORE, CODEC_ZSTD, CODEC_LLM):
            raise UnsupportedFeatureError(
                f"member {e.name!r} uses unknown codec id {e.codec_id}")

    def _plain_chunks(self, e: EntryRecord) -> Iterator[bytes]:
        """Decoded bytes of a store or single-frame zstd member (CRC checked first)."""
        self._verify_crc(e.stored_offset, e.stored_size, e.crc32, f"member {e.name!r}")
        raw = self._stored(e.stored_offset, e.stored_size)
        if e.codec_id == CODEC_STORE:
            return store_codec.decode(raw, e.size)
        return zstd_codec.decode(raw, e.size)

    def _block_members(self, block: _Block, wanted: set[int] | None,
                       ) -> Iterator[tuple[int, Iterator[bytes]]]:
        """Decode a solid block once, yielding (entry index, chunks) for wanted members.

        Each yielded iterator must be consumed before the next item is requested.
        Decoding stops after the last wanted member unless ``wanted`` is None (all)."""
        self._verify_crc(block.offset, block.stored_size, block.crc32,
                         f"solid block at offset {block.offset}")
        total = sum(self._entries[i].size for i in block.members)
        stream = zstd_codec.decode(self._stored(block.offset, block.stored_size), total)
        buf = memoryview(b"")
        last = max(wanted) if wanted else None
        for i in block.members:
            remaining = self._entries[i].size

            def take(n: int = remaining) -> Iterator[bytes]:
                nonlocal buf
                while n:
                    if not buf:
                        try:
                            buf = memoryview(next(stream))
                        except StopIteration:
                            raise CorruptArchiveError("solid block is too short") from None
                    piece = buf[:n]
                    buf = buf[len(piece):]
                    n -= len(piece)
                    yield bytes(piece)

            chunks = take()
            if wanted is None or i in wanted:
                yield i, chunks
            for _ in chunks:  # drain whatever the consumer left
                pass
            if wanted is not None and i == last:
                return
        for _ in stream:  # finish the frame so its end is checked
            raise CorruptArchiveError("solid block decodes to more than its members")

    def _iter_payloads(self, indexes: Iterable[int], progress=None, keep_going: bool = False,
                       ) -> Iterator[tuple[int, Iterable[bytes]]]:
        """(entry index, decoded chunks) for the given file entries, in archive order, each
        block decoded once and the llm members decoded together, a window of
        ``llm_pipeline.WINDOW_BYTES`` of output at a time.

        With ``keep_going`` a member that cannot be decoded (a bad CRC, an unknown codec,
        a model that cannot load) is still yielded, with chunks that raise its error, and
        the others follow; the consumer decides what to do with each failure."""
        todo = sorted(set(indexes), key=lambda i: (self._entries[i].stored_offset, i))
        failed: dict[int, LlmarcError] = {}
        for i in todo:
            try:
                self._check_codec(self._entries[i])
            except LlmarcError as exc:
                if not keep_going:
                    raise
                failed[i] = exc
        for i, exc in failed.items():
            yield i, _raising(exc)
        todo = [i for i in todo if i not in failed]
        todo_set = set(todo)
        llm = self._llm_units([i for i in todo if self._entries[i].codec_id == CODEC_LLM])
        done_blocks: set[int] = set()
        for i in todo:
            e = self._entries[i]
            if e.codec_id == CODEC_LLM:
                continue
            block = self._blocks.get(i)
            if block is None:
                try:
                    chunks = self._plain_chunks(e)
                except LlmarcError as exc:
                    if not keep_going:
                        raise
                    chunks = _raising(exc)
                yield i, chunks
            elif block.offset not in done_blocks:
                done_blocks.add(block.offset)
                wanted = {j for j in block.members if j in todo_set}
                full = len(wanted) == len(block.members)
                members = self._block_members(block, None if full else wanted)
                if keep_going:
                    members = self._block_or_failures(block, wanted, members)
                yield from members
        if llm:  # a window of output at a time: memory holds one, not every member
            with self._llm_session():
                for window in llm_pipeline.windows(llm, self._unit_size,
                                                   llm_pipeline.WINDOW_BYTES):
                    yield from self._decode_llm(window, progress, keep_going)

    def _llm_units(self, indexes: list[int]) -> list[tuple[int, ...]]:
        """The llm members to decode as decoder items: a member on its own, or the wanted
        members of one LLM solid block (decoded whole, once), in stored order."""
        units: dict[tuple[str, int], list[int]] = {}  # in first-seen order
        for i in indexes:
            block = self._blocks.get(i)
            units.setdefault(("member", i) if block is None else ("block", block.offset),
                             []).append(i)
        return [tuple(unit) for unit in units.values()]

    def _unit_size(self, unit: tuple[int, ...]) -> int:
        """Bytes the decoder outputs for ``unit``: a whole block, or one member."""
        block = self._blocks.get(unit[0])
        return block.total if block is not None else self._entries[unit[0]].size

    def _block_or_failures(self, block: _Block, wanted: set[int],
                           members: Iterator[tuple[int, Iterator[bytes]]],
                           ) -> Iterator[tuple[int, Iterable[bytes]]]:
        """keep_going for one solid block: its members, or each wanted member with the
        block's error (a bad CRC fails before the first member); a member after a broken
        one fails with the block's damage too."""
        pending = [j for j in block.members if j in wanted]
        try:
            for i, chunks in members:
                pending.remove(i)
                yield i, chunks
        except LlmarcError as exc:
            for j in pending:
                yield j, _raising(exc)

    @contextlib.contextmanager
    def _llm_session(self) -> Iterator[None]:
        """One decoder session (one set of Ray actors) for all windows of llm members."""
        if self._llm_decoder is None:
            self._llm_decoder = LLMDecoder(self.models, self.llm_options, self.warn)
        with self._llm_decoder.session():
            yield

    def _decode_llm(self, units: Sequence[tuple[int, ...]], progress=None,
                    keep_going: bool = False) -> Iterator[tuple[int, Iterable[bytes]]]:
        """Decode all given llm units (``_llm_units``) in one batch, yielding (entry
        index, chunks) for each member.

        Stored CRCs are checked before any model runs; the model is loaded once per
        reader (and only if an llm member is actually read). The caller checks SHA-256."""
        items, ready = [], []
        for unit in units:
            try:
                items.append(self._llm_item(unit))
            except LlmarcError as exc:
                if not keep_going:
                    raise
                for i in unit:
                    yield i, _raising(exc)
                continue
            ready.append(unit)
        if not ready:
            return
        if hasattr(progress, "defer"):  # credited as the tokens are decoded
            progress.defer(sum(size for _params, _payload, size in items))
        try:
            if self._llm_decoder is None:
                self._llm_decoder = LLMDecoder(self.models, self.llm_options, self.warn)
            results = self._llm_decoder.decode(items, progress)
        except LlmarcError as exc:  # the model cannot load, or refuses the archive
            if not keep_going:
                raise
            for unit in ready:
                for i in unit:
                    yield i, _raising(exc)
            return
        for unit, result, (_params, _payload, size) in zip(ready, results, items,
                                                            strict=True):
            if not isinstance(result, BaseException) and len(result) != size:
                # a block's members are cut from its output: its length decides for all
                result = ValueError(f"decodes to {len(result)} bytes, not {size}")
            if isinstance(result, BaseException):
                block = self._blocks.get(unit[0])
                what = (f"LLM solid block at offset {block.offset}" if block is not None
                        else f"member {self._entries[unit[0]].name!r}")
                error = CorruptArchiveError(f"{what}: {result}")
                if not keep_going:
                    raise error
                for i in unit:
                    yield i, _raising(error)
            else:
                yield from self._split(unit, result)

    def _llm_item(self, unit: tuple[int, ...]) -> tuple[bytes, bytes, int]:
        """(llm params, CRC-checked payload, output size) of one unit: a block's payload
        is decoded as one entry of its members' total size (llm-codec.md §3.5)."""
        block = self._blocks.get(unit[0])
        if block is None:
            e = self._entries[unit[0]]
            self._verify_crc(e.stored_offset, e.stored_size, e.crc32, f"member {e.name!r}")
            return e.codec_params, b"".join(self._stored(e.stored_offset, e.stored_size)), \
                e.size
        self._verify_crc(block.offset, block.stored_size, block.crc32,
                         f"LLM solid block at offset {block.offset}")
        params = self._entries[block.members[0]].codec_params[:LLM_PARAMS_BYTES]
        return params, b"".join(self._stored(block.offset, block.stored_size)), block.total

    def _split(self, unit: tuple[int, ...], output: bytes,
               ) -> Iterator[tuple[int, Iterable[bytes]]]:
        """(entry index, chunks) of each member of ``unit`` from the decoded output."""
        block = self._blocks.get(unit[0])
        if block is None:
            yield unit[0], (output,)
            return
        view = memoryview(output)
        wanted = set(unit)
        for i in block.members:
            size = self._entries[i].size
            if i in wanted:
                yield i, (bytes(view[:size]),)
            view = view[size:]

    @staticmethod
    def _hashed(chunks: Iterable[bytes], e: EntryRecord, progress=None) -> Iterator[bytes]:
        h = hashlib.sha256() if e.sha256 else None  # 1.1 solid members carry a CRC-32
        # an LLM member's bytes were deferred to its tokens (_decode_llm): not again here
        counted = progress is not None and not (e.codec_id == CODEC_LLM
                                                and hasattr(progress, "defer"))
        crc = 0
        n = 0
        for chunk in chunks:
            if h is not None:
                h.update(chunk)
            else:
                crc = crc32(chunk, crc)
            n += len(chunk)
            if n > e.size:
                raise CorruptArchiveError(f"member {e.name!r} decodes to too many bytes")
            if counted:
                progress.advance(len(chunk))
            yield chunk
        if n != e.size:
            raise CorruptArchiveError(f"member {e.name!r} decodes to {n} bytes, not {e.size}")
        if h is not None and not digest_matches(h.digest(), e.sha256):
            raise ChecksumMismatchError(
                f"member {e.name!r}: SHA-256 of the decoded data does not match")
        if h is None and crc != e.data_crc32:
            raise ChecksumMismatchError(
                f"member {e.name!r}: CRC-32 of the decoded data does not match")

    # ------------------------------------------------------------------ public reading

    def read(self, name: str | MemberInfo, *, progress=None) -> bytes:
        """The original bytes of one member (b"" for a directory). ``progress``: as for
        ``extract`` (an LLM member's decoding can take minutes)."""
        progress = as_sink(progress)
        i = self._index(name)
        e = self._entries[i]
        if e.type == TYPE_DIR:
            return b""
        out = bytearray()
        if progress is not None:
            progress.start(e.size, "reading")
        try:
            for _j, chunks in self._iter_payloads([i], progress):
                for chunk in self._hashed(chunks, e, progress):
                    out += chunk
        finally:
            if progress is not None:
                progress.close()
        return bytes(out)

    def test(self, progress=None, *, keep_going: bool = False) -> list[MemberInfo]:
        """Decode every member and check every checksum; return the members checked.

        With ``keep_going`` every member is tried: the damaged ones are collected and
        raised together at the end (DamagedMembersError, ``done`` holds the sound ones)."""
        progress = as_sink(progress)
        files = [i for i, e in enumerate(self._entries) if e.type != TYPE_DIR]
        failures: list[tuple[MemberInfo, LlmarcError]] = []
        if progress is not None:
            progress.start(sum(self._entries[i].size for i in files), "testing")
        try:
            for i, chunks in self._iter_payloads(files, progress, keep_going):
                try:
                    for _ in self._hashed(chunks, self._entries[i], progress):
                        pass
                except LlmarcError as exc:
                    if not keep_going:
                        raise
                    failures.append((self._infos[i], exc))
        finally:
            if progress is not None:
                progress.close()
        return self._outcome(self.members(), failures, "verified intact")

    def _outcome(self, chosen: list[MemberInfo],
                 failures: list[tuple[MemberInfo, LlmarcError]], verb: str,
                 ) -> list[MemberInfo]:
        """``chosen``, or DamagedMembersError naming the failures (keep_going)."""
        if not failures:
            return chosen
        bad = {m.name for m, _ in failures}
        done = [m for m in chosen if m.name not in bad]
        n = len(failures)
        raise DamagedMembersError(
            f"{n} member{'s' if n > 1 else ''} failed (listed above); {len(done)} "
            f"other{'s' if len(done) != 1 else ''} {verb}", failures, done)

    def select(self, members: Iterable[str | MemberInfo] | None = None,
               exclude: Sequence[str] = ()) -> list[MemberInfo]:
        """The members that ``members`` (default: all) name, minus ``exclude``.

        Names are accepted as ``list`` prints them (``dir/``, ``./a``) and as glob
        patterns (``'src/*.py'``: ``*`` matches ``/`` too, as in tar and unzip); a
        directory brings everything below it; ``exclude`` patterns match a name or any
        part of it after a ``/``, as tar's ``--exclude`` does (llmarc.members)."""
        return [self._infos[i] for i in self._select(members, exclude)]

    def _select(self, members: Iterable[str | MemberInfo] | None,
                exclude: Sequence[str] = ()) -> list[int]:
        if members is None:
            chosen = set(range(len(self._entries)))
        else:
            chosen = set()
            for m in members:
                if isinstance(m, MemberInfo):
                    found = [m.name]
                else:
                    found = matching(self._by_name, m)
                    if not found:
                        raise MemberNotFoundError(f"no member named {m!r} in the archive"
                                                  + (" (no name matches the pattern)"
                                                     if is_pattern(m) else ""))
                for name in found:
                    i = self._index(name)
                    chosen.add(i)
                    if self._entries[i].type == TYPE_DIR:
                        prefix = self._entries[i].name + "/"
                        chosen.update(j for j, e in enumerate(self._entries)
                                      if e.name.startswith(prefix))
        return sorted(i for i in chosen if not excluded(self._entries[i].name, exclude))

    def extract(self, dest: str | os.PathLike[str] = ".",
                members: Iterable[str | MemberInfo] | None = None, *,
                overwrite: bool = False, progress=None, keep_modes: bool = False,
                exclude: Sequence[str] = (), skip_existing: bool = False,
                keep_going: bool = False) -> list[MemberInfo]:
        """Extract members (default: all; names, ``dir/`` or globs, see ``select``) below
        ``dest``; return what was extracted.

        Modes follow tar's ``data`` filter unless ``keep_modes`` (safety.extracted_mode).

        Never writes outside ``dest`` or through a symlink, never replaces an existing
        file unless ``overwrite``, and gives each file its final name only after its
        SHA-256 has been verified, so an interrupted or failed extract leaves no
        half-written file; directories get their final modes even then (they are
        created owner-only), so a rerun can write into them.

        ``skip_existing`` resumes: a file already in ``dest`` with the member's size and
        checksum is left alone (and not returned); a different one is still refused
        without ``overwrite``. ``keep_going`` extracts every intact member, then raises
        DamagedMembersError naming the others (tar and unzip go on the same way).
        ``progress``: None, a callable receiving a ``llmarc.ProgressInfo`` on every
        change, or a sink (llmarc.progress), as for ``llmarc.pack``."""
        progress = as_sink(progress)
        chosen = self._select(members, exclude)
        entries = self._entries
        if not keep_going:
            for i in chosen:
                self._check_codec(entries[i])
        root = safety.open_root(dest)
        try:
            safety.check_folding(root, [entries[i].name for i in chosen])
            parts = {i: tuple(entries[i].name.split("/")) for i in chosen}
            present = self._present(root, chosen, parts, overwrite, skip_existing)
            chosen = [i for i in chosen if i not in present]
            dirs = [i for i in chosen if entries[i].type == TYPE_DIR]
            failures: list[tuple[MemberInfo, LlmarcError]] = []
            try:
                for i in sorted(dirs, key=lambda i: len(parts[i])):
                    fd = safety.open_dirs(root, parts[i][:-1])
                    try:
                        safety.make_dir(fd, parts[i][-1], entries[i].name)
                    finally:
                        os.close(fd)
                files = [i for i in chosen if entries[i].type != TYPE_DIR]
                self._write_files(root, files, parts, overwrite, keep_modes, progress,
                                  keep_going, failures)
            finally:
                # also after an error or Ctrl-C: directories made owner-only get their
                # modes, so what was extracted is usable and a rerun can resume
                for i in sorted(dirs, key=lambda i: -len(parts[i])):
                    try:
                        fd = safety.open_dirs(root, parts[i][:-1], create=False)
                        try:
                            safety.finish_dir(fd, parts[i][-1], entries[i].name,
                                              safety.extracted_mode(entries[i].mode,
                                                                    keep_modes),
                                              entries[i].mtime_ns)
                        finally:
                            os.close(fd)
                    except (OSError, LlmarcError):
                        if sys.exc_info()[0] is None:
                            raise
        finally:
            os.close(root)
        return self._outcome([self._infos[i] for i in chosen], failures, "extracted")

    def _present(self, root: int, chosen: list[int], parts: dict[int, tuple[str, ...]],
                 overwrite: bool, skip_existing: bool) -> set[int]:
        """Files of ``chosen`` already in place (skip_existing: same size and checksum);
        refuses, before anything is written, a different existing file without
        ``overwrite``."""
        present: set[int] = set()
        if overwrite and not skip_existing:
            return present
        with safety.ParentDirs(root, create=False) as parents:
            for i in chosen:
                e = self._entries[i]
                if e.type == TYPE_DIR:
                    continue
                st = safety.lexists_at(root, parts[i], parents)
                if st is None:
                    continue
                if skip_existing and self._same_content(parents, parts[i], e, st):
                    present.add(i)
                elif not overwrite:
                    raise DestinationExistsError(
                        f"{e.name!r} already exists in the destination (use --overwrite "
                        "to replace it" + (")" if skip_existing else
                                           ", or --skip-existing to keep identical files)"))
        return present

    @staticmethod
    def _same_content(parents: safety.ParentDirs, parts: tuple[str, ...], e: EntryRecord,
                      st: os.stat_result) -> bool:
        """Whether the existing file holds exactly member ``e``'s bytes (size first, then
        SHA-256, or the data CRC-32 a format-1.1 solid member carries instead)."""
        if not stat.S_ISREG(st.st_mode) or st.st_size != e.size:
            return False
        try:
            fd = os.open(parts[-1], os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0),
                         dir_fd=parents.open(parts[:-1]))
        except OSError:
            return False
        h = hashlib.sha256() if e.sha256 else None
        crc = 0
        with os.fdopen(fd, "rb") as f:
            while chunk := f.read(CHUNK):
                if h is not None:
                    h.update(chunk)
                else:
                    crc = crc32(chunk, crc)
        return digest_matches(h.digest(), e.sha256) if h is not None else crc == e.data_crc32

    def _write_files(self, root: int, files: list[int], parts: dict[int, tuple[str, ...]],
                     overwrite: bool, keep_modes: bool, progress, keep_going: bool,
                     failures: list[tuple[MemberInfo, LlmarcError]]) -> None:
        """Decode and place ``files`` (``extract``'s second half); with ``keep_going``
        failures are collected instead of raised."""
        entries = self._entries
        if progress is not None:
            progress.start(sum(entries[i].size for i in files), "extracting")
        try:
            with safety.ParentDirs(root) as parents:
                for i, chunks in self._iter_payloads(files, progress, keep_going):
                    e = entries[i]
                    try:
                        safety.write_file(parents.open(parts[i][:-1]), parts[i][-1], e.name,
                                          self._hashed(chunks, e, progress), e.sha256 or None,
                                          safety.extracted_mode(e.mode, keep_modes),
                                          e.mtime_ns, overwrite)
                    except LlmarcError as exc:
                        if not keep_going:
                            raise
                        failures.append((self._infos[i], exc))
        finally:
            if progress is not None:
                progress.close()

    def extract_to_stream(self, out: BinaryIO,
                          members: Iterable[str | MemberInfo] | None = None, *,
                          exclude: Sequence[str] = (), progress=None) -> list[MemberInfo]:
        """Write the bytes of the selected files to ``out`` back to back, in the order
        their data is stored (``tar -xO``, ``unzip -p``); return the members written.

        A stream cannot take bytes back: a member's checksum is checked as its last
        bytes are written, and a mismatch raises after them (as with tar and unzip)."""
        progress = as_sink(progress)
        files = [i for i in self._select(members, exclude) if self._entries[i].type != TYPE_DIR]
        for i in files:
            self._check_codec(self._entries[i])
        if progress is not None:
            progress.start(sum(self._entries[i].size for i in files), "extracting")
        try:
            for i, chunks in self._iter_payloads(files, progress):
                for chunk in self._hashed(chunks, self._entries[i], progress):
                    out.write(chunk)
            out.flush()
        finally:
            if progress is not None:
                progress.close()
        return [self._infos[i] for i in files]

    # ------------------------------------------------------------------ lifetime

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ArchiveReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.close()
