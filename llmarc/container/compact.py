"""The compact entry table of format 1.1 (spec/format.md §4.2): encode and hostile decode.

Why it exists: the 1.0 entry record costs ~114 bytes per entry (fixed-width fields, a
SHA-256 per file), so an archive of 10,000 small files was bigger than its input. Here
names are front-coded against the previous entry, numbers are varints (mtime as a delta),
stored offsets are implicit (the data area is tiled in table order), solid block members
carry no stored fields and a 4-byte CRC-32 instead of a SHA-256, and the whole table is
one zstd frame. It travels in the critical archive extension 0x8001, so a 1.0 reader
refuses a 1.1 archive by name (*unsupported*) instead of misreading it.

Decoding never allocates by a claimed size: the zstd frame is read through a bounded
stream reader in 1 MiB pieces and stops as soon as the output passes the declared size.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator

import zstandard

from ..codecs import zstd as zstd_codec
from ..errors import CorruptArchiveError, UnsupportedFeatureError
from .layout import (
    BLOCK_LLM,
    BLOCK_ZSTD,
    DIGEST128_BYTES,
    EMPTY_SHA256,
    FLAG_CRC32,
    FLAG_DIGEST128,
    FLAG_SOLID_FIRST,
    FLAG_SOLID_NEXT,
    HEADER_SIZE,
    LLM_PARAMS_BYTES,
    MAX_ENTRIES,
    MAX_ENTRY_EXT_BYTES,
    MAX_INDEX_SIZE,
    MAX_NAME_BYTES,
    MAX_PARAMS_BYTES,
    MAX_SIZE,
    TABLE_PLAIN,
    TABLE_ZSTD,
    TYPE_DIR,
    TYPE_FILE,
    EntryRecord,
    block_position,
    check_entry_fields,
    decode_ext_area,
    encode_ext_area,
)

#: zstd level of the table (the table is small next to the data; 19 costs little).
TABLE_LEVEL = 19
#: The smallest compact record: six one-byte varints, type, flags (a directory).
MIN_RECORD = 8
#: Front coding lets a 12-byte record stand for a 4,096-byte name, so the decoded names
#: are capped as a whole (spec/format.md §4.2): memory stays bounded whatever the table.
MAX_NAME_TOTAL = 256 * 1024 * 1024
#: Frame bytes fed to the decoder at a time: a call yields at most 64 blocks of 128 KiB.
_TABLE_FEED = 256


# ---------------------------------------------------------------- varints


def put_varint(out: bytearray, value: int) -> None:
    """Unsigned LEB128 (7 bits per byte, low first, high bit = more follows)."""
    if value < 0 or value >= 1 << 64:
        raise ValueError(f"varint out of range: {value}")
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)


def wrap_i64(value: int) -> int:
    """``value`` modulo 2^64 as a two's complement i64 (mtime deltas wrap, so any two
    i64 mtimes are one varint apart)."""
    return ((value + (1 << 63)) & ((1 << 64) - 1)) - (1 << 63)


def zigzag(value: int) -> int:
    """Signed -> unsigned (0, -1, 1, -2, ... -> 0, 1, 2, 3, ...), 64-bit."""
    return (value << 1) ^ (value >> 63)


def unzigzag(value: int) -> int:
    return (value >> 1) ^ -(value & 1)


def solid_shares(sizes: list[int], stored_size: int) -> list[int]:
    """Informative per-member shares of a solid block's stored bytes (not recorded in 1.1):
    proportional to the members' sizes, integer, summing to ``stored_size``."""
    total = sum(sizes)
    if total == 0:
        return [stored_size] + [0] * (len(sizes) - 1)
    shares, acc, prev = [], 0, 0
    for s in sizes:
        acc += s
        cut = stored_size * acc // total
        shares.append(cut - prev)
        prev = cut
    return shares


# ---------------------------------------------------------------- encode


def encode_table(entries: list[EntryRecord], level: int = TABLE_LEVEL) -> bytes:
    """The value of extension 0x8001 for ``entries`` (in table order).

    Raises ValueError for entries the compact form cannot express (stored ranges that do
    not tile the data area in table order): writers only make tiling archives."""
    raw = encode_body(entries)
    if level:
        packed = zstandard.ZstdCompressor(level=level, write_content_size=False).compress(raw)
        return bytes((TABLE_ZSTD,)) + struct.pack("<I", len(raw)) + packed
    return bytes((TABLE_PLAIN,)) + struct.pack("<I", len(raw)) + raw


