"""The .llma byte layout's parts (spec/format.md): header, footer, records, extension
areas — encode and bounds-checked decode.  The index as a whole, which may hold the
compact entry table, is :mod:`llmarc.container.index` (above this module and
:mod:`~llmarc.container.compact`, which both build on these records).

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
#: Format 3.0 (spec/format.md §12): the small layout, a 12-byte header and an 8-byte
#: trailer around the data and a varint index. Its own major version because a 1.x reader
#: must refuse it as *unsupported* (by the version in bytes 8..11), never misread it.
#: Major 2 is reserved: format 1's vectors use 2.0 as "a version newer than the reader"
#: (unsupported/major2.llma), and that result must not change.
SMALL_MAJOR = 3
SMALL_MINOR = 0
RESERVED_MAJOR = 2
#: The newest major version this reader reads.
READ_MAJOR = SMALL_MAJOR

HEADER_SIZE = 32
FOOTER_SIZE = 40
SMALL_HEADER_SIZE = 12
TRAILER_SIZE = 8

TYPE_FILE = 0
TYPE_DIR = 1
TYPE_SYMLINK = 2  # reserved: never written by 1.x writers, rejected by readers
TYPE_NAMES = {TYPE_FILE: "file", TYPE_DIR: "dir"}

EXT_CRITICAL = 0x8000
#: Archive extension holding the compact entry table (format 1.1, spec/format.md §4.2).
EXT_COMPACT_ENTRIES = 0x8001
#: Archive extension of format 3.0 declaring LLM solid blocks (spec/format.md §12.6):
#: empty, critical, so a reader without §12.6 refuses the archive instead of calling it
#: corrupt. The writer adds it from the entries; readers drop it from ``extensions``.
EXT_LLM_BLOCKS = 0x8002
#: Codec ids a solid block may have: zstd (§6.2) and, with EXT_LLM_BLOCKS, llm (§12.6).
BLOCK_ZSTD, BLOCK_LLM = 1, 2
#: An llm block member's params in memory: the llm params (the model index, recorded on
#: the block's first record), then (skip, share) as a zstd member's 16 bytes.
LLM_PARAMS_BYTES = 2
#: Compact entry table encodings.
TABLE_PLAIN = 0
TABLE_ZSTD = 1
#: Compact entry record flags.
FLAG_CRC32 = 0x01  # the digest is a CRC-32 of the original bytes, not a SHA-256
FLAG_SOLID_FIRST = 0x02  # starts a solid block (zstd; llm with EXT_LLM_BLOCKS)
FLAG_SOLID_NEXT = 0x04  # continues the solid block of the previous file record
#: Format 3.0 only: the digest is the first 16 bytes of the SHA-256 (spec/format.md §12.4).
FLAG_DIGEST128 = 0x08
#: A DIGEST128 record's digest: the first 16 bytes of the SHA-256 (format 3.0).
DIGEST128_BYTES = 16
#: Bytes of the fingerprint a format 3.0 form-1 model record keeps (its first half).
SHORT_FINGERPRINT = 16
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
#: Most segments per chain of context carry (spec/llm-codec.md §2.2, §3.4): it bounds the
#: model steps a decoder must run one after another.
MAX_CHAIN = 256
#: 1 MiB in format 1.0; from 1.1 the area also holds the compact entry table, so only the
#: index limit applies.
MAX_ARCHIVE_EXT_BYTES = 256 * 1024 * 1024
MAX_U64 = 2**64 - 1
MAX_SIZE = 2**63 - 1

EMPTY_SHA256 = hashlib.sha256(b"").digest()

_HEADER = struct.Struct("<8sHHI12sI")  # magic, major, minor, flags, reserved, crc
_FOOTER = struct.Struct("<QQQII4sI")  # index_off, index_size, archive_size, index_crc,
#                                       flags, magic, footer_crc

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
    fingerprint: bytes  # 32 bytes; 16 (its first half) from a format 3.0 short record
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


def block_position(e: EntryRecord, llm_blocks: bool = True) -> tuple[int, int] | None:
    """(skip, share) of a solid block member, None for any other entry: a zstd member
    has 16-byte params (§6.2), an llm member (only where ``llm_blocks``: a 3.0 archive
    with EXT_LLM_BLOCKS, §12.6) the llm params and then the same 16 bytes."""
    if e.type != TYPE_FILE:
        return None
    if e.codec_id == BLOCK_ZSTD and len(e.codec_params) == 16:
        return struct.unpack("<QQ", e.codec_params)
    if llm_blocks and e.codec_id == BLOCK_LLM and len(e.codec_params) == LLM_PARAMS_BYTES + 16:
        return struct.unpack("<QQ", e.codec_params[LLM_PARAMS_BYTES:])
    return None


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


def encode_small_header(minor: int = SMALL_MINOR) -> bytes:
    """Format 3.0's header: the magic and the version, nothing else (spec/format.md §12.1)."""
    return MAGIC + struct.pack("<HH", SMALL_MAJOR, minor)


