"""The .llma byte layout (spec/format.md): encode and bounds-checked decode.

Everything here is pure: bytes in, records out (or the reverse). Decoding never trusts a
length or count before checking it against the bytes actually present and the format's
limits, so a hostile index cannot make us allocate or loop more than its own size allows.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from dataclasses import dataclass, field

from ..errors import CorruptArchiveError, UnsupportedFeatureError
from .json_safe import canonical_json as _canonical_json
from .json_safe import parse_profile_json

MAGIC = b"\x89LLMA\r\n\x1a"
FOOTER_MAGIC = b"LMAF"
VERSION_MAJOR = 1
#: 1.1 writes the entry table compactly (spec/format.md §4.2); 1.0 archives stay readable.
VERSION_MINOR = 1

HEADER_SIZE = 32
FOOTER_SIZE = 40

TYPE_FILE = 0
TYPE_DIR = 1
TYPE_SYMLINK = 2  # reserved: never written by 1.x writers, rejected by readers
TYPE_NAMES = {TYPE_FILE: "file", TYPE_DIR: "dir"}

EXT_CRITICAL = 0x8000
#: Archive extension holding the compact entry table (format 1.1, spec/format.md §4.2).
EXT_COMPACT_ENTRIES = 0x8001
#: Compact entry table encodings.
TABLE_PLAIN = 0
TABLE_ZSTD = 1
#: Compact entry record flags.
FLAG_CRC32 = 0x01  # the digest is a CRC-32 of the original bytes, not a SHA-256
FLAG_SOLID_FIRST = 0x02  # starts a solid zstd block
FLAG_SOLID_NEXT = 0x04  # continues the solid block of the previous file record
_KNOWN_FLAGS = FLAG_CRC32 | FLAG_SOLID_FIRST | FLAG_SOLID_NEXT

# Limits (spec/format.md, "Limits"). Readers reject anything beyond them.
MAX_NAME_BYTES = 4096
MAX_COMPONENT_BYTES = 255
MAX_ENTRIES = 1_000_000
MAX_INDEX_SIZE = 256 * 1024 * 1024
MAX_MODELS = 255
MAX_CREATOR_BYTES = 255
MAX_MODEL_NAME_BYTES = 255
MAX_PROFILE_BYTES = 65536
MAX_PARAMS_BYTES = 65536
MAX_ENTRY_EXT_BYTES = 65536
#: 1 MiB in format 1.0; from 1.1 the area also holds the compact entry table, so only the
#: index limit applies.
MAX_ARCHIVE_EXT_BYTES = 256 * 1024 * 1024
MAX_U64 = 2**64 - 1
MAX_SIZE = 2**63 - 1

EMPTY_SHA256 = hashlib.sha256(b"").digest()

_HEADER = struct.Struct("<8sHHI12sI")  # magic, major, minor, flags, reserved, crc
_FOOTER = struct.Struct("<QQQII4sI")  # index_off, index_size, archive_size, index_crc,
#                                       flags, magic, footer_crc
_ENTRY_FIXED = struct.Struct("<BBHqQH")  # type, flags, mode, mtime_ns, size, codec_id
_ENTRY_TAIL = struct.Struct("<QQ32sI")  # stored_offset, stored_size, sha256, crc32

assert _HEADER.size == HEADER_SIZE and _FOOTER.size == FOOTER_SIZE


def crc32(data: bytes, value: int = 0) -> int:
    return zlib.crc32(data, value) & 0xFFFFFFFF


@dataclass(frozen=True)
class Extension:
    """One TLV record of an extension area."""

    tag: int
    value: bytes

    @property
    def critical(self) -> bool:
        return bool(self.tag & EXT_CRITICAL)


@dataclass(frozen=True)
class ModelRecord:
    fingerprint: bytes  # 32 bytes
    name: str
    profile: str  # canonical JSON text (object)

    @property
    def profile_dict(self) -> dict:
        return parse_profile_json(self.profile)


@dataclass(frozen=True, slots=True)
class EntryRecord:
    name: str
    type: int
    mode: int
    mtime_ns: int
    size: int
    codec_id: int
    codec_params: bytes
    stored_offset: int
    stored_size: int
    sha256: bytes
    crc32: int
    extensions: tuple[Extension, ...] = ()
    #: CRC-32 of the original bytes, for members whose sha256 is b"" (format 1.1 solid
    #: block members: 32 incompressible bytes per tiny file would dominate the index).
    data_crc32: int | None = None


@dataclass
class Index:
    creator: str
    models: list[ModelRecord] = field(default_factory=list)
    entries: list[EntryRecord] = field(default_factory=list)
    extensions: tuple[Extension, ...] = ()


@dataclass(frozen=True)
class Header:
    major: int
    minor: int


@dataclass(frozen=True)
class Footer:
    index_offset: int
    index_size: int
    archive_size: int
    index_crc32: int


def canonical_json(obj: object) -> str:
    """The one canonical JSON text for ``obj`` (json_safe.canonical_json)."""
    return _canonical_json(obj)


# ---------------------------------------------------------------- header / footer


def encode_header(major: int = VERSION_MAJOR, minor: int = VERSION_MINOR) -> bytes:
    body = _HEADER.pack(MAGIC, major, minor, 0, b"\0" * 12, 0)[:-4]
    return body + struct.pack("<I", crc32(body))


def decode_header(data: bytes) -> Header:
    if len(data) < HEADER_SIZE:
        raise CorruptArchiveError("not an llmarc archive (file too short)")
    magic, major, minor, flags, reserved, crc = _HEADER.unpack(data[:HEADER_SIZE])
    if magic != MAGIC:
        raise CorruptArchiveError("not an llmarc archive (bad magic)")
    if major > VERSION_MAJOR:
        raise UnsupportedFeatureError(
            f"archive format version {major}.{minor} is newer than this reader "
            f"(supports {VERSION_MAJOR}.x)")
    if major < 1:
        raise CorruptArchiveError(f"invalid format version {major}.{minor}")
    if crc32(data[:HEADER_SIZE - 4]) != crc:
        raise CorruptArchiveError("header checksum mismatch")
    if flags != 0 or reserved != b"\0" * 12:
        raise CorruptArchiveError("header has reserved bits set")
    return Header(major, minor)


def encode_footer(index_offset: int, index_size: int, index_crc: int) -> bytes:
    archive_size = index_offset + index_size + FOOTER_SIZE
    body = _FOOTER.pack(index_offset, index_size, archive_size, index_crc, 0, FOOTER_MAGIC,
                        0)[:-4]
    return body + struct.pack("<I", crc32(body))


def decode_footer(data: bytes, file_size: int) -> Footer:
    if len(data) != FOOTER_SIZE:
        raise CorruptArchiveError("archive is truncated (no footer)")
    off, size, archive_size, icrc, flags, magic, fcrc = _FOOTER.unpack(data)
    if magic != FOOTER_MAGIC:
        raise CorruptArchiveError("archive is truncated or damaged (bad footer magic)")
    if crc32(data[:-4]) != fcrc:
        raise CorruptArchiveError("footer checksum mismatch")
    if flags != 0:
        raise CorruptArchiveError("footer has reserved bits set")
    if archive_size != file_size:
        raise CorruptArchiveError(
            f"archive size is {file_size} bytes but the footer records {archive_size}")
    if size > MAX_INDEX_SIZE:
        raise CorruptArchiveError(f"index size {size} exceeds the limit {MAX_INDEX_SIZE}")
    if off < HEADER_SIZE or off + size + FOOTER_SIZE != file_size:
        raise CorruptArchiveError("footer index offset/size are inconsistent with the file")
    return Footer(off, size, archive_size, icrc)


# ---------------------------------------------------------------- index


def encode_ext_area(exts: tuple[Extension, ...]) -> bytes:
    return b"".join(struct.pack("<HI", e.tag, len(e.value)) + e.value for e in exts)


_encode_ext = encode_ext_area


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
        from .compact import encode_table
        exts = (Extension(EXT_COMPACT_ENTRIES, encode_table(index.entries)), *exts)
    ext = _encode_ext(exts)
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
        if not e.sha256:
            raise ValueError(f"entry {e.name!r}: the 1.0 layout needs a SHA-256")
        name = e.name.encode("utf-8")
        out += struct.pack("<H", len(name)) + name
        out += _ENTRY_FIXED.pack(e.type, 0, e.mode, e.mtime_ns, e.size, e.codec_id)
        out += struct.pack("<I", len(e.codec_params)) + e.codec_params
        out += _ENTRY_TAIL.pack(e.stored_offset, e.stored_size, e.sha256, e.crc32)
        ext = _encode_ext(e.extensions)
        out += struct.pack("<I", len(ext)) + ext
    return bytes(out)


class _Cursor:
    """Bounds-checked little-endian reads from an in-memory index."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def take(self, n: int, what: str) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CorruptArchiveError(f"index is truncated while reading {what}")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def unpack(self, st: struct.Struct, what: str) -> tuple:
        return st.unpack(self.take(st.size, what))

    def u16(self, what: str) -> int:
        return struct.unpack("<H", self.take(2, what))[0]

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.take(4, what))[0]

    def text(self, n: int, limit: int, what: str) -> str:
        if n > limit:
            raise CorruptArchiveError(f"{what} is {n} bytes, over the limit of {limit}")
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptArchiveError(f"{what} is not valid UTF-8") from None