def encode_body(entries: list[EntryRecord], *, data_start: int = HEADER_SIZE,
                small: bool = False) -> bytes:
    """The table body (entry_count and records). ``small`` (format 3.0, whose data area
    starts at ``data_start`` = 12): a 16-byte digest is written with FLAG_DIGEST128,
    which a 1.1 table cannot carry."""
    body = bytearray()
    put_varint(body, len(entries))
    prev_name = b""
    prev_mtime = 0
    pos = data_start
    block: tuple[int, int, int] | None = None  # (offset, size, crc) of the open solid block
    for e in entries:
        name = e.name.encode("utf-8")
        keep = 0
        limit = min(len(name), len(prev_name))
        while keep < limit and name[keep] == prev_name[keep]:
            keep += 1
        put_varint(body, keep)
        put_varint(body, len(name) - keep)
        body += name[keep:]
        prev_name = name
        flags = 0
        solid = block_position(e) is not None
        if solid and e.codec_id == BLOCK_LLM and not small:
            raise ValueError(f"entry {e.name!r}: an LLM solid block needs format 3.0")
        if solid:
            here = (e.stored_offset, e.stored_size, e.crc32)
            if block is not None and here == block and e.stored_size:
                flags |= FLAG_SOLID_NEXT
            else:
                flags |= FLAG_SOLID_FIRST
                block = here
        elif e.type == TYPE_FILE:
            block = None
        if e.type == TYPE_FILE and not e.sha256:
            if e.data_crc32 is None:
                raise ValueError(f"entry {e.name!r} has neither a SHA-256 nor a CRC-32")
            flags |= FLAG_CRC32
        elif e.type == TYPE_FILE and len(e.sha256) == DIGEST128_BYTES:
            if not small:
                raise ValueError(f"entry {e.name!r}: a 16-byte digest needs format 3.0")
            flags |= FLAG_DIGEST128
        elif e.type == TYPE_FILE and len(e.sha256) != 32:
            raise ValueError(f"entry {e.name!r}: a digest of {len(e.sha256)} bytes")
        body += bytes((e.type, flags))
        put_varint(body, e.mode)
        put_varint(body, zigzag(wrap_i64(e.mtime_ns - prev_mtime)))
        prev_mtime = e.mtime_ns
        put_varint(body, e.size)
        if e.type == TYPE_FILE:
            put_varint(body, e.codec_id)
            params = e.codec_params
            if solid:  # an llm block's first record carries the llm params (§12.6)
                llm_first = e.codec_id == BLOCK_LLM and not flags & FLAG_SOLID_NEXT
                params = params[:LLM_PARAMS_BYTES] if llm_first else b""
            put_varint(body, len(params))
            body += params
            if not flags & FLAG_SOLID_NEXT:
                if e.stored_offset != pos and e.stored_size:
                    raise ValueError("stored ranges do not tile the data area in table order")
                put_varint(body, e.stored_size)
                body += struct.pack("<I", e.crc32)
                pos += e.stored_size
            body += struct.pack("<I", e.data_crc32) if flags & FLAG_CRC32 else e.sha256
        ext = encode_ext_area(e.extensions)
        put_varint(body, len(ext))
        body += ext
    return bytes(body)


# ---------------------------------------------------------------- decode


def _inflate(payload: bytes, size: int) -> Iterator[bytes]:
    """The body from one zstd frame that must fill ``payload`` and decode to exactly
    ``size`` bytes, in pieces of at most _TABLE_FEED x 32,768 bytes (a zstd block of 4
    bytes yields at most 128 KiB), never beyond ``size`` whatever the frame says.

    The checks are an entry frame's (spec/format.md §6.1, :func:`zstd_codec.decode`): a
    zstd frame header (a skippable frame in front is not one zstd frame), a window
    within 128 MiB, a declared content size equal to ``size``, and nothing after the
    frame (a second frame, a skippable one). The body is parsed as it decodes
    (:class:`_Body`), so 8 KB of frame declaring 256 MiB of zeros fails after a few
    MiB, not once 256 MiB (and a copy) are held."""
    try:
        pieces = (payload[i:i + _TABLE_FEED] for i in range(0, len(payload), _TABLE_FEED))
        yield from zstd_codec.decode(pieces, size)
    except CorruptArchiveError as exc:
        raise CorruptArchiveError(f"compact entry table: {exc}") from None


