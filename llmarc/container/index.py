"""The .llma index as a whole (spec/format.md §4): the 1.0 layout, or format 1.1's with
the compact entry table (§4.2) in archive extension 0x8001; and whole archives
assembled from, or taken apart into, a data area and an index (tests and vectors).

Its own module so that data flows one way: :mod:`~llmarc.container.layout` (records,
header, footer) ← :mod:`~llmarc.container.compact` (the compact table) ← this.
"""

from __future__ import annotations

import struct

from ..errors import CorruptArchiveError
from .compact import decode_table, encode_table
from .json_safe import parse_profile_json
from .layout import (
    EMPTY_SHA256,
    EXT_COMPACT_ENTRIES,
    FOOTER_SIZE,
    HEADER_SIZE,
    MAX_ARCHIVE_EXT_BYTES,
    MAX_CREATOR_BYTES,
    MAX_ENTRIES,
    MAX_ENTRY_EXT_BYTES,
    MAX_MODEL_NAME_BYTES,
    MAX_MODELS,
    MAX_NAME_BYTES,
    MAX_PARAMS_BYTES,
    MAX_PROFILE_BYTES,
    SMALL_HEADER_SIZE,
    SMALL_MAJOR,
    SMALL_MINOR,
    TRAILER_SIZE,
    TYPE_DIR,
    VERSION_MAJOR,
    Cursor,
    EntryRecord,
    Extension,
    Index,
    ModelRecord,
    check_entry_fields,
    crc32,
    decode_ext_area,
    decode_footer,
    decode_header,
    decode_trailer,
    encode_ext_area,
    encode_footer,
    encode_header,
    encode_small_header,
    encode_trailer,
)
from .small import decode_small_index, encode_small_index

_ENTRY_FIXED = struct.Struct("<BBHqQH")  # type, flags, mode, mtime_ns, size, codec_id
_ENTRY_TAIL = struct.Struct("<QQ32sI")  # stored_offset, stored_size, sha256, crc32


def encode_index(index: Index, *, compact: bool = False) -> bytes:
    """The index bytes: the 1.0 layout, or (``compact``, format 1.1) the same layout with
    no entry records and the compact entry table (§4.2) in archive extension 0x8001."""
    out = bytearray()
    creator = index.creator.encode("utf-8")
    if len(creator) > MAX_CREATOR_BYTES:
        raise ValueError("creator string too long")
    out += struct.pack("<H", len(creator)) + creator
    exts = index.extensions
    if compact:
        exts = (Extension(EXT_COMPACT_ENTRIES, encode_table(index.entries)), *exts)
    ext = encode_ext_area(exts)
    out += struct.pack("<I", len(ext)) + ext
    if len(index.models) > MAX_MODELS:
        raise ValueError("too many models")
    out += struct.pack("<H", len(index.models))
    for m in index.models:
        name = m.name.encode("utf-8")
        prof = m.profile.encode("utf-8")
        if len(m.fingerprint) != 32:
            raise ValueError("model fingerprint must be 32 bytes")
        out += m.fingerprint + struct.pack("<H", len(name)) + name
        out += struct.pack("<I", len(prof)) + prof
    if len(index.entries) > MAX_ENTRIES:
        raise ValueError("too many entries")
    out += struct.pack("<I", 0 if compact else len(index.entries))
    for e in () if compact else index.entries:
        if len(e.sha256) != 32:
            raise ValueError(f"entry {e.name!r}: the 1.0 layout needs a whole SHA-256")
        name = e.name.encode("utf-8")
        out += struct.pack("<H", len(name)) + name
        out += _ENTRY_FIXED.pack(e.type, 0, e.mode, e.mtime_ns, e.size, e.codec_id)
        out += struct.pack("<I", len(e.codec_params)) + e.codec_params
        out += _ENTRY_TAIL.pack(e.stored_offset, e.stored_size, e.sha256, e.crc32)
        ext = encode_ext_area(e.extensions)
        out += struct.pack("<I", len(ext)) + ext
    return bytes(out)


def _decode_ext(cur: Cursor, limit: int, where: str,
                known: frozenset[int] = frozenset()) -> tuple[Extension, ...]:
    n = cur.u32(f"{where} extension length")
    if n > limit:
        raise CorruptArchiveError(f"{where} extension area of {n} bytes is over the limit")
    return decode_ext_area(cur.take(n, f"{where} extension area"), where, known)