def decode_ext_area(raw: bytes, where: str,
                    known: frozenset[int] = frozenset()) -> tuple[Extension, ...]:
    """The TLV records filling ``raw`` exactly. Critical tags not in ``known`` are
    *unsupported*; the caller handles the known ones."""
    sub = _Cursor(raw)
    exts = []
    seen: set[int] = set()
    while sub.pos < len(sub.data):
        tag = sub.u16(f"{where} extension tag")
        length = sub.u32(f"{where} extension length")
        value = sub.take(length, f"{where} extension value")
        if tag in seen:
            raise CorruptArchiveError(f"{where} extension tag 0x{tag:04x} appears twice")
        seen.add(tag)
        if tag & EXT_CRITICAL and tag not in known:
            raise UnsupportedFeatureError(
                f"{where} uses critical extension 0x{tag:04x}, which this reader does not "
                "understand")
        exts.append(Extension(tag, value))
    return tuple(exts)


def _decode_ext(cur: _Cursor, limit: int, where: str,
                known: frozenset[int] = frozenset()) -> tuple[Extension, ...]:
    n = cur.u32(f"{where} extension length")
    if n > limit:
        raise CorruptArchiveError(f"{where} extension area of {n} bytes is over the limit")
    return decode_ext_area(cur.take(n, f"{where} extension area"), where, known)


def decode_index(data: bytes, data_end: int | None = None) -> Index:
    """Parse index bytes (either layout). ``data_end``: the index offset, if known."""
    cur = _Cursor(data)
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
        from .compact import decode_table
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
        if mode & ~0o777:
            raise CorruptArchiveError(f"entry {name!r} has mode bits outside 0o777")
        if size > MAX_SIZE or ssize > MAX_SIZE:
            raise CorruptArchiveError(f"entry {name!r} declares an impossible size")
        if etype == TYPE_SYMLINK:
            raise UnsupportedFeatureError(f"entry {name!r} is a symbolic link, which this "
                                          "reader does not support")
        if etype not in TYPE_NAMES:
            raise UnsupportedFeatureError(f"entry {name!r} has unknown type {etype}")
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


def disassemble(archive: bytes) -> tuple[bytes, Index]:
    """The data area and decoded index of a whole (valid) archive: the inverse of
    :func:`assemble`, for tests and vector scripts that rewrite an archive."""
    footer = decode_footer(archive[-FOOTER_SIZE:], len(archive))
    index = decode_index(archive[footer.index_offset : footer.index_offset + footer.index_size],
                         footer.index_offset)
    return archive[HEADER_SIZE : footer.index_offset], index