def decode_header(data: bytes) -> Header:
    """The header's checks in the spec's order (format.md §2, §12.1). ``data``: the
    file's first 32 bytes, or all of it if shorter (a 3.0 archive may be 25 bytes)."""
    if len(data) < SMALL_HEADER_SIZE:
        raise CorruptArchiveError("not an llmarc archive (file too short)")
    if data[:8] != MAGIC:
        raise CorruptArchiveError("not an llmarc archive (bad magic)")
    major, minor = struct.unpack_from("<HH", data, 8)
    if major > READ_MAJOR or major == RESERVED_MAJOR:
        raise UnsupportedFeatureError(
            f"archive format version {major}.{minor} is not supported by this reader "
            f"(it reads 1.x and 3.x)")
    if major < 1:
        raise CorruptArchiveError(f"invalid format version {major}.{minor}")
    if major == SMALL_MAJOR:
        return Header(major, minor)
    if len(data) < HEADER_SIZE:
        raise CorruptArchiveError("not an llmarc archive (file too short)")
    _magic, major, minor, flags, reserved, crc = _HEADER.unpack(data[:HEADER_SIZE])
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


def encode_trailer(index: bytes, minor: int = SMALL_MINOR) -> bytes:
    """Format 3.0's trailer: u32 index_size, u32 CRC-32 of the header then the index
    (§12.2; the header has no CRC of its own, and a flipped minor version would
    otherwise still read)."""
    return struct.pack("<II", len(index), small_index_crc(encode_small_header(minor), index))


def small_index_crc(header: bytes, index: bytes) -> int:
    """The trailer's CRC: over the 12 header bytes, then the index bytes."""
    return crc32(index, crc32(header[:SMALL_HEADER_SIZE]))


def decode_trailer(data: bytes, file_size: int) -> Footer:
    """Where a 3.0 archive's index is, checked against the file (§12.2); the CRC is
    checked by the caller once the index is read. Every byte of the file is thus
    either the header, a stored range (the table tiles the data area), the index or
    this trailer."""
    if file_size < SMALL_HEADER_SIZE + TRAILER_SIZE or len(data) != TRAILER_SIZE:
        raise CorruptArchiveError("archive is truncated (no trailer)")
    size, icrc = struct.unpack("<II", data)
    if size > MAX_INDEX_SIZE:
        raise CorruptArchiveError(f"index size {size} exceeds the limit {MAX_INDEX_SIZE}")
    off = file_size - TRAILER_SIZE - size
    if off < SMALL_HEADER_SIZE:
        raise CorruptArchiveError("trailer index size is larger than the file")
    return Footer(off, size, file_size, icrc)


# ---------------------------------------------------------------- index


def digest_matches(digest: bytes, stored: bytes) -> bool:
    """Whether a member's computed SHA-256 ``digest`` is the one its record stores: all
    32 bytes, or a format 3.0 DIGEST128 record's first 16."""
    return len(stored) in (DIGEST128_BYTES, len(digest)) and digest[:len(stored)] == stored


def check_entry_fields(name: str, etype: int, mode: int, *sizes: int) -> None:
    """The checks every entry layout makes of its type, mode and sizes (§4.1, §4.2), in
    one order: mode bits, sizes, a symbolic link, an unknown type."""
    if mode & ~0o777:
        raise CorruptArchiveError(f"entry {name!r} has mode bits outside 0o777")
    if any(size > MAX_SIZE for size in sizes):
        raise CorruptArchiveError(f"entry {name!r} declares an impossible size")
    if etype == TYPE_SYMLINK:
        raise UnsupportedFeatureError(f"entry {name!r} is a symbolic link, which this "
                                      "reader does not support")
    if etype not in TYPE_NAMES:
        raise UnsupportedFeatureError(f"entry {name!r} has unknown type {etype}")


def encode_ext_area(exts: tuple[Extension, ...]) -> bytes:
    return b"".join(struct.pack("<HI", e.tag, len(e.value)) + e.value for e in exts)


class Cursor:
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
    sub = Cursor(raw)
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