class _Body:
    """Bounds-checked reads over the decoded table, pulled piece by piece from its
    source: at most one piece and a record's tail are held, never the whole body."""

    __slots__ = ("_dropped", "_source", "data", "entry", "pos")

    def __init__(self, source: Iterator[bytes]) -> None:
        self._source = source
        self.data = b""
        self.pos = 0
        self._dropped = 0  # body bytes before ``data``
        self.entry = -1  # the record being read, for error messages

    def _where(self, what: str) -> str:
        return what if self.entry < 0 else f"entry {self.entry} {what}"

    def tell(self) -> int:
        """Body bytes read so far."""
        return self._dropped + self.pos

    def _fill(self, n: int) -> bool:
        """At least ``n`` unread bytes in ``data`` if the body has them (False if not)."""
        while len(self.data) - self.pos < n:
            piece = next(self._source, None)
            if piece is None:
                return False
            self._dropped += self.pos
            self.data = self.data[self.pos:] + piece
            self.pos = 0
        return True

    def at_end(self) -> bool:
        """Whether the whole body has been read (draining its source, whose own checks,
        e.g. the frame's end, run then)."""
        return not self._fill(1)

    def varint(self, what: str) -> int:
        data, pos = self.data, self.pos
        if pos < len(data) and data[pos] < 0x80:  # the common one-byte case, fast
            self.pos = pos + 1
            return data[pos]
        self._fill(10)  # a varint has at most 10 bytes
        data, pos = self.data, self.pos
        value = shift = 0
        while True:
            if pos >= len(data):
                raise CorruptArchiveError(
                    f"compact entry table is truncated in {self._where(what)}")
            b = data[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift >= 70:
                raise CorruptArchiveError(
                    f"compact entry table: {self._where(what)} varint is too long")
        if value >= 1 << 64 or (b == 0 and shift):
            raise CorruptArchiveError(f"compact entry table: {self._where(what)} is not a "
                                      "minimal varint below 2^64")
        self.pos = pos
        return value

    def take(self, n: int, what: str) -> bytes:
        if self.pos + n > len(self.data) and not self._fill(n):
            raise CorruptArchiveError(f"compact entry table is truncated in {self._where(what)}")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b


def decode_table(value: bytes, data_end: int | None = None) -> list[EntryRecord]:
    """Entries from the value of extension 0x8001. ``data_end`` (the index offset), when
    known, lets stored sizes be checked as they are read."""
    if len(value) < 5:
        raise CorruptArchiveError("compact entry table header is truncated")
    encoding = value[0]
    size = struct.unpack_from("<I", value, 1)[0]
    if size > MAX_INDEX_SIZE:
        raise CorruptArchiveError(f"compact entry table of {size} bytes is over the limit")
    if encoding == TABLE_PLAIN:
        body = value[5:]
        if len(body) != size:
            raise CorruptArchiveError("compact entry table size does not match its header")
        source: Iterator[bytes] = iter((body,))
    elif encoding == TABLE_ZSTD:
        source = _inflate(value[5:], size)
    else:
        raise UnsupportedFeatureError(f"compact entry table uses unknown encoding {encoding}")
    return _parse(_Body(source), size, data_end)


def parse_body(cur: _Body, size: int, data_end: int | None, *,
               data_start: int = HEADER_SIZE, small: bool = False,
               llm_blocks: bool = False) -> list[EntryRecord]:
    """The records of a table body read through ``cur`` (whose ``tell()`` counts from
    the start of a body of ``size`` bytes), data placed from ``data_start``. ``small``:
    format 3.0's table, where flag bit 3 (DIGEST128) is defined; a 1.1 table keeps it
    reserved (*corrupt*), so every 1.1 archive reads exactly as before. ``llm_blocks``:
    the archive declares LLM solid blocks (EXT_LLM_BLOCKS, §12.6), so a solid flag may
    go with codec 2."""
    return _parse(cur, size, data_end, data_start, small, llm_blocks)


def _parse(cur: _Body, size: int, data_end: int | None, data_start: int = HEADER_SIZE,
           small: bool = False, llm_blocks: bool = False) -> list[EntryRecord]:
    known = FLAG_CRC32 | FLAG_SOLID_FIRST | FLAG_SOLID_NEXT | (FLAG_DIGEST128 if small else 0)
    count = cur.varint("entry count")
    if count > MAX_ENTRIES:
        raise CorruptArchiveError(f"{count} entries, over the limit of {MAX_ENTRIES}")
    if count * MIN_RECORD > size - cur.tell():  # the body must be ``size`` bytes
        raise CorruptArchiveError("entry count is larger than the entry table can hold")
    entries: list[EntryRecord] = []
    prev_name = b""
    mtime = 0
    pos = data_start
    block: list[int] = []  # indexes of the open solid block's members
    block_store: tuple[int, int, int] = (0, 0, 0)
    block_head = (BLOCK_ZSTD, b"")  # the open block's codec and its first record's params
    solid_codecs = (BLOCK_ZSTD, BLOCK_LLM) if llm_blocks else (BLOCK_ZSTD,)
    name_total = 0

    def close_block() -> None:
        if not block:
            return
        off, ssize, crc = block_store
        shares = solid_shares([entries[j].size for j in block], ssize)
        skip = 0
        for j, share in zip(block, shares, strict=True):
            e = entries[j]
            entries[j] = EntryRecord(e.name, e.type, e.mode, e.mtime_ns, e.size, e.codec_id,
                                     block_head[1] + struct.pack("<QQ", skip, share), off,
                                     ssize, e.sha256, crc, e.extensions, e.data_crc32)
            skip += e.size
        block.clear()

    for i in range(count):
        cur.entry = i
        keep = cur.varint("name")
        add = cur.varint("name")
        if keep > len(prev_name) or keep + add > MAX_NAME_BYTES or keep + add == 0:
            raise CorruptArchiveError(f"entry {i} has an invalid name length")
        name_total += keep + add
        if name_total > MAX_NAME_TOTAL:
            raise CorruptArchiveError(f"the names add up to more than {MAX_NAME_TOTAL} bytes")
        raw = prev_name[:keep] + cur.take(add, "name")
        prev_name = raw
        try:
            name = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptArchiveError(f"entry {i} name is not valid UTF-8") from None
        etype, flags = cur.take(2, "type")
        mode = cur.varint("mode")
        mtime = wrap_i64(mtime + unzigzag(cur.varint("mtime")))
        size = cur.varint("size")
        if flags & ~known:
            raise CorruptArchiveError(f"entry {name!r} has reserved flag bits set")
        check_entry_fields(name, etype, mode, size)
        if etype == TYPE_DIR:
            if flags or size:
                raise CorruptArchiveError(f"directory entry {name!r} carries file data")
            exts = _ext(cur, name)
            entries.append(EntryRecord(name, TYPE_DIR, mode, mtime, 0, 0, b"", 0, 0,
                                       EMPTY_SHA256, 0, exts))
            continue
        codec = cur.varint("codec")
        plen = cur.varint("params length")
        if plen > MAX_PARAMS_BYTES:
            raise CorruptArchiveError(f"entry {name!r} codec params are over the limit")
        params = cur.take(plen, "codec params")
        first, nxt = bool(flags & FLAG_SOLID_FIRST), bool(flags & FLAG_SOLID_NEXT)
        if (first or nxt) and (codec not in solid_codecs or (first and nxt) or len(params)
                               != (LLM_PARAMS_BYTES if first and codec == BLOCK_LLM else 0)):
            raise CorruptArchiveError(f"entry {name!r} has inconsistent solid block flags")
        if nxt:
            if not block:
                raise CorruptArchiveError(f"entry {name!r} continues a solid block that was "
                                          "never started")
            if codec != block_head[0]:
                raise CorruptArchiveError(f"entry {name!r} continues a solid block of "
                                          "another codec")
            off, ssize, crc = block_store
        else:
            close_block()
            ssize = cur.varint("stored size")
            (crc,) = struct.unpack("<I", cur.take(4, "stored CRC"))
            if ssize > MAX_SIZE or (data_end is not None and pos + ssize > data_end):
                raise CorruptArchiveError(f"member {name!r} has its data outside the archive")
            off = pos
            pos += ssize
            if first:
                block_store, block_head = (off, ssize, crc), (codec, params)
        if flags & FLAG_CRC32 and flags & FLAG_DIGEST128:
            raise CorruptArchiveError(f"entry {name!r} has both CRC32 and DIGEST128 set")
        if flags & FLAG_CRC32:
            (dcrc,) = struct.unpack("<I", cur.take(4, "CRC-32"))
            sha, data_crc = b"", dcrc
        elif flags & FLAG_DIGEST128:
            sha, data_crc = cur.take(DIGEST128_BYTES, "digest"), None
        else:
            sha, data_crc = cur.take(32, "SHA-256"), None
        exts = _ext(cur, name)
        if first or nxt:
            block.append(len(entries))
            params = b""  # close_block sets the members' params
        elif codec == BLOCK_LLM and llm_blocks and len(params) != LLM_PARAMS_BYTES:
            # checked at open (§12.6): 18 bytes is an llm block member's form in memory
            raise CorruptArchiveError(f"entry {name!r} has llm params of {len(params)} bytes")
        entries.append(EntryRecord(name, TYPE_FILE, mode, mtime, size, codec, params, off,
                                   ssize, sha, crc, exts, data_crc))
    close_block()
    if not cur.at_end():
        raise CorruptArchiveError("compact entry table has trailing bytes")
    return entries


def _ext(cur: _Body, name: str):
    if cur.pos < len(cur.data) and cur.data[cur.pos] == 0:  # no extensions: the usual case
        cur.pos += 1
        return ()
    n = cur.varint(f"entry {name!r} extension length")
    if n > MAX_ENTRY_EXT_BYTES:
        raise CorruptArchiveError(f"entry {name!r} extension area of {n} bytes is over the "
                                  "limit")
    return decode_ext_area(cur.take(n, f"entry {name!r} extension area"), f"entry {name!r}")