def decode_index(data: bytes, data_end: int | None = None) -> Index:
    """Parse index bytes (either layout). ``data_end``: the index offset, if known."""
    cur = Cursor(data)
    creator = cur.text(cur.u16("creator length"), MAX_CREATOR_BYTES, "creator string")
    arch_ext = _decode_ext(cur, MAX_ARCHIVE_EXT_BYTES, "archive",
                           frozenset({EXT_COMPACT_ENTRIES}))
    table = next((e.value for e in arch_ext if e.tag == EXT_COMPACT_ENTRIES), None)
    arch_ext = tuple(e for e in arch_ext if e.tag != EXT_COMPACT_ENTRIES)
    n_models = cur.u16("model count")
    if n_models > MAX_MODELS:
        raise CorruptArchiveError(f"{n_models} models, over the limit of {MAX_MODELS}")
    models = []
    for i in range(n_models):
        fp = cur.take(32, f"model {i} fingerprint")
        name = cur.text(cur.u16("model name length"), MAX_MODEL_NAME_BYTES, "model name")
        prof = cur.text(cur.u32("profile length"), MAX_PROFILE_BYTES, "numerics profile")
        parse_profile_json(prof, what=f"model {i} numerics profile")  # hostile: bounded
        models.append(ModelRecord(fp, name, prof))
    n_entries = cur.u32("entry count")
    if n_entries > MAX_ENTRIES:
        raise CorruptArchiveError(f"{n_entries} entries, over the limit of {MAX_ENTRIES}")
    if table is not None:
        if n_entries or cur.pos != len(data):
            raise CorruptArchiveError("an index with a compact entry table has entry records")
        return Index(creator, models, decode_table(table, data_end), arch_ext)
    # The smallest entry record is 2 + 22 + 4 + 52 + 4 = 84 bytes: a cheap sanity bound.
    if n_entries * 84 > len(data) - cur.pos:
        raise CorruptArchiveError("entry count is larger than the index can hold")
    entries = []
    for i in range(n_entries):
        name = cur.text(cur.u16(f"entry {i} name length"), MAX_NAME_BYTES, f"entry {i} name")
        etype, flags, mode, mtime, size, codec = cur.unpack(_ENTRY_FIXED, f"entry {i}")
        plen = cur.u32(f"entry {i} params length")
        if plen > MAX_PARAMS_BYTES:
            raise CorruptArchiveError(f"entry {i} codec params are over the limit")
        params = cur.take(plen, f"entry {i} codec params")
        off, ssize, sha, crc = cur.unpack(_ENTRY_TAIL, f"entry {i}")
        exts = _decode_ext(cur, MAX_ENTRY_EXT_BYTES, f"entry {name!r}")
        if flags != 0:
            raise CorruptArchiveError(f"entry {name!r} has reserved flag bits set")
        check_entry_fields(name, etype, mode, size, ssize)
        if etype == TYPE_DIR and (size or codec or params or ssize or off or crc
                                  or sha != EMPTY_SHA256):
            raise CorruptArchiveError(f"directory entry {name!r} carries file data")
        entries.append(EntryRecord(name, etype, mode, mtime, size, codec, params, off, ssize,
                                   sha, crc, exts))
    if cur.pos != len(data):
        raise CorruptArchiveError("index has trailing bytes")
    return Index(creator, models, entries, arch_ext)


def assemble(data: bytes, index: Index, *, major: int = VERSION_MAJOR,
             minor: int = 0, compact: bool = False) -> bytes:
    """A whole archive from its data area and index, with no validation at all (1.0
    layout unless ``compact``).

    For tests and test vectors, which need archives a real writer refuses to make."""
    raw = encode_index(index, compact=compact)
    off = HEADER_SIZE + len(data)
    return encode_header(major, minor) + data + raw + encode_footer(off, len(raw), crc32(raw))


def assemble_small(data: bytes, index: Index, *, minor: int = SMALL_MINOR,
                   ext_area: bytes | None = None) -> bytes:
    """A whole format 3.0 archive (spec/format.md §12) from its data area and index, with
    no validation (for tests and vectors); ``ext_area``: the archive extension area's
    bytes verbatim (default: as the writer makes it)."""
    raw = encode_small_index(index, ext_area=ext_area)
    return encode_small_header(minor) + data + raw + encode_trailer(raw, minor)


def disassemble(archive: bytes) -> tuple[bytes, Index]:
    """The data area and decoded index of a whole (valid) archive of either major
    version: the inverse of :func:`assemble` / :func:`assemble_small`, for tests and
    vector scripts that rewrite an archive."""
    if decode_header(archive[:HEADER_SIZE]).major == SMALL_MAJOR:
        trailer = decode_trailer(archive[-TRAILER_SIZE:], len(archive))
        off = trailer.index_offset
        index = decode_small_index(archive[off:off + trailer.index_size], off)
        return archive[SMALL_HEADER_SIZE:off], index
    footer = decode_footer(archive[-FOOTER_SIZE:], len(archive))
    index = decode_index(archive[footer.index_offset : footer.index_offset + footer.index_size],
                         footer.index_offset)
    return archive[HEADER_SIZE : footer.index_offset], index


def data_start(archive: bytes) -> int:
    """Where the data area of a whole archive begins: 32, or 12 in format 3.0."""
    small = decode_header(archive[:HEADER_SIZE]).major == SMALL_MAJOR
    return SMALL_HEADER_SIZE if small else HEADER_SIZE


def reassemble(archive: bytes, data: bytes, index: Index) -> bytes:
    """``archive`` rebuilt from a changed data area and index in its own layout (1.0,
    1.1 or 3.0; offsets as :func:`disassemble` gave them), for tests and vectors."""
    header = decode_header(archive[:HEADER_SIZE])
    if header.major == SMALL_MAJOR:
        return assemble_small(data, index, minor=header.minor)
    return assemble(data, index, major=header.major, minor=header.minor,
                    compact=header.minor >= 1)
