"""An independent decoder of .llma archives, written from spec/ alone (issue 26).

    python spec/reference/decoder.py ARCHIVE [MODEL_FOLDER_OR_GGUF] [DEST]

It imports nothing from llmarc, nor torch, transformers, tokenizers, safetensors or
sentencepiece: NumPy, zstandard and mpmath (through ``int_numpy``) and the standard
library, which is what someone holding only spec/ would have.  Every layer is here:

* the container (format.md): header, footer, index, 1.0 entry records and the 1.1
  compact table, format 3.0's layout (§12: model records of forms 0, 1, 2 and 3, compact
  records with DIGEST128, LLM solid blocks under archive tag 0x8002), extension areas,
  names, stored ranges, solid blocks, zstd frames, every CRC-32 and SHA-256, in the order
  of checks of §10;
* the LLM codec (llm-codec.md 1.6): profile, fingerprint (weights digest, token table
  read from ``tokenizer.json`` or, through a small protobuf reader, ``tokenizer.model``,
  architecture, start token), payload, escapes, context carry (§3.4: ``carry`` and
  ``chain``, segments decoded one after another), the int-v1/int-v2 engine (§5, stepped
  one position at a time with a cache; ``int_numpy`` holds the shared primitives), solid
  blocks (§3.5: one payload for several members), adaptive mixing (§3.6: ``mix``, the
  mixer's counts running along each chain, its weight restarting at every segment), and
  entropy.md 1.1's frequencies (§2), range coder for tables of any total M <= 2^36 (§3)
  and adaptive n-gram mixer (§4: ``Mixer``);
* the model's derivation (model.md): HF folders (safetensors, ``tokenizer.json`` or
  ``tokenizer.model``, ``config.json``) and GGUF files (F32/F16/BF16/Q8_0/Q4_0/Q4_1),
  fingerprints of version 2 and, for archives of llmarc 0.1, version 1.

Errors are classes of the same names as format.md §10 (own classes, not llmarc's), so a
test can compare them with spec/vectors' expected results.  lockstep-v1 (the float
engine, bound to the machine that made an archive) is not implemented: it raises
``NotImplementedByReference``, an UnsupportedFeatureError (the engine is optional,
llm-codec.md §5.9).  ``.bin`` (pickle) checkpoints are refused (model.md §2.1 allows it).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

# One position at a time, the products are matrix-vector: BLAS threads only add waiting
# (30x slower on a busy two-core machine).  Effective when this module imports NumPy first.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import numpy as np
import zstandard

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from int_numpy import (  # noqa: E402  (numpy + mpmath only; checked by the tests)
    ATTENTION_LEVELS,
    EXP2,
    LINEAR_LEVELS,
    LOG2E_SCALED,
    NORM_BITS,
    RESIDUAL_BITS,
    exp_weight,
    power_of_two,
    quantize,
    rope_tables,
)

# ----------------------------------------------------------------------------- errors


class LlmarcError(Exception):
    """format.md §10: the root of every failure class."""


class CorruptArchiveError(LlmarcError):
    pass


class ChecksumMismatchError(CorruptArchiveError):
    pass


class UnsafeArchiveError(LlmarcError):
    pass


class UnsupportedFeatureError(LlmarcError):
    pass


class ModelError(LlmarcError):
    pass


class ModelNotFoundError(ModelError):
    pass


class ModelMismatchError(ModelError):
    pass


class MemberNotFoundError(LlmarcError):
    pass


class NotImplementedByReference(UnsupportedFeatureError):
    """lockstep-v1, which llm-codec.md §5.9 makes optional: *unsupported* here."""


# ----------------------------------------------------------------------------- bytes

MAGIC = b"\x89LLMA\r\n\x1a"
FOOTER_MAGIC = b"LMAF"
HEADER_SIZE, FOOTER_SIZE = 32, 40
SMALL_HEADER, TRAILER = 12, 8  # format 3.0 (format.md §12)
MAX_INDEX = MAX_ARCH_EXT = MAX_BODY = MAX_NAMES_TOTAL = 256 << 20
MAX_ENTRIES = 1_000_000
MAX_SMALL = 65536
MAX_CHAIN = 256  # llm-codec.md §2.2 (`chain`)
MAX_POSITIONS = 65536  # §3.4 (L + C)
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
MAX_WINDOW = 128 << 20
EMPTY_SHA = hashlib.sha256(b"").digest()
TYPE_FILE, TYPE_DIR = 0, 1
FLAG_CRC32, FLAG_SOLID_FIRST, FLAG_SOLID_NEXT, FLAG_DIGEST128 = 1, 2, 4, 8
TAG_COMPACT, TAG_LLM_SOLID = 0x8001, 0x8002  # format.md §4.2 (1.1), §12.6 (3.0)


class Cursor:
    """Reads little-endian fields; running past the end is *corrupt*."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data, self.pos, self.what = data, 0, what

    def take(self, n: int) -> bytes:
        if n < 0 or self.pos + n > len(self.data):
            raise CorruptArchiveError(f"{self.what}: truncated")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def u8(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack("<H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack("<I", self.take(4))[0]

    def u64(self) -> int:
        return struct.unpack("<Q", self.take(8))[0]

    def i64(self) -> int:
        return struct.unpack("<q", self.take(8))[0]

    def varint(self) -> int:
        return read_varint(self)

    def at_end(self) -> bool:
        return self.pos == len(self.data)


def read_varint(cur: Cursor) -> int:
    """format.md §1 / llm-codec.md §3.2: LEB128, at most 10 bytes, < 2^64, minimal."""
    value = shift = 0
    for i in range(10):
        byte = cur.u8()
        value |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            if i and byte == 0:
                raise CorruptArchiveError(f"{cur.what}: varint in overlong form")
            if value >= 1 << 64:
                raise CorruptArchiveError(f"{cur.what}: varint too large")
            return value
    raise CorruptArchiveError(f"{cur.what}: varint longer than 10 bytes")


def utf8(raw: bytes, what: str) -> str:
    try:
        return raw.decode("utf-8")  # strict: surrogates (ED A0 80...) are invalid
    except UnicodeDecodeError:
        raise CorruptArchiveError(f"{what} is not valid UTF-8") from None


def crc32(data: bytes) -> int:
    return zlib.crc32(data) & 0xFFFFFFFF


# ----------------------------------------------------------------------------- JSON


def canonical_json(value: object) -> str:
    """format.md §4.1 / llm-codec.md §2.1: the one canonical form."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def parse_profile(raw: bytes) -> dict:
    """A numerics profile, parsed as hostile text (format.md §4.1)."""
    if len(raw) > MAX_SMALL:
        raise CorruptArchiveError("profile over 65,536 bytes")
    text = utf8(raw, "profile")
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:  # nesting measured before any recursive parser sees the text
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > 32:
                raise CorruptArchiveError("profile nested deeper than 32")
        elif ch in "]}":
            depth -= 1

    def constant(name: str) -> object:
        raise CorruptArchiveError(f"profile holds {name}")

    def number(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            raise CorruptArchiveError(f"profile number {literal} is not a finite binary64")
        return value

    def integer(literal: str) -> int:
        value = int(literal)
        if not -(1 << 63) <= value < 1 << 63:
            raise CorruptArchiveError(f"profile integer {literal} out of range")
        return value

    def pairs(items: list[tuple[str, object]]) -> dict:
        out: dict = {}
        for key, value in items:
            if key in out:
                raise CorruptArchiveError(f"profile key {key!r} appears twice")
            out[key] = value
        return out

    try:
        value = json.loads(text, parse_constant=constant, parse_float=number,
                           parse_int=integer, object_pairs_hook=pairs)
    except (ValueError, RecursionError) as exc:
        if isinstance(exc, CorruptArchiveError):
            raise
        raise CorruptArchiveError(f"profile is not valid JSON: {exc}") from None
    todo = [value]
    while todo:  # lone surrogates (a \ud800 escape) anywhere, keys included
        item = todo.pop()
        if isinstance(item, str):
            if any(0xD800 <= ord(c) <= 0xDFFF for c in item):
                raise CorruptArchiveError("profile holds a lone surrogate")
        elif isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
    if not isinstance(value, dict):
        raise CorruptArchiveError("profile is not a JSON object")
    if canonical_json(value) != text:
        raise CorruptArchiveError("profile is not in canonical form")
    return value


# ----------------------------------------------------------------------------- index


@dataclass
class Model:
    fingerprint: bytes
    name: str
    profile: dict


@dataclass
class Entry:
    name: str
    type: int
    mode: int
    mtime_ns: int
    size: int
    codec: int = 0
    params: bytes = b""
    offset: int = 0
    stored_size: int = 0
    digest: bytes = EMPTY_SHA  # SHA-256, or a u32 CRC-32 when crc_digest
    stored_crc: int = 0
    crc_digest: bool = False
    solid: bool = False  # a member of a solid block: zstd, or LLM (format.md §12.6)
    skip: int = 0
    block: int = -1  # a solid member's block: the index of its first member (Archive.blocks)


def read_extensions(raw: bytes, what: str, known: frozenset[int] = frozenset(),
                    ) -> dict[int, bytes]:
    """format.md §7: TLV records filling the area exactly, each checked as it is read
    (§10.1); critical tags not in ``known`` are *unsupported* (the archive area knows
    0x8001 in 1.x, 0x8002 in 3.0; an entry's area none), and 0x8002's value MUST be
    empty (§12.6)."""
    cur = Cursor(raw, what)
    found: dict[int, bytes] = {}
    while not cur.at_end():
        tag = cur.u16()
        value = cur.take(cur.u32())
        if tag in found:
            raise CorruptArchiveError(f"{what}: tag {tag:#x} twice")
        found[tag] = value
        if tag & 0x8000 and tag not in known:
            raise UnsupportedFeatureError(f"{what}: unknown critical extension {tag:#x}")
        if tag == TAG_LLM_SOLID and value:
            raise CorruptArchiveError(f"{what}: tag {tag:#x} with a value")
    return found


def read_entry_record(cur: Cursor) -> Entry:
    """format.md §5 (1.0 record), fields in record order, then the rules."""
    name_len = cur.u16()
    if not 1 <= name_len <= 4096:
        raise CorruptArchiveError(f"name length {name_len}")
    name = utf8(cur.take(name_len), "name")
    etype, flags, mode = cur.u8(), cur.u8(), cur.u16()
    mtime, size, codec = cur.i64(), cur.u64(), cur.u16()
    params_len = cur.u32()
    if params_len > MAX_SMALL:
        raise CorruptArchiveError("codec params over 65,536 bytes")
    params = cur.take(params_len)
    offset, stored_size = cur.u64(), cur.u64()
    sha, stored_crc = cur.take(32), cur.u32()
    ext_len = cur.u32()
    if ext_len > MAX_SMALL:
        raise CorruptArchiveError("entry extension area over 65,536 bytes")
    read_extensions(cur.take(ext_len), f"entry {name!r}")
    if flags:
        raise CorruptArchiveError(f"entry {name!r}: reserved flags set")
    if mode > 0o777:
        raise CorruptArchiveError(f"entry {name!r}: mode {mode:#o}")
    if size >= 1 << 63 or stored_size >= 1 << 63:
        raise CorruptArchiveError(f"entry {name!r}: size out of range")
    entry = Entry(name, etype, mode, mtime, size, codec, params, offset, stored_size, sha,
                  stored_crc)
    check_type(entry)
    if etype == TYPE_DIR and (size or codec or params or offset or stored_size or stored_crc
                              or sha != EMPTY_SHA):
        raise CorruptArchiveError(f"directory {name!r} has data")
    return entry


def check_type(entry: Entry) -> None:
    if entry.type not in (TYPE_FILE, TYPE_DIR):
        raise UnsupportedFeatureError(f"entry {entry.name!r} has type {entry.type}"
                                      + (" (symlink)" if entry.type == 2 else ""))


def read_compact(value: bytes) -> list[Entry]:
    """format.md §4.2: the compact entry table, decoded within the bytes present."""
    cur = Cursor(value, "compact table")
    encoding, body_size = cur.u8(), cur.u32()
    if encoding not in (0, 1):
        raise UnsupportedFeatureError(f"compact table encoding {encoding}")
    if body_size > MAX_BODY:
        raise CorruptArchiveError("compact table body over 256 MiB")
    payload = value[5:]
    if encoding == 0:
        if len(payload) != body_size:
            raise CorruptArchiveError("compact table body size differs")
        body = payload
    else:
        body = zstd_exact(payload, body_size, "compact table")
    cur = Cursor(body, "compact table")
    return read_compact_records(cur, small=False)


def read_compact_records(cur: Cursor, small: bool, llm_solid: bool = False) -> list[Entry]:
    """§4.2's body from ``cur`` to its end; ``small`` (format 3.0, §12.4): flag bit 3,
    DIGEST128, is defined (a 16-byte SHA-256 prefix), else reserved; ``llm_solid`` (3.0
    with archive tag 0x8002, §12.6): solid blocks of codec 2 are allowed."""
    count = cur.varint()
    if count > MAX_ENTRIES or count > (len(cur.data) - cur.pos) // 8:
        raise CorruptArchiveError(f"compact table claims {count} entries")
    entries: list[Entry] = []
    previous, mtime, names_total = b"", 0, 0
    block_codec: int | None = None  # the codec of the open solid block's first record
    for _ in range(count):
        keep = cur.varint()
        if keep > len(previous):
            raise CorruptArchiveError("compact record keeps more than the previous name")
        add_len = cur.varint()
        if not 1 <= keep + add_len <= 4096:
            raise CorruptArchiveError("compact record name length")
        raw = previous[:keep] + cur.take(add_len)
        names_total += len(raw)
        if names_total > MAX_NAMES_TOTAL:
            raise CorruptArchiveError("compact table names over 256 MiB")
        name = utf8(raw, "name")
        previous = raw
        etype, flags = cur.u8(), cur.u8()
        mode = cur.varint()
        delta = cur.varint()
        delta = (delta >> 1) ^ -(delta & 1)
        mtime = (mtime + delta + (1 << 63)) % (1 << 64) - (1 << 63)
        size = cur.varint()
        # §10.1: flags' reserved bits, mode, size, type; nothing after size is read for
        # an unknown type (its layout is unknown)
        if flags & ~(15 if small else 7):
            raise CorruptArchiveError(f"compact record {name!r}: reserved flag bits")
        if mode > 0o777:
            raise CorruptArchiveError(f"entry {name!r}: mode {mode:#o}")
        if size >= 1 << 63:
            raise CorruptArchiveError(f"entry {name!r}: size out of range")
        entry = Entry(name, etype, mode, mtime, size)
        check_type(entry)
        if etype == TYPE_FILE:
            entry.codec = cur.varint()
            params_len = cur.varint()
            if params_len > MAX_SMALL:
                raise CorruptArchiveError("codec params over 65,536 bytes")
            entry.params = cur.take(params_len)
            first, nxt = bool(flags & FLAG_SOLID_FIRST), bool(flags & FLAG_SOLID_NEXT)
            if first and nxt:
                raise CorruptArchiveError(f"record {name!r}: SOLID_FIRST and SOLID_NEXT")
            if first or nxt:
                check_solid_codec(entry, first, block_codec, llm_solid)
            elif llm_solid and entry.codec == 2 and len(entry.params) != 2:
                raise CorruptArchiveError(f"record {name!r}: llm params of "
                                          f"{len(entry.params)} bytes (§12.6: at open)")
            if nxt and block_codec is None:
                raise CorruptArchiveError(f"record {name!r} continues no solid block")
            if not nxt:
                entry.stored_size = cur.varint()
                if entry.stored_size >= 1 << 63:
                    raise CorruptArchiveError(f"entry {name!r}: stored size out of range")
                entry.stored_crc = cur.u32()
            entry.crc_digest = bool(flags & FLAG_CRC32)
            if entry.crc_digest and flags & FLAG_DIGEST128:
                raise CorruptArchiveError(f"record {name!r}: CRC32 and DIGEST128")
            entry.digest = cur.take(4 if entry.crc_digest else
                                    16 if flags & FLAG_DIGEST128 else 32)
            entry.solid = first or nxt
            block_codec = entry.codec if entry.solid else None
            if nxt:
                entry.stored_size = -1  # filled from the block's first member below
        elif flags or size:
            raise CorruptArchiveError(f"directory {name!r} with flags or a size")
        ext_len = cur.varint()
        if ext_len > MAX_SMALL:
            raise CorruptArchiveError("entry extension area over 65,536 bytes")
        read_extensions(cur.take(ext_len), f"entry {name!r}")
        entries.append(entry)
    if not cur.at_end():
        raise CorruptArchiveError("compact table has trailing bytes")
    return entries


def check_solid_codec(entry: Entry, first: bool, block_codec: int | None,
                      llm_solid: bool) -> None:
    """§4.2: a record with a solid flag has codec 1 and no params.  With tag 0x8002
    (``llm_solid``, §12.6) codec 2 too: a SOLID_FIRST of codec 2 carries the llm params
    (2 bytes), and a SOLID_NEXT has its block's codec and no params."""
    if entry.codec not in ((1, 2) if llm_solid else (1,)):
        raise CorruptArchiveError(f"solid record {entry.name!r} with codec {entry.codec}")
    if not first and block_codec is not None and entry.codec != block_codec:
        raise CorruptArchiveError(f"record {entry.name!r} of codec {entry.codec} continues "
                                  f"a block of codec {block_codec}")
    expected = 2 if first and entry.codec == 2 else 0
    if len(entry.params) != expected:
        raise CorruptArchiveError(f"solid record {entry.name!r} with {len(entry.params)} "
                                  f"bytes of params, not {expected}")


@dataclass
class Archive:
    data: bytes
    version: tuple[int, int]
    creator: str
    models: list[Model]
    entries: list[Entry]
    index_offset: int
    # a solid block's first member -> its members (entry indexes); not keyed by offset,
    # which an empty stored range shares with the next one
    blocks: dict[int, list[int]] = field(default_factory=dict)


def open_archive(data: bytes) -> Archive:
    """Every check format.md §10 makes at open, in its order."""
    if len(data) < 8 or data[:8] != MAGIC:
        raise CorruptArchiveError("bad magic")
    if len(data) < SMALL_HEADER:
        raise CorruptArchiveError("file shorter than a header")
    major, minor = struct.unpack_from("<HH", data, 8)
    if major == 2 or major > 3:  # 2 is reserved (format.md §12)
        raise UnsupportedFeatureError(f"format version {major}.{minor}")
    if major == 0:
        raise CorruptArchiveError("major version 0")
    if major == 3:
        return open_small(data, minor)
    (flags,) = struct.unpack_from("<I", data, 12)
    if len(data) < HEADER_SIZE:
        raise CorruptArchiveError("file shorter than a header")
    if crc32(data[:28]) != struct.unpack_from("<I", data, 28)[0]:
        raise CorruptArchiveError("header CRC")
    if flags or any(data[16:28]):
        raise CorruptArchiveError("header flags or reserved bytes set")
    if len(data) < HEADER_SIZE + FOOTER_SIZE:
        raise CorruptArchiveError("file shorter than 72 bytes")
    foot = data[-FOOTER_SIZE:]
    index_offset, index_size, archive_size, index_crc, fflags = struct.unpack_from(
        "<QQQII", foot)
    if foot[32:36] != FOOTER_MAGIC:
        raise CorruptArchiveError("footer magic")
    if crc32(foot[:36]) != struct.unpack_from("<I", foot, 36)[0]:
        raise CorruptArchiveError("footer CRC")
    if fflags:
        raise CorruptArchiveError("footer flags")
    if archive_size != len(data):
        raise CorruptArchiveError("archive_size differs from the file's size")
    if index_size > MAX_INDEX or index_offset < HEADER_SIZE \
            or index_offset + index_size + FOOTER_SIZE != archive_size:
        raise CorruptArchiveError("index offset or size")
    raw_index = data[index_offset:index_offset + index_size]
    if crc32(raw_index) != index_crc:
        raise ChecksumMismatchError("index CRC")
    cur = Cursor(raw_index, "index")
    creator_len = cur.u16()
    if creator_len > 255:
        raise CorruptArchiveError("creator over 255 bytes")
    creator = utf8(cur.take(creator_len), "creator")
    ext_len = cur.u32()
    if ext_len > (MAX_ARCH_EXT if minor >= 1 else 1 << 20):
        raise CorruptArchiveError("archive extension area too large")
    extensions = read_extensions(cur.take(ext_len), "archive", frozenset({TAG_COMPACT}))
    model_count = cur.u16()
    if model_count > 255:
        raise CorruptArchiveError("more than 255 models")
    models = []
    for _ in range(model_count):
        fingerprint = cur.take(32)
        name_len = cur.u16()
        if name_len > 255:
            raise CorruptArchiveError("model name over 255 bytes")
        name = utf8(cur.take(name_len), "model name")
        profile_len = cur.u32()
        if profile_len > MAX_SMALL:
            raise CorruptArchiveError("profile over 65,536 bytes")
        models.append(Model(fingerprint, name, parse_profile(cur.take(profile_len))))
    entry_count = cur.u32()
    if entry_count > MAX_ENTRIES:
        raise CorruptArchiveError("more than 1,000,000 entries")
    if 0x8001 in extensions and entry_count:
        raise CorruptArchiveError("entry records beside a compact table")
    entries = [read_entry_record(cur) for _ in range(entry_count)]
    if not cur.at_end():
        raise CorruptArchiveError("index has trailing bytes")
    compact = 0x8001 in extensions
    if compact:
        entries = read_compact(extensions[0x8001])
    archive = Archive(data, (major, minor), creator, models, entries, index_offset)
    check_names(entries)
    if compact:
        place_compact(archive)
    else:
        place_records(archive)
    return archive


def small_text(cur: Cursor, limit: int, what: str) -> str:
    length = cur.varint()
    if length > limit:
        raise CorruptArchiveError(f"{what} over {limit} bytes")
    return utf8(cur.take(length), what)


def read_small_model(cur: Cursor) -> Model:
    """format.md §12.3: form 0 (a JSON profile), form 1 (integer engines, binary),
    form 2 (form 1's fields, then ``carry`` and ``chain``: llm-codec.md §3.4) or form 3
    (form 2's, then ``mix``: llm-codec.md §3.6), every field checked as it is read."""
    form = cur.u8()
    if form == 0:
        fingerprint = cur.take(32)
        name = small_text(cur, 255, "model name")
        profile_len = cur.varint()
        if profile_len > MAX_SMALL:
            raise CorruptArchiveError("profile over 65,536 bytes")
        return Model(fingerprint, name, parse_profile(cur.take(profile_len)))
    if form not in (1, 2, 3):
        raise UnsupportedFeatureError(f"model record form {form}")
    fingerprint = cur.take(16)
    name = small_text(cur, 255, "model name")
    engine, precision = cur.u8(), cur.u8()
    if engine not in (1, 2):
        raise UnsupportedFeatureError(f"model record engine code {engine}")
    if not 12 <= precision <= 28:
        raise CorruptArchiveError(f"precision {precision}")
    length = cur.varint()
    if not 1 <= length <= 65536:
        raise CorruptArchiveError(f"segment length {length}")
    digests = cur.take(12)
    start = cur.varint()
    if start >= 1 << 32:
        raise CorruptArchiveError(f"start token {start}")
    profile = {"engine": f"int-v{engine}", "precision": precision, "segment_length": length,
               "model": {"arch": digests[:4].hex(), "table": digests[4:8].hex(),
                         "weights": digests[8:].hex(), "start": start}}
    if form >= 2:  # form 1's profile plus "carry" and "chain"
        carry = cur.varint()
        if not 1 <= carry <= length:
            raise CorruptArchiveError(f"carry {carry} outside 1...{length}")
        chain = cur.varint()
        if not 2 <= chain <= MAX_CHAIN:
            raise CorruptArchiveError(f"chain {chain}")
        profile["carry"], profile["chain"] = carry, chain
    if form == 3:  # form 2's profile plus "mix"; mixing needs P <= 24
        mix = cur.varint()
        if not 1 <= mix <= MAX_MIX_ORDER:
            raise CorruptArchiveError(f"mix {mix} outside 1...{MAX_MIX_ORDER}")
        if precision > MAX_MIX_PRECISION:
            raise CorruptArchiveError(f"precision {precision} over 24 with mix")
        profile["mix"] = mix
    return Model(fingerprint, name, profile)


def open_small(data: bytes, minor: int) -> Archive:
    """format.md §12: the 3.0 layout (12-byte header, index, 8-byte trailer)."""
    if len(data) < SMALL_HEADER + TRAILER:
        raise CorruptArchiveError("file shorter than 20 bytes")
    index_size, index_crc = struct.unpack_from("<II", data, len(data) - TRAILER)
    if index_size > MAX_INDEX:
        raise CorruptArchiveError("index over 256 MiB")
    index_offset = len(data) - TRAILER - index_size
    if index_offset < SMALL_HEADER:
        raise CorruptArchiveError("index size larger than the file")
    raw = data[index_offset:len(data) - TRAILER]
    if zlib.crc32(raw, zlib.crc32(data[:SMALL_HEADER])) != index_crc:
        raise ChecksumMismatchError("index CRC")
    if not raw:
        raise CorruptArchiveError("empty index")
    if raw[0] == 0:
        body = raw[1:]
    elif raw[0] == 1:
        head = Cursor(raw[1:], "index")
        body_size = head.varint()
        if body_size > MAX_BODY:
            raise CorruptArchiveError("index body over 256 MiB")
        body = zstd_exact(raw[1 + head.pos:], body_size, "index")
    else:
        raise UnsupportedFeatureError(f"index encoding {raw[0]}")
    cur = Cursor(body, "index")
    creator = small_text(cur, 255, "creator")
    ext_len = cur.varint()
    if ext_len > MAX_ARCH_EXT:
        raise CorruptArchiveError("archive extension area too large")
    extensions = read_extensions(cur.take(ext_len), "archive", frozenset({TAG_LLM_SOLID}))
    model_count = cur.varint()
    if model_count > 255:
        raise CorruptArchiveError("more than 255 models")
    models = [read_small_model(cur) for _ in range(model_count)]
    entries = read_compact_records(cur, small=True, llm_solid=TAG_LLM_SOLID in extensions)
    archive = Archive(data, (3, minor), creator, models, entries, index_offset)
    check_names(entries)
    place_compact(archive)
    return archive


def check_names(entries: list[Entry]) -> None:
    """format.md §8, in index order (after the whole index parsed)."""
    seen: set[str] = set()
    for e in entries:
        name = e.name
        if name.startswith("/") or (len(name) >= 2 and name[1] == ":" and name[0].isascii()
                                    and name[0].isalpha()):
            raise UnsafeArchiveError(f"{name!r}: absolute or drive-letter name")
        for part in name.split("/"):
            if part in ("", ".", ".."):
                raise UnsafeArchiveError(f"{name!r}: empty, '.' or '..' component")
            if len(part.encode("utf-8")) > 255:
                raise UnsafeArchiveError(f"{name!r}: component over 255 bytes")
        if any(c == "\\" or ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in name):
            raise UnsafeArchiveError(f"{name!r}: backslash or control character")
        if name in seen:
            raise UnsafeArchiveError(f"{name!r} appears twice")
        seen.add(name)
    files = {e.name for e in entries if e.type == TYPE_FILE}
    for e in entries:
        parts = e.name.split("/")
        for i in range(1, len(parts)):  # quadratic in depth: fine for a reference
            if "/".join(parts[:i]) in files:
                raise UnsafeArchiveError(f"{e.name!r} lies below a regular file")


def check_claim(size: int, stored: int, what: str) -> None:
    if size > 32768 * stored:
        raise CorruptArchiveError(f"{what}: size over 32,768 x stored size")


def place_compact(ar: Archive) -> None:
    """§4.2 implicit placement: ranges tile the data area by construction (which starts
    after the header: 32 bytes, or 12 in format 3.0)."""
    pos, block_first = SMALL_HEADER if ar.version[0] == 3 else HEADER_SIZE, None
    skip = 0
    for i, e in enumerate(ar.entries):
        if e.type != TYPE_FILE:
            continue
        if e.stored_size == -1:  # SOLID_NEXT
            first = ar.entries[block_first]
            e.offset, e.stored_size, e.stored_crc = first.offset, first.stored_size, \
                first.stored_crc
            e.skip, e.block = skip, block_first
            skip += e.size
            ar.blocks[block_first].append(i)
            continue
        e.offset = pos
        if pos + e.stored_size > ar.index_offset:
            raise CorruptArchiveError(f"{e.name!r}: stored range passes the index")
        pos += e.stored_size
        if e.solid:
            block_first, skip, e.block = i, e.size, i
            ar.blocks[i] = [i]
        else:
            block_first = None
    if pos != ar.index_offset:
        raise CorruptArchiveError("stored ranges leave a gap")
    for members in ar.blocks.values():
        first = ar.entries[members[0]]
        total = sum(ar.entries[i].size for i in members)
        if first.codec == 2:  # §12.6: T >= 1; §6.1's size claim is zstd's only
            if not total:
                raise CorruptArchiveError(f"LLM solid block at {first.offset} of 0 bytes")
        else:
            check_claim(total, first.stored_size, f"solid block at {first.offset}")
    for e in ar.entries:
        if e.type == TYPE_FILE and e.codec == 1 and not e.solid:
            check_claim(e.size, e.stored_size, e.name)


def place_records(ar: Archive) -> None:
    """§5 and §6.2 for 1.0 records: ranges in the data area, tiling it; solid blocks."""
    ranges: dict[tuple[int, int], list[int]] = {}
    for i, e in enumerate(ar.entries):
        if e.type != TYPE_FILE:
            continue
        if not HEADER_SIZE <= e.offset <= ar.index_offset \
                or e.offset + e.stored_size > ar.index_offset:
            raise CorruptArchiveError(f"{e.name!r}: stored range outside the data area")
        if e.stored_size:
            ranges.setdefault((e.offset, e.stored_size), []).append(i)
    pos = HEADER_SIZE
    for (offset, size), members in sorted(ranges.items()):
        if offset != pos:
            raise CorruptArchiveError("stored ranges overlap or leave a gap")
        pos = offset + size
        solid = [ar.entries[i] for i in members]
        if len(members) > 1 or (solid[0].codec == 1 and len(solid[0].params) == 16):
            if any(len(e.params) != 16 or e.codec != 1 for e in solid):
                raise CorruptArchiveError("entries share a range outside a solid block")
            expect, shares = 0, 0
            for e in solid:
                skip, share = struct.unpack("<QQ", e.params)
                if skip != expect or e.stored_crc != solid[0].stored_crc:
                    raise CorruptArchiveError("inconsistent solid block")
                e.solid, e.skip, e.block = True, skip, members[0]
                expect += e.size
                shares += share
            if shares != size:
                raise CorruptArchiveError("solid block shares do not add up")
            ar.blocks[members[0]] = members
            check_claim(expect, size, f"solid block at {offset}")
    if pos != ar.index_offset:
        raise CorruptArchiveError("stored ranges leave a gap")
    for e in ar.entries:
        if e.type == TYPE_FILE and e.codec == 1 and not e.solid:
            if e.params:
                raise CorruptArchiveError(f"zstd member {e.name!r}: invalid params")
            check_claim(e.size, e.stored_size, e.name)


# ----------------------------------------------------------------------------- zstd


def zstd_exact(frame: bytes, size: int, what: str) -> bytes:
    """format.md §6.1: one frame, header checked, output bounded by ``size``."""
    if frame[:4] != ZSTD_MAGIC:
        raise CorruptArchiveError(f"{what}: not a zstd frame")
    window, content = frame_header(frame, what)
    if window > MAX_WINDOW:
        raise CorruptArchiveError(f"{what}: zstd window over 128 MiB")
    if content is not None and content != size:
        raise CorruptArchiveError(f"{what}: frame declares {content} bytes")
    dobj = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).decompressobj()
    out = bytearray()
    try:
        for i in range(0, len(frame), 4):  # 4 bytes in: at most one block (128 KiB) out
            if dobj.eof:
                raise CorruptArchiveError(f"{what}: bytes after the zstd frame")
            out += dobj.decompress(frame[i:i + 4])
            if len(out) > size:
                raise CorruptArchiveError(f"{what}: decodes to more than {size} bytes")
    except zstandard.ZstdError as exc:
        raise CorruptArchiveError(f"{what}: corrupt zstd frame: {exc}") from None
    if not dobj.eof:
        raise CorruptArchiveError(f"{what}: truncated zstd frame")
    if dobj.unused_data:
        raise CorruptArchiveError(f"{what}: bytes after the zstd frame")
    if len(out) != size:
        raise CorruptArchiveError(f"{what}: decodes to {len(out)} bytes, not {size}")
    return bytes(out)


def frame_header(frame: bytes, what: str) -> tuple[int, int | None]:
    """(Window_Size, Frame_Content_Size or None) of a zstd frame header (RFC 8878
    §3.1.1.1; a Single_Segment frame's window is its content size)."""
    cur = Cursor(frame, what)
    cur.take(4)
    descriptor = cur.u8()
    fcs_flag, single, dict_flag = descriptor >> 6, (descriptor >> 5) & 1, descriptor & 3
    window = 0
    if not single:
        byte = cur.u8()
        base = 1 << (10 + (byte >> 3))
        window = base + (base // 8) * (byte & 7)
    cur.take((0, 1, 2, 4)[dict_flag])
    width = (1 if single else 0, 2, 4, 8)[fcs_flag]
    content = int.from_bytes(cur.take(width), "little") if width else None
    if width == 2:
        content += 256
    if single:
        window = content
    return window, content


# ----------------------------------------------------------------------------- reading


def stored_bytes(ar: Archive, e: Entry) -> bytes:
    raw = ar.data[e.offset:e.offset + e.stored_size]
    if crc32(raw) != e.stored_crc:
        raise ChecksumMismatchError(f"{e.name!r}: stored CRC-32")
    return raw


def check_digest(e: Entry, data: bytes) -> bytes:
    if len(data) != e.size:
        raise CorruptArchiveError(f"{e.name!r}: decoded to {len(data)} bytes, not {e.size}")
    good = (struct.pack("<I", crc32(data)) == e.digest if e.crc_digest  # 16 B: §12.4
            else hashlib.sha256(data).digest()[:len(e.digest)] == e.digest)
    if not good:
        raise ChecksumMismatchError(f"{e.name!r}: digest of the decoded bytes")
    return data


def read_all(ar: Archive, model_path: Path | None = None) -> dict[str, bytes | None]:
    """Decode every member (format.md §10.3 order): name -> bytes (None: directory)."""
    files = [e for e in ar.entries if e.type == TYPE_FILE]
    for e in files:
        if e.codec not in (0, 1, 2):
            raise UnsupportedFeatureError(f"{e.name!r}: unknown codec id {e.codec}")
    out: dict[str, bytes | None] = {e.name: None for e in ar.entries if e.type == TYPE_DIR}
    done_blocks: set[int] = set()
    for e in sorted(files, key=lambda x: x.offset):
        if e.codec == 2:
            continue
        if e.solid:
            if e.block in done_blocks:
                continue
            done_blocks.add(e.block)
            members = [ar.entries[i] for i in ar.blocks[e.block]]
            total = sum(m.size for m in members)
            block = zstd_exact(stored_bytes(ar, e), total, f"solid block at {e.offset}")
            for m in members:
                out[m.name] = check_digest(m, block[m.skip:m.skip + m.size])
        elif e.codec == 0:
            raw = stored_bytes(ar, e)
            if len(raw) != e.size:
                raise CorruptArchiveError(f"{e.name!r}: stored size differs from size")
            out[e.name] = check_digest(e, raw)
        else:
            out[e.name] = check_digest(e, zstd_exact(stored_bytes(ar, e), e.size, e.name))
    llm = [e for e in files if e.codec == 2]
    if llm:
        decoder = LLMDecoder(ar, model_path)
        for e in sorted(llm, key=lambda x: x.offset):
            if not e.solid:
                out[e.name] = decoder.decode(e)
            elif e.block not in done_blocks:  # format.md §12.6: one payload, all members
                done_blocks.add(e.block)
                out.update(decoder.decode_block([ar.entries[i] for i in ar.blocks[e.block]]))
    return out


# ----------------------------------------------------------------------------- entropy

K = LOG2E_SCALED  # entropy.md §2: the binary64 nearest 256 / ln 2
MASK, TOP = (1 << 56) - 1, 1 << 48


def frequencies(logits: np.ndarray, precision: int) -> np.ndarray:
    """entropy.md §2: binary32 logits -> integer frequencies summing to 2^P."""
    z = np.asarray(logits, dtype=np.float32)
    size = z.shape[0]
    if np.isnan(z).any() or np.isposinf(z).any() or np.isneginf(z).all():
        raise CorruptArchiveError("logits with NaN or +inf, or all -inf")
    if not 1 <= size < 1 << precision:
        raise CorruptArchiveError("alphabet not below 2^P")
    top = z.max()
    with np.errstate(over="ignore", invalid="ignore"):
        d = (z - top).astype(np.float32)  # binary32, subnormals kept (NumPy never flushes)
        x = np.floor(d.astype(np.float64) * K)
    x = np.maximum(np.nan_to_num(x, neginf=-10240.0), -10240).astype(np.int64)
    e = -x
    w = EXP2[e & 255] >> (e >> 8)
    total = int(w.sum())
    spare = (1 << precision) - size
    f = 1 + (w * spare) // total
    f[int(np.argmax(z))] += (1 << precision) - int(f.sum())  # the first maximum
    return f


class RangeDecoder:
    """entropy.md §3.2, for tables of total ``2^precision`` (§2) or, given ``total``, of
    any total M <= 2^36 (§3: a mixed table of §4)."""

    def __init__(self, stream: bytes, precision: int) -> None:
        self.stream, self.precision, self.pos = stream, precision, 0
        self.range, self.code = MASK, 0
        for _ in range(7):
            self.code = (self.code << 8) | self.byte()

    def byte(self) -> int:
        p = self.pos
        self.pos += 1
        if p < len(self.stream):
            return self.stream[p]
        if p < len(self.stream) + 7:
            return 0
        raise CorruptArchiveError("range decoder read past its stream")

    def decode(self, freq: np.ndarray, total: int | None = None) -> int:
        total = 1 << self.precision if total is None else total  # M (§3)
        r = self.range // total
        t = self.code // r
        if t >= total:  # checked before the cumulative sums are built (§3.2 allows it)
            raise CorruptArchiveError("range decoder out of bounds")
        cumulative = np.cumsum(freq)
        if int(cumulative[-1]) != total:  # §3.2: the table MUST sum to M (a caller bug)
            raise ValueError(f"table sums to {int(cumulative[-1])}, not {total}")
        s = int(np.searchsorted(cumulative, t, side="right"))
        start = int(cumulative[s]) - int(freq[s])
        self.code -= r * start
        self.range = r * int(freq[s])
        while self.range < TOP:
            self.code = (self.code << 8) | self.byte()
            self.range <<= 8
        return s


class RangeEncoder:
    """entropy.md §3.1 (to check the trace vectors' streams byte for byte), for tables of
    total ``2^precision`` or, given ``total``, of any total M <= 2^36."""

    def __init__(self, precision: int) -> None:
        self.precision, self.low, self.range = precision, 0, MASK
        self.cache: int | None = None
        self.pending, self.out, self.shifts = 0, bytearray(), 0

    def shift_low(self) -> None:
        if self.cache is None:
            self.cache = self.low >> 48
        elif self.low < 0xFF << 48 or self.low >= 1 << 56:
            carry = self.low >> 56
            self.out.append((self.cache + carry) & 0xFF)
            self.out.extend([(0xFF + carry) & 0xFF] * self.pending)
            self.pending = 0
            self.cache = (self.low >> 48) & 0xFF
        else:
            self.pending += 1
        self.low = (self.low << 8) & MASK

    def encode(self, freq: np.ndarray, symbol: int, total: int | None = None) -> None:
        r = self.range // (1 << self.precision if total is None else total)
        self.low += r * int(freq[:symbol].sum())
        self.range = r * int(freq[symbol])
        while self.range < TOP:
            self.shift_low()
            self.shifts += 1
            self.range <<= 8

    def finish(self) -> bytes:
        high = self.low + self.range - 1
        for k in range(64, -1, -1):
            v = (high >> k) << k
            if v >= self.low:
                break
        self.low = v
        for _ in range(8):
            self.shift_low()
        out = bytes(self.out)
        cut = 0
        while cut < 7 and len(out) - cut > self.shifts and out[len(out) - 1 - cut] == 0:
            cut += 1
        return out[:len(out) - cut]


# entropy.md §4: adaptive n-gram mixing (version 1.1)

MAX_MIX_ORDER, MAX_MIX_PRECISION = 4, 24  # §4.1: K in 1...4, P <= 24 (so M <= 2^36)
U_START, U_LIMIT = -262144, 524032  # §4.1: -4 * 2^16, 2047 * 256
SQUASH_POINTS = (1, 2, 4, 6, 10, 17, 27, 45, 74, 120, 194, 311, 488, 747, 1102, 1546, 2048,
                 2550, 2994, 3349, 3608, 3785, 3902, 3976, 4022, 4051, 4069, 4079, 4086,
                 4090, 4092, 4094, 4095)  # §4.1: S[0...32], normative


def squash(d: int) -> int:
    """§4.1: the weight of the counts in 1/4096 (1...4095), a logistic of d / 256,
    interpolated between the 33 points of S.  Python's ``>>`` and ``&`` on a negative
    int are the arithmetic shift and two's complement, as §4 asks."""
    d = min(max(d, -2047), 2047)
    i, m = (d >> 7) + 16, d & 127
    return (SQUASH_POINTS[i] * (128 - m) + SQUASH_POINTS[i + 1] * m + 64) >> 7


class Mixer:
    """entropy.md §4 over one sequence x_0, x_1, ...: ``add`` counts a token of the
    history (§4.2, step 6 alone), ``table`` mixes the model's table F for the next
    position (steps 1-3), ``learn`` takes the token coded there (steps 5-6).  ``u`` is
    the weight state; llm-codec.md §3.6 restarts it at every segment (``restart``)."""

    def __init__(self, order: int, precision: int) -> None:
        if not 1 <= order <= MAX_MIX_ORDER or precision > MAX_MIX_PRECISION:
            raise ValueError(f"mixing of order {order} at precision {precision}")
        self.order, self.precision = order, precision
        self.tokens: list[int] = []
        # counts[o][context] = {token: c_o(token)} for the contexts h_o seen so far
        self.counts: list[dict[tuple[int, ...], dict[int, int]]] = [
            {} for _ in range(order + 1)]
        self.u = U_START
        self._last: tuple[int, int] | None = None  # (w, M) of the last ``table``

    def restart(self) -> None:
        """§4.2: u = U_START at a segment's first token; the counts stay."""
        self.u = U_START

    def _followers(self) -> list[dict[int, int] | None]:
        """For o = 0 ... K: the counts under the current context h_o, or None where the
        order takes no part (o > j, or n_o = 0)."""
        j = len(self.tokens)
        out: list[dict[int, int] | None] = []
        for o in range(self.order + 1):
            seen = None
            if o <= j:
                seen = self.counts[o].get(tuple(self.tokens[j - o:j]))
            out.append(seen or None)
        return out

    def table(self, model: np.ndarray) -> tuple[np.ndarray, int]:
        """Steps 1-3 at position j = len(tokens): the mixed table G and its total M."""
        followers = self._followers()
        # 1. escapes, highest order first
        rem, escapes = 65536, [0] * (self.order + 1)
        for o in range(self.order, -1, -1):
            seen = followers[o]
            if seen is not None:
                n, d = sum(seen.values()), len(seen)
                escapes[o] = (rem * n) // (n + d)
                rem -= escapes[o]
        # 2. weights
        w = squash(self.u >> 8)
        alpha = 4096 - w + (w * rem) // 65536
        one = 1 << self.precision
        # 3. G = alpha * F + sum_o beta_o * c_o, M = alpha * 2^P + sum_o beta_o * n_o
        mixed = alpha * np.asarray(model, dtype=np.int64)
        total = alpha * one
        for o, seen in enumerate(followers):
            if seen is None or escapes[o] == 0:  # beta_o = 0
                continue
            n = sum(seen.values())
            beta = (w * escapes[o] * one) // (65536 * n)
            symbols = np.fromiter(seen.keys(), dtype=np.int64, count=len(seen))
            counts = np.fromiter(seen.values(), dtype=np.int64, count=len(seen))
            mixed[symbols] += beta * counts  # distinct symbols: no repeated index
            total += beta * n
        self._last = (w, total)
        return mixed, total

    def learn(self, model: np.ndarray, mixed: np.ndarray, x: int) -> None:
        """Steps 5-6 for the token x coded with ``table``'s G (``mixed``) and F
        (``model``): one gradient step of u (78-bit product: Python ints), then count x."""
        if self._last is None:
            raise ValueError("learn() without table()")
        w, total = self._last
        g, f = int(mixed[x]), int(model[x])
        scaled = g << self.precision
        delta = (16 * (4096 - w) * (scaled - f * total)) // scaled  # floor, also < 0
        self.u = min(max(self.u + delta, -U_LIMIT), U_LIMIT)
        self._last = None
        self.add(x)

    def add(self, x: int) -> None:
        """Step 6: x_j joins the counts of every order o <= min(K, j) under h_o."""
        j = len(self.tokens)
        for o in range(min(self.order, j) + 1):
            seen = self.counts[o].setdefault(tuple(self.tokens[j - o:j]), {})
            seen[x] = seen.get(x, 0) + 1
        self.tokens.append(x)


# ----------------------------------------------------------------------------- models
# spec/model.md: the model as an archive sees it, derived from the bytes of its files.


def _model_error(condition: bool, message: str) -> None:
    if condition:
        raise ModelError(message)


def _f16(raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, dtype="<f2").astype(np.float32)


def _bf16(raw: bytes) -> np.ndarray:
    return (np.frombuffer(raw, dtype="<u2").astype(np.uint32) << 16).view(np.float32)


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """model.md §2.2: u64 N, a JSON header, the data; F32/F16/BF16 to float32 (exact)."""
    raw = path.read_bytes()
    _model_error(len(raw) < 8, f"{path.name}: truncated")
    (length,) = struct.unpack_from("<Q", raw, 0)
    _model_error(length > len(raw) - 8 or length > 100 << 20, f"{path.name}: header size")
    try:
        header = json.loads(raw[8:8 + length].decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise ModelError(f"{path.name}: header is not UTF-8 JSON") from None
    _model_error(not isinstance(header, dict), f"{path.name}: header is not an object")
    data = memoryview(raw)[8 + length:]
    sizes = {"F32": 4, "F16": 2, "BF16": 2}
    tensors = {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        count = math.prod(shape)
        _model_error(dtype not in sizes, f"{path.name}: {name} has dtype {dtype}")
        _model_error(not 0 <= begin <= end <= len(data) or end - begin != count * sizes[dtype],
                     f"{path.name}: {name} has bad data offsets")
        chunk = bytes(data[begin:end])
        array = (np.frombuffer(chunk, dtype="<f4") if dtype == "F32" else
                 _f16(chunk) if dtype == "F16" else _bf16(chunk))
        tensors[name] = array.reshape(shape)
    return tensors


def canonical_names(arch: dict) -> list[str]:
    """model.md §1, in its order."""
    names = ["model.embed_tokens.weight"]
    for i in range(arch["num_hidden_layers"]):
        p = f"model.layers.{i}."
        names += [p + "input_layernorm.weight", p + "self_attn.q_proj.weight",
                  p + "self_attn.k_proj.weight", p + "self_attn.v_proj.weight",
                  p + "self_attn.o_proj.weight", p + "post_attention_layernorm.weight",
                  p + "mlp.gate_proj.weight", p + "mlp.up_proj.weight",
                  p + "mlp.down_proj.weight"]
    names.append("model.norm.weight")
    if not arch["tie_word_embeddings"]:
        names.append("lm_head.weight")
    return names


def canonical_shapes(arch: dict) -> dict[str, tuple[int, ...]]:
    d, inner, v = arch["hidden_size"], arch["intermediate_size"], arch["vocab_size"]
    q, kv = arch["num_attention_heads"] * arch["head_dim"], \
        arch["num_key_value_heads"] * arch["head_dim"]
    shapes = {}
    for name in canonical_names(arch):
        part = name.split(".")[-2]
        shapes[name] = {"embed_tokens": (v, d), "lm_head": (v, d), "q_proj": (q, d),
                        "k_proj": (kv, d), "v_proj": (kv, d), "o_proj": (d, q),
                        "gate_proj": (inner, d), "up_proj": (inner, d),
                        "down_proj": (d, inner)}.get(part, (d,))
    return shapes


def check_architecture(arch: dict) -> dict:
    """model.md §4.2: the 16 members, their types and ranges."""
    _model_error(arch.get("model_type") != "llama", "model_type is not llama")
    for key in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads", "head_dim",
                "max_position_embeddings"):
        _model_error(type(arch[key]) is not int or arch[key] < 1, f"{key} {arch[key]!r}")
    _model_error(arch["num_attention_heads"] % arch["num_key_value_heads"] != 0,
                 "heads not a multiple of key/value heads")
    for key in ("rms_norm_eps", "rope_theta"):
        value = arch[key]
        _model_error(type(value) not in (int, float) or not math.isfinite(value) or value <= 0,
                     f"{key} {value!r}")
        arch[key] = float(value)
    _model_error(not isinstance(arch["hidden_act"], str), "hidden_act is not a string")
    _model_error(arch["rope_scaling"] is not None and not isinstance(arch["rope_scaling"], dict),
                 "rope_scaling")
    for key in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        _model_error(type(arch[key]) is not bool, f"{key} {arch[key]!r}")
    return arch


LLAMA_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008,
                  "num_hidden_layers": 32, "num_attention_heads": 32, "hidden_act": "silu",
                  "max_position_embeddings": 2048, "rms_norm_eps": 1e-06,
                  "tie_word_embeddings": False, "attention_bias": False, "mlp_bias": False}


def architecture_from_config(config: dict) -> dict:
    """model.md §4.1."""
    _model_error(config.get("model_type") != "llama", "model_type is not llama")

    def as_object(value: object, what: str) -> dict:
        _model_error(value is not None and not isinstance(value, dict), f"{what} not an object")
        return dict(value or {})

    params = as_object(config.get("rope_parameters"), "rope_parameters")
    scaling = as_object(config.get("rope_scaling"), "rope_scaling")
    if "rope_theta" in params:
        theta = params["rope_theta"]
    elif config.get("rope_theta") is not None:
        theta = config["rope_theta"]
    else:
        theta = 10000.0
    merged = {**scaling, **params}
    merged.pop("rope_theta", None)
    if "type" in merged:
        kind = merged.pop("type")
        merged.setdefault("rope_type", kind)
    rope_scaling = None if merged in ({}, {"rope_type": "default"}) else merged

    def value(key: str, default: object) -> object:
        return config[key] if config.get(key) is not None else default

    arch = {key: value(key, default) for key, default in LLAMA_DEFAULTS.items()}
    arch["model_type"] = "llama"
    arch["num_key_value_heads"] = value("num_key_value_heads", arch["num_attention_heads"])
    if config.get("head_dim") is not None:
        arch["head_dim"] = config["head_dim"]
    else:
        hidden, heads = arch["hidden_size"], arch["num_attention_heads"]
        _model_error(not isinstance(hidden, int) or not isinstance(heads, int) or not heads
                     or hidden % heads, "head_dim is not a whole number")
        arch["head_dim"] = hidden // heads
    arch["rope_theta"], arch["rope_scaling"] = theta, rope_scaling
    return check_architecture(arch)


def _gpt2_alphabet() -> dict[str, int]:
    """model.md §5: GPT-2's byte alphabet, character -> byte."""
    direct = [*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)]
    table = {chr(b): b for b in direct}
    others = [b for b in range(256) if b not in table.values()]
    for n, b in enumerate(others):
        table[chr(0x100 + n)] = b
    return table


def _pb_varint(cur: Cursor) -> int:
    value = 0
    for i in range(10):
        byte = cur.u8()
        value |= (byte & 0x7F) << (7 * i)
        if not byte & 0x80:
            return value
    raise ModelError("tokenizer.model: varint over 10 bytes")


def _protobuf_fields(data: bytes) -> Iterator[tuple[int, int, bytes | int]]:
    """model.md §2.4: (field, wire type, value); groups (3, 4) are ModelError."""
    cur = Cursor(data, "tokenizer.model")
    try:
        while not cur.at_end():
            key = _pb_varint(cur)
            number, wire = key >> 3, key & 7
            if wire == 0:
                yield number, wire, _pb_varint(cur)
            elif wire == 1:
                yield number, wire, cur.take(8)
            elif wire == 2:
                yield number, wire, cur.take(_pb_varint(cur))
            elif wire == 5:
                yield number, wire, cur.take(4)
            else:
                raise ModelError(f"tokenizer.model: wire type {wire}")
    except CorruptArchiveError:
        raise ModelError("tokenizer.model: a field runs past its message") from None


SP_NORMAL, SP_UNKNOWN, SP_CONTROL, SP_USER, SP_UNUSED, SP_BYTE = 1, 2, 3, 4, 5, 6


def sentencepiece_pieces(raw: bytes) -> list[tuple[str, int]]:
    """model.md §2.4: (text, type) of each piece, ids in order of appearance."""
    pieces = []
    for number, wire, value in _protobuf_fields(raw):
        if number == 1 and wire == 2:
            text, kind = "", SP_NORMAL
            for n, w, v in _protobuf_fields(value):
                if n == 1 and w == 2:
                    try:
                        text = v.decode("utf-8")
                    except UnicodeDecodeError:
                        raise ModelError("tokenizer.model: piece not UTF-8") from None
                elif n == 3 and w == 0:
                    kind = v
            pieces.append((text, kind))
    _model_error(not pieces, "tokenizer.model has no piece")
    return pieces


def _sp_text(text: str) -> bytes | None:
    return text.replace("\u2581", " ").encode("utf-8") or None


def _byte_piece(text: str) -> int | None:
    if len(text) == 6 and text[:3] == "<0x" and text[5] == ">":
        try:
            return int(text[3:5], 16)
        except ValueError:
            return None
    return None


def sp_table(pieces: list[tuple[str, int]]) -> list[bytes | None]:
    """model.md §5.2 (and §5.3's `llama`)."""
    table: list[bytes | None] = []
    for text, kind in pieces:
        if kind in (SP_CONTROL, SP_UNKNOWN):
            table.append(None)
        elif kind == SP_BYTE:
            byte = _byte_piece(text)
            _model_error(byte is None, f"BYTE piece {text!r}")
            table.append(bytes([byte]))
        else:
            table.append(_sp_text(text))
    return table


def _components(node: object, key: str) -> list[dict]:
    if not isinstance(node, dict):
        return []
    return [node, *[c for c in node.get(key) or [] if isinstance(c, dict)]]


def tokenizer_json_table(spec: dict) -> tuple[list[bytes | None], dict[str, int]]:
    """model.md §5.1: (table, text -> id for the start token's lookup)."""
    model = spec.get("model") or {}
    vocab = model.get("vocab") or {}
    if isinstance(vocab, list):
        vocab = {entry[0]: i for i, entry in enumerate(vocab)}
    added = {t["id"]: t["content"] for t in spec.get("added_tokens") or []}
    size = max([*vocab.values(), *added], default=-1) + 1
    table: list[bytes | None] = [None] * size
    level = [*_components(spec.get("pre_tokenizer"), "pretokenizers"),
             *_components(spec.get("decoder"), "decoders")]
    sp_parts = [*level, *_components(spec.get("normalizer"), "normalizers")]
    if any(c.get("type") == "ByteLevel" for c in level):
        alphabet = _gpt2_alphabet()
        for text, i in vocab.items():
            if all(ch in alphabet for ch in text):
                table[i] = bytes(alphabet[ch] for ch in text) or None
    elif any(c.get("type") in ("Metaspace", "ByteFallback") or (
            c.get("type") == "Replace" and "\u2581" in json.dumps(c, ensure_ascii=False))
            for c in sp_parts) or model.get("byte_fallback") is True:
        fallback = model.get("byte_fallback") is True
        for text, i in vocab.items():
            byte = _byte_piece(text) if fallback else None
            table[i] = bytes([byte]) if byte is not None else _sp_text(text)
        if isinstance(model.get("unk_id"), int) and 0 <= model["unk_id"] < size:
            table[model["unk_id"]] = None
        if model.get("unk_token") in vocab:
            table[vocab[model["unk_token"]]] = None
    else:
        raise ModelError("tokenizer.json is neither byte-level nor SentencePiece-style")
    for i in added:
        table[i] = None
    names = dict(vocab)
    names.update({content: i for i, content in added.items()})  # added tokens win
    return table, names


def _json_object(path: Path) -> dict:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def folder_start_token(folder: Path, config: dict, names: dict[str, int]) -> int:
    """model.md §2.5: bos, then eos; tokenizer_config.json, special_tokens_map.json,
    config.json, the first present deciding."""
    settings = _json_object(folder / "tokenizer_config.json")
    special = _json_object(folder / "special_tokens_map.json")
    for role in ("bos", "eos"):
        for source in (settings, special):
            value = source.get(f"{role}_token")
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                _model_error(value not in names, f"{role} token {value!r} names no token")
                return names[value]
        value = config.get(f"{role}_token_id")
        if isinstance(value, list) and value:
            value = value[0]
        if type(value) is int:
            return value
    raise ModelError("no start token")


@dataclass
class DerivedModel:
    """model.md: canonical weights, architecture, table (padded to V), start token, and
    what version 1 fingerprints need."""

    weights: dict[str, np.ndarray]
    arch: dict
    table: list[bytes | None]
    start: int
    v1_weights: Callable[[], bytes]  # computed on demand: it hashes every weight file again
    v1_config: dict


def derive_folder(folder: Path) -> DerivedModel:
    """model.md §2."""
    config = _json_object(folder / "config.json")
    _model_error(not config, f"{folder}: no config.json object")
    arch = architecture_from_config(config)
    files = sorted(p for p in folder.iterdir() if p.name.endswith(".safetensors")
                   and p.is_file())
    if not files:
        raise ModelNotFoundError(f"{folder}: no .safetensors weights (.bin is refused here)")
    found: dict[str, np.ndarray] = {}
    for p in files:
        for name, tensor in read_safetensors(p).items():
            _model_error(name in found, f"tensor {name} in two files")
            found[name] = tensor
    weights = pick_weights(found, arch)
    if (folder / "tokenizer.json").exists():
        spec = _json_object(folder / "tokenizer.json")
        table, names = tokenizer_json_table(spec)
    elif (folder / "tokenizer.model").exists():
        pieces = sentencepiece_pieces((folder / "tokenizer.model").read_bytes())
        table = sp_table(pieces)
        names = {}
        for i, (text, _kind) in enumerate(pieces):
            names.setdefault(text, i)  # the lowest id of a repeated text
    else:
        raise ModelError(f"{folder}: no tokenizer.json or tokenizer.model")
    start = folder_start_token(folder, config, names)
    return finish(weights, arch, table, start, lambda: v1_folder_digest(folder), config)


def pick_weights(found: dict[str, np.ndarray], arch: dict) -> dict[str, np.ndarray]:
    weights = {}
    for name, shape in canonical_shapes(arch).items():
        _model_error(name not in found, f"weight {name} missing")
        _model_error(tuple(found[name].shape) != shape,
                     f"weight {name} has shape {found[name].shape}, not {shape}")
        weights[name] = found[name]
    return weights


def finish(weights: dict[str, np.ndarray], arch: dict, table: list[bytes | None],
           start: int, v1_weights: Callable[[], bytes], v1_config: dict) -> DerivedModel:
    size = arch["vocab_size"]
    _model_error(len(table) > size, "the tokenizer has more ids than vocab_size")
    _model_error(not 0 <= start < size, f"start token {start} out of range")
    return DerivedModel(weights, arch, table + [None] * (size - len(table)), start,
                        v1_weights, v1_config)


def v1_folder_digest(folder: Path) -> bytes:
    """model.md §6.2: the weight files' names and SHA-256s, in byte order of name."""
    sha = hashlib.sha256()
    files = sorted((p for p in folder.iterdir() if p.suffix in (".safetensors", ".bin", ".pt",
                                                              ".pth") and p.is_file()),
                   key=lambda p: p.name.encode("utf-8"))
    for p in files:
        sha.update(p.name.encode("utf-8") + b"\0" + hashlib.sha256(p.read_bytes()).digest())
    return sha.digest()


# --- GGUF (model.md §3)

GGUF_BLOCKS = {0: (1, 4), 1: (1, 2), 30: (1, 2), 8: (32, 34), 2: (32, 18), 3: (32, 20)}
GGUF_NAMES = {"token_embd.weight": "model.embed_tokens.weight",
              "output_norm.weight": "model.norm.weight", "output.weight": "lm_head.weight"}
GGUF_LAYER = {"attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj",
              "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
              "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
              "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def _gguf_value(cur: Cursor, kind: int) -> object:
    scalars = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 10: "<Q",
               11: "<q", 12: "<d"}
    if kind in scalars:
        fmt = scalars[kind]
        return struct.unpack(fmt, cur.take(struct.calcsize(fmt)))[0]
    if kind == 7:
        byte = cur.u8()
        _model_error(byte > 1, "GGUF bool not 0 or 1")
        return bool(byte)
    if kind == 8:
        try:
            return cur.take(cur.u64()).decode("utf-8")
        except UnicodeDecodeError:
            raise ModelError("GGUF string not UTF-8") from None
    if kind == 9:
        element, count = cur.u32(), cur.u64()
        smallest = {0: 1, 1: 1, 7: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 8: 8, 10: 8, 11: 8, 12: 8}
        _model_error(element not in smallest or count * smallest[element]
                     > len(cur.data) - cur.pos, "GGUF array too long")
        return [_gguf_value(cur, element) for _ in range(count)]
    raise ModelError(f"GGUF value type {kind}")


def _dequantize(raw: bytes, kind: int, count: int) -> np.ndarray:
    """model.md §3.3, in binary32."""
    if kind == 0:
        return np.frombuffer(raw, dtype="<f4").copy()
    if kind == 1:
        return _f16(raw)
    if kind == 30:
        return _bf16(raw)
    blocks = np.frombuffer(raw, dtype=np.uint8).reshape(count // 32, -1)
    d = _f16(blocks[:, 0:2].tobytes())[:, None]
    if kind == 8:
        q = blocks[:, 2:34].view(np.int8).astype(np.float32)
        return (q * d).reshape(-1)
    low_high = 2 if kind == 2 else 4
    packed = blocks[:, low_high:low_high + 16]
    q = np.concatenate((packed & 0x0F, packed >> 4), axis=1).astype(np.float32)
    if kind == 2:
        return ((q - np.float32(8)) * d).reshape(-1)
    m = _f16(blocks[:, 2:4].tobytes())[:, None]
    return ((q * d) + m).astype(np.float32).reshape(-1)  # one binary32 addition


def derive_gguf(path: Path) -> DerivedModel:
    """model.md §3."""
    raw = path.read_bytes()
    cur = Cursor(raw, path.name)
    try:
        _model_error(cur.take(4) != b"GGUF", "not a GGUF file")
        version = cur.u32()
        _model_error(version not in (2, 3), f"GGUF version {version}")
        tensor_count, kv_count = cur.u64(), cur.u64()
        _model_error(kv_count * 12 + tensor_count * 24 > len(raw) - cur.pos,
                     "GGUF counts above the file's size")
        meta: dict[str, object] = {}
        for _ in range(kv_count):
            key = _gguf_value(cur, 8)
            _model_error(key in meta, f"GGUF key {key} twice")
            meta[key] = _gguf_value(cur, cur.u32())
        infos = []
        for _ in range(tensor_count):
            name = _gguf_value(cur, 8)
            dims = [cur.u64() for _ in range(cur.u32())]
            _model_error(not 1 <= len(dims) <= 4, f"{name}: {len(dims)} dims")
            infos.append((name, dims, cur.u32(), cur.u64()))
    except CorruptArchiveError:
        raise ModelError(f"{path.name}: truncated") from None
    alignment = meta.get("general.alignment", 32)
    _model_error(type(alignment) is not int or alignment < 1 or alignment & (alignment - 1),
                 "general.alignment")
    start = -(-cur.pos // alignment) * alignment
    tensors = {}
    for name, dims, kind, offset in infos:
        _model_error(kind not in GGUF_BLOCKS, f"{name}: ggml type {kind}")
        _model_error(name in tensors, f"tensor {name} twice")
        values, size = GGUF_BLOCKS[kind]
        count = math.prod(dims)
        _model_error(dims[0] % values != 0 or offset % alignment, f"{name}: layout")
        begin, end = start + offset, start + offset + count // values * size
        _model_error(end > len(raw), f"{name}: past the file's end")
        tensors[name] = _dequantize(raw[begin:end], kind, count).reshape(dims[::-1])
    _model_error(meta.get("general.architecture") != "llama", "not a llama GGUF")
    a = "llama."
    _model_error(bool(meta.get(a + "expert_count")), "mixture of experts")

    def need(key: str) -> object:
        _model_error(a + key not in meta, f"GGUF key {a + key} missing")
        return meta[a + key]

    kind = meta.get(a + "rope.scaling.type")
    _model_error(kind not in (None, "none", "default"), f"rope scaling {kind}")
    _model_error("token_embd.weight" not in tensors, "no token_embd.weight")
    heads = need("attention.head_count")
    hidden = need("embedding_length")
    arch = {
        "model_type": "llama", "vocab_size": tensors["token_embd.weight"].shape[0],
        "hidden_size": hidden, "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"), "num_attention_heads": heads,
        "num_key_value_heads": meta.get(a + "attention.head_count_kv", heads),
        "head_dim": meta.get(a + "attention.key_length",
                             meta.get(a + "rope.dimension_count", hidden // heads)),
        "hidden_act": "silu", "rms_norm_eps": float(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(meta.get(a + "rope.freq_base", 10000.0)), "rope_scaling": None,
        "max_position_embeddings": need("context_length"), "attention_bias": False,
        "mlp_bias": False, "tie_word_embeddings": "output.weight" not in tensors}
    arch = check_architecture(arch)
    found = {}
    for name, tensor in tensors.items():
        if name in GGUF_NAMES:
            canonical = GGUF_NAMES[name]
        else:
            parts = name.split(".")
            _model_error(len(parts) != 4 or parts[0] != "blk" or parts[3] != "weight"
                         or parts[2] not in GGUF_LAYER or not parts[1].isdigit()
                         or str(int(parts[1])) != parts[1], f"GGUF tensor {name}")
            canonical = f"model.layers.{parts[1]}.{GGUF_LAYER[parts[2]]}.weight"
            if parts[2] in ("attn_q", "attn_k"):  # §3.6: rows back from llama.cpp's order
                count = heads if parts[2] == "attn_q" else arch["num_key_value_heads"]
                dh = arch["head_dim"]
                _model_error(dh % 2 != 0, "odd head_dim")
                tensor = tensor.reshape(count, dh // 2, 2, -1).swapaxes(1, 2).reshape(
                    count * dh, -1)
        found[canonical] = np.ascontiguousarray(tensor)
    _model_error(set(found) - set(canonical_shapes(arch)), "GGUF tensors outside §1")
    weights = pick_weights(found, arch)
    tokens = meta.get("tokenizer.ggml.tokens")
    _model_error(not isinstance(tokens, list), "no tokenizer.ggml.tokens")
    types = meta.get("tokenizer.ggml.token_type", [SP_NORMAL] * len(tokens))
    _model_error(len(types) != len(tokens), "token types and tokens differ in length")
    family = meta.get("tokenizer.ggml.model")
    if family == "gpt2":
        alphabet = _gpt2_alphabet()
        table = [bytes(alphabet[c] for c in t) or None
                 if kind == SP_NORMAL and all(c in alphabet for c in t) else None
                 for t, kind in zip(tokens, types, strict=True)]
    elif family == "llama":
        table = sp_table(list(zip(tokens, types, strict=True)))
    else:
        raise ModelError(f"tokenizer.ggml.model {family!r}")
    start_id = meta.get("tokenizer.ggml.bos_token_id", meta.get("tokenizer.ggml.eos_token_id"))
    _model_error(type(start_id) is not int, "no start token")
    v1_config = {k: v for k, v in arch.items() if k != "rope_scaling"}
    return finish(weights, arch, table, start_id, lambda: v1_gguf_digest(weights, arch),
                  v1_config)


def v1_gguf_digest(weights: dict[str, np.ndarray], arch: dict) -> bytes:
    """model.md §6.2: the safetensors file llmarc 0.1 wrote, hashed without writing it."""
    names = sorted((n for n in weights if not (n == "lm_head.weight"
                                               and arch["tie_word_embeddings"])),
                   key=lambda n: n.encode("ascii"))
    header, offset = {}, 0
    for n in names:
        size = weights[n].size * 4
        header[n] = {"dtype": "F32", "shape": list(weights[n].shape),
                     "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode("ascii")
    text += b" " * (-len(text) % 8)
    sha = hashlib.sha256(struct.pack("<Q", len(text)) + text)
    for n in names:
        sha.update(np.ascontiguousarray(weights[n], dtype="<f4").tobytes())
    return hashlib.sha256(b"model.safetensors\0" + sha.digest()).digest()


def derive(path: Path) -> DerivedModel:
    if path.is_dir():
        return derive_folder(path)
    if path.suffix == ".gguf" and path.is_file():
        return derive_gguf(path)
    raise ModelNotFoundError(f"model {path} not found")


# --- fingerprints (model.md §6)


def weights_digest(model: DerivedModel) -> bytes:
    names = canonical_names(model.arch)
    sha = hashlib.sha256(b"llmarc-weights-v2\0" + struct.pack("<I", len(names)))
    for name in names:
        w = model.weights[name]
        sha.update(struct.pack("<I", len(name)) + name.encode("ascii")
                   + struct.pack("<I", w.ndim) + struct.pack(f"<{w.ndim}Q", *w.shape))
        sha.update(np.ascontiguousarray(w, dtype="<f4").tobytes())
    return sha.digest()


def table_digest(entries: list[bytes | None], width: int) -> bytes:
    """llm-codec.md §2.1."""
    sha = hashlib.sha256(b"llmarc-token-bytes-v1\0" + struct.pack("<I", width))
    for i in range(width):
        entry = entries[i] if i < len(entries) else None
        sha.update(b"\xff\xff\xff\xff" if entry is None
                   else struct.pack("<I", len(entry)) + entry)
    return sha.digest()


V1_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
           "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
           "rms_norm_eps", "rope_theta", "rope_scaling", "rope_parameters",
           "max_position_embeddings", "attention_bias", "mlp_bias", "tie_word_embeddings")


def v1_forms(config: dict) -> list[dict]:
    """model.md §6.2: the transformers 5.x and 4.x spellings of the architecture."""
    base = {**LLAMA_DEFAULTS, "rope_theta": 10000.0, "rope_scaling": None}
    base.update({k: config[k] for k in V1_KEYS if k in config})
    if base.get("num_key_value_heads") is None:
        base["num_key_value_heads"] = base["num_attention_heads"]
    if base.get("head_dim") is None:
        base["head_dim"] = base["hidden_size"] // base["num_attention_heads"]
    scaling = base.get("rope_scaling")
    if isinstance(scaling, dict) and "type" in scaling:
        scaling = base["rope_scaling"] = {**scaling, "rope_type": scaling["type"]}
    four = {k: v for k, v in base.items() if v is not None}
    five = {k: v for k, v in four.items() if k not in ("rope_theta", "rope_scaling")}
    if isinstance(config.get("rope_parameters"), dict):
        five["rope_parameters"] = config["rope_parameters"]
    else:
        five["rope_parameters"] = {"rope_theta": base["rope_theta"], "rope_type": "default",
                                   **(scaling if isinstance(scaling, dict) else {})}
    return [five, four]


def fingerprint(magic: bytes, weights: bytes, table: bytes, arch: dict, start: int) -> bytes:
    return hashlib.sha256(magic + weights + table + canonical_json(arch).encode("ascii")
                          + struct.pack("<I", start)).digest()


def fingerprint_v2(model: DerivedModel) -> bytes:
    table = table_digest(model.table, model.arch["vocab_size"])
    return fingerprint(b"llmarc-model-fingerprint-v2\n", weights_digest(model), table,
                       model.arch, model.start)


def fingerprints_v1(model: DerivedModel) -> list[bytes]:
    """[version 1 in the transformers 5.x form, in the 4.x form]."""
    table = table_digest(model.table, model.arch["vocab_size"])
    return [fingerprint(b"llmarc-model-fingerprint-v1\n", model.v1_weights(), table, form,
                        model.start) for form in v1_forms(model.v1_config)]


# ----------------------------------------------------------------------------- engine


CHUNK = 1040


class Engine:
    """llm-codec.md §5, one position at a time with a cache of (kk, sk, vv, sv).

    Linear layers are float32 products over inner chunks of at most 1,040 values (every
    partial sum an integer below 2^24, so exact in any order), the chunks' sums added in
    binary64 (integers below 2^53): the exact sums of §5.3, as its implementation note
    allows."""

    def __init__(self, model: DerivedModel, length: int, engine: str) -> None:
        arch, weights = model.arch, model.weights
        if arch["rope_scaling"] is not None or arch["attention_bias"] or arch["mlp_bias"] \
                or arch["hidden_size"] > 8192 or arch["hidden_act"] != "silu":
            raise ModelError("a model int-v1/v2 do not support (llm-codec.md §5.1)")
        self.levels = ATTENTION_LEVELS[engine]
        self.d = arch["hidden_size"]
        self.heads = arch["num_attention_heads"]
        self.kv_heads = arch["num_key_value_heads"]
        self.dh = arch["head_dim"]
        self.eps = arch["rms_norm_eps"]
        self.n_layers = arch["num_hidden_layers"]
        self.cos, self.sin = rope_tables(arch["rope_theta"], self.dh, length)
        self.embed = weights["model.embed_tokens.weight"]
        self.norms = {k: v.astype(np.float64) for k, v in weights.items()
                      if k.endswith("norm.weight")}
        self.linear: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        for i in range(self.n_layers):
            for part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj",
                         "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
                name = f"model.layers.{i}.{part}.weight"
                self.linear[name] = self._int8(weights[name])
        self.linear["lm_head"] = self._int8(weights.get("lm_head.weight", self.embed))
        self.width = self.linear["lm_head"][0][0].shape[0]
        self.reset()

    @staticmethod
    def _int8(w: np.ndarray) -> tuple[list[np.ndarray], np.ndarray]:
        """§5.3, row by row; the int8 values kept as float32 columns of at most 1,040
        (127 * 127 * 1040 < 2^24: every partial sum of a chunk is an exact float32)."""
        q, scale = quantize(w.astype(np.float64), LINEAR_LEVELS)
        q32 = q.astype(np.float32)
        chunks = [np.ascontiguousarray(q32[:, i:i + CHUNK]) for i in range(0, q.shape[1], CHUNK)]
        return chunks, scale[:, 0]

    def reset(self) -> None:
        self.position = 0
        self.cache: list[list[tuple]] = [[] for _ in range(self.n_layers)]

    def apply(self, name: str, q: np.ndarray, s: float) -> np.ndarray:
        chunks, omega = self.linear[name]
        x = q.astype(np.float32)
        acc = np.zeros(chunks[0].shape[0])
        for i, chunk in enumerate(chunks):  # exact per chunk, summed exactly in binary64
            acc += (chunk @ x[i * CHUNK:(i + 1) * CHUNK]).astype(np.float64)
        return acc * (s * omega)

    def norm(self, h: np.ndarray, weight: str) -> tuple[np.ndarray, float]:
        """§5.4 NQ(h, g)."""
        g = self.norms[weight]
        m = float(np.max(np.abs(h)))
        e = math.frexp(m)[1] if m else 0  # smallest e >= 0 with m < 2^e
        sigma = max(0, e - NORM_BITS)
        r = np.floor(h * power_of_two(-sigma)).astype(np.int64)
        total = float(np.sum(r * r))
        mean = (total * float(power_of_two(2 * sigma - 2 * RESIDUAL_BITS))) / float(self.d)
        root = math.sqrt(mean + self.eps)
        q, a = quantize(h * g, LINEAR_LEVELS)
        return q, (float(a[0]) * 2.0 ** -RESIDUAL_BITS) / root

    def step(self, token: int) -> np.ndarray:
        """Logits (float32) at the next position for ``token`` fed there."""
        i = self.position
        self.position += 1
        h = np.rint(self.embed[token].astype(np.float64) * 2.0 ** RESIDUAL_BITS)
        half, group = self.dh // 2, self.heads // self.kv_heads
        scale = 1.0 / math.sqrt(float(self.dh))
        c, si = self.cos[i], self.sin[i]

        def rotate(x: np.ndarray) -> np.ndarray:
            a, b = x[..., :half], x[..., half:]
            return np.concatenate((a * c - b * si, b * c + a * si), axis=-1)

        for layer in range(self.n_layers):
            p = f"model.layers.{layer}."
            q, s = self.norm(h, p + "input_layernorm.weight")
            qs = rotate(self.apply(p + "self_attn.q_proj.weight", q, s)
                        .reshape(self.heads, self.dh))
            ks = rotate(self.apply(p + "self_attn.k_proj.weight", q, s)
                        .reshape(self.kv_heads, self.dh))
            vs = self.apply(p + "self_attn.v_proj.weight", q, s).reshape(self.kv_heads, self.dh)
            qq, sq = quantize(qs, self.levels)
            kk, sk = quantize(ks, self.levels)
            vv, sv = quantize(vs, self.levels)
            self.cache[layer].append((kk, sk[:, 0], vv, sv[:, 0]))
            keys = np.stack([entry[0] for entry in self.cache[layer]])  # [t, kv, dh]
            key_scales = np.stack([entry[1] for entry in self.cache[layer]])  # [t, kv]
            values = np.stack([entry[2] for entry in self.cache[layer]])
            value_scales = np.stack([entry[3] for entry in self.cache[layer]])
            context = np.empty((self.heads, self.dh))
            for head in range(self.heads):
                kv = head // group
                lam = sq[head, 0] * scale
                a = keys[:, kv] @ qq[head]  # exact int64
                z = a.astype(np.float64) * (lam * key_scales[:, kv])
                x = np.floor((z - np.max(z)) * K)
                w = exp_weight(-x)
                u, su = quantize(w.astype(np.float64) * value_scales[:, kv], self.levels)
                cvec = u @ values[:, kv]  # exact int64
                context[head] = (cvec.astype(np.float64) * su[0]) / float(np.sum(w))
            q, s2 = quantize(context.reshape(-1), LINEAR_LEVELS)
            h = h + np.rint(self.apply(p + "self_attn.o_proj.weight", q, float(s2[0]))
                            * 2.0 ** RESIDUAL_BITS)
            q, s = self.norm(h, p + "post_attention_layernorm.weight")
            gate = self.apply(p + "mlp.gate_proj.weight", q, s)
            up = self.apply(p + "mlp.up_proj.weight", q, s)
            w = exp_weight(np.floor(np.abs(gate) * K)).astype(np.float64)
            one = 2.0 ** 31
            sigmoid = np.where(gate >= 0, one, w) / (w + one)
            q, s2 = quantize((gate * sigmoid) * up, LINEAR_LEVELS)
            h = h + np.rint(self.apply(p + "mlp.down_proj.weight", q, float(s2[0]))
                            * 2.0 ** RESIDUAL_BITS)
        q, s = self.norm(h, "model.norm.weight")
        return self.apply("lm_head", q, s).astype(np.float32)


# ----------------------------------------------------------------------------- llm codec


def _profile_int(profile: dict, key: str, low: int, high: int) -> int:
    value = profile.get(key)
    if type(value) is not int or not low <= value <= high:
        raise CorruptArchiveError(f"profile {key} {value!r} missing or out of range")
    return value


@dataclass
class Settings:
    """The keys int-v1/int-v2 read (llm-codec.md §2.2): L, P, context carry's C and G
    (C = 0 without ``carry``: then G is unused) and the mixing order K (0 without
    ``mix``: no mixing)."""

    length: int
    precision: int
    carry: int = 0
    chain: int = 0
    mix: int = 0


def read_settings(profile: dict) -> Settings:
    """llm-codec.md §2.2, once ``engine`` named an integer engine: ``segment_length``,
    ``precision``, then ``carry`` (optional, 1...L with L + C <= 65,536), ``chain``
    (2...256, present exactly when ``carry`` is) and ``mix`` (optional, 1...4, only with
    ``carry`` and P <= 24), in this order; any failure is *corrupt*.  Other keys are
    ignored."""
    length = _profile_int(profile, "segment_length", 1, 65536)
    precision = _profile_int(profile, "precision", 12, 28)
    if "carry" not in profile:
        if "chain" in profile:
            raise CorruptArchiveError("profile has chain without carry")
        if "mix" in profile:
            raise CorruptArchiveError("profile has mix without carry")
        return Settings(length, precision)
    carry = _profile_int(profile, "carry", 1, min(length, MAX_POSITIONS - length))
    chain = _profile_int(profile, "chain", 2, MAX_CHAIN)
    if "mix" not in profile:
        return Settings(length, precision, carry, chain)
    mix = _profile_int(profile, "mix", 1, MAX_MIX_ORDER)
    if precision > MAX_MIX_PRECISION:
        raise CorruptArchiveError(f"profile precision {precision} over 24 with mix")
    return Settings(length, precision, carry, chain, mix)


def segment_context(previous: list[int], s: int, settings: Settings) -> list[int]:
    """llm-codec.md §3.4: the context of segment ``s``, given ``previous``, the tokens of
    segment s - 1 (ignored where s starts a chain).  Chains of G segments; the first of a
    chain (s a multiple of G) and every segment without carry have none; any other has
    ``t[s·L − C … s·L − 1]``, the last C of segment s − 1's exactly L tokens."""
    if not settings.carry or s % settings.chain == 0:
        return []
    if len(previous) != settings.length:  # s − 1 is not the last segment: it is full
        raise AssertionError("segment s - 1 does not hold L tokens")
    return previous[settings.length - settings.carry:]


def segment_positions(count: int, settings: Settings) -> int:
    """The positions the entry's segments use (llm-codec.md §3.4: c + count_s for segment
    s), to size the rotary tables: the longest segment, and with carry C more for a
    segment with context.  Segment 1 is one (G ≥ 2) and the longest of them (a full
    segment unless it is the last)."""
    positions = min(settings.length, count)
    if settings.carry and count > settings.length:
        positions = max(positions,
                        settings.carry + min(settings.length, count - settings.length))
    return positions


def decode_segment(stepper: Engine, start: int, context: list[int], stream: bytes,
                   precision: int, tokens: int, table: list[bytes | None],
                   text: bytearray, own_limit: int, limit: int, what: str,
                   mixer: Mixer | None = None) -> list[int]:
    """llm-codec.md §3.3: segment of ``tokens`` tokens from its ``stream``, its bytes
    appended to ``text``; its tokens returned.  The model is stepped fresh from the start
    token at position 0, then fed the ``context`` (positions 1 ... c, logits unused), and
    the logits at position c + i code token i.  ``own_limit`` is the bound this segment
    alone proves (its own tokens only, §3.4), ``limit`` the entry's, size − E.  With
    ``mix`` (§3.6), ``mixer`` holds the counts of the chain's earlier segments (the
    history, which already contains the context: it is not counted again) and mixes
    every table; its weight restarts here."""
    decoder = RangeDecoder(stream, precision)
    if mixer is not None:
        mixer.restart()  # §3.6: u = U_START at every segment's first token
    stepper.reset()
    feed = start
    for token in context:  # positions 0 ... c − 1: they fill the cache, code nothing
        stepper.step(feed)
        feed = token
    out: list[int] = []
    produced = 0
    for _ in range(tokens):
        freq = frequencies(stepper.step(feed), precision)
        if mixer is None:
            token = decoder.decode(freq)
        else:  # entropy.md §4.3: code with the mixed table G of total M, then learn
            mixed, total = mixer.table(freq)
            token = decoder.decode(mixed, total)
            mixer.learn(freq, mixed, token)
        piece = table[token]
        if piece is None:
            raise CorruptArchiveError(f"{what}: token {token} has no bytes")
        text += piece
        produced += len(piece)
        if produced > own_limit or len(text) > limit:
            raise CorruptArchiveError(f"{what}: text longer than size - E")
        out.append(token)
        feed = token
    return out


class LLMDecoder:
    """llm-codec.md §3 and §6, in the order of checks of §6."""

    def __init__(self, ar: Archive, model_path: Path | None) -> None:
        self.ar, self.model_path = ar, model_path
        self._model: DerivedModel | None = None
        self._v2 = b""
        self._v1: list[bytes] | None = None
        self._engines: dict[tuple[str, int], Engine] = {}

    def model(self) -> tuple[DerivedModel, bytes]:
        """The derived model and its version-2 fingerprint."""
        if self._model is None:
            if self.model_path is None:
                raise ModelNotFoundError("no model given")
            self._model = derive(self.model_path)
            self._v2 = fingerprint_v2(self._model)
        return self._model, self._v2

    def v1(self) -> list[bytes]:
        """Version-1 fingerprints, computed only when version 2 did not match (§6.2)."""
        if self._v1 is None:
            self._v1 = fingerprints_v1(self.model()[0])
        return self._v1

    def decode(self, e: Entry) -> bytes:
        """An LLM member (§3): its bytes, of its size, then its digest (format.md §5)."""
        return check_digest(e, self.payload(e, e.size, repr(e.name)))

    def decode_block(self, members: list[Entry]) -> dict[str, bytes]:
        """An LLM solid block (format.md §12.6, §3.5): its payload decoded once as one
        entry of T bytes (T the members' sizes added, every bound using T) with the model
        of its first record's params; member k is bytes [c_k, c_k + size_k) (``skip``),
        each checked on its own bytes: its length, then its digest."""
        first = members[0]
        total = sum(m.size for m in members)
        data = self.payload(first, total, f"LLM solid block at {first.offset}")
        return {m.name: check_digest(m, data[m.skip:m.skip + m.size]) for m in members}

    def payload(self, e: Entry, size: int, what: str) -> bytes:
        """The stored bytes of ``e`` (a member, or a solid block's first record: its
        params and stored range) decoded to exactly ``size`` bytes (§3.2-§3.4)."""
        if len(e.params) != 2:
            raise CorruptArchiveError(f"{what}: llm params of {len(e.params)} bytes")
        (index,) = struct.unpack("<H", e.params)
        if index >= len(self.ar.models):
            raise CorruptArchiveError(f"{what}: model {index} of {len(self.ar.models)}")
        record = self.ar.models[index]
        engine = record.profile.get("engine")
        if engine == "lockstep-v1":  # optional (llm-codec.md §5.9): not implemented here
            raise NotImplementedByReference("lockstep-v1 (float, machine-bound) archives")
        if engine not in ATTENTION_LEVELS:
            raise UnsupportedFeatureError(f"engine {engine!r}")
        settings = read_settings(record.profile)
        length, precision, carry = settings.length, settings.precision, settings.carry
        model, v2 = self.model()
        if len(record.fingerprint) == 16:  # format.md §12.3: v2's first 16 bytes
            if record.fingerprint != v2[:16]:
                raise ModelMismatchError(self._mismatch(record, model, v2))
        elif record.fingerprint != v2 and record.fingerprint not in self.v1():
            raise ModelMismatchError(self._mismatch(record, model, v2))
        width = model.arch["vocab_size"]  # §6.1: the profile against the model
        window = model.arch["max_position_embeddings"]
        if length > window:
            raise CorruptArchiveError(f"segment length {length} over the model's window")
        if length + carry > window:
            raise CorruptArchiveError(f"segment length {length} + carry {carry} over the "
                                      f"model's window")
        if width >= 1 << precision:
            raise CorruptArchiveError("logits width not below 2^P")
        payload = stored_bytes(self.ar, e)
        count, escapes, streams = parse_payload(payload, size, length)
        positions = segment_positions(count, settings)  # rotary tables: positions used
        key = (engine, positions)
        if key not in self._engines:
            self._engines = {key: Engine(model, positions, engine)}
        stepper = self._engines[key]
        limit = size - len(escapes)
        text = bytearray()
        previous: list[int] = []
        mixer: Mixer | None = None
        # One segment after another: segment s − 1 is whole before s starts (§3.4), and
        # any failure ends the entry, so no segment after a failed one is decoded.
        for s, stream in enumerate(streams):
            tokens = min(length, count - s * length)
            own_limit = limit - (count - tokens)  # §3.3: this segment alone proves it
            if settings.mix and s % settings.chain == 0:  # §3.6: a chain's own counts
                mixer = Mixer(settings.mix, precision)
            previous = decode_segment(stepper, model.start,
                                      segment_context(previous, s, settings), stream,
                                      precision, tokens, model.table, text, own_limit,
                                      limit, what, mixer)
        data = bytearray(text)
        for offset, byte in escapes:
            data[offset:offset] = bytes([byte])
        if len(data) != size:  # a text shorter than size - E (§3.3)
            raise CorruptArchiveError(f"{what}: decoded to {len(data)} bytes, not {size}")
        return bytes(data)

    def _mismatch(self, record: Model, model: DerivedModel, v2: bytes) -> str:
        """Names both models and, from the profile's `model` member, what differs."""
        message = (f"archive model {record.name!r} ({record.fingerprint.hex()[:16]}) is not "
                   f"{self.model_path} ({v2.hex()[:16]})")
        recorded = record.profile.get("model")
        if isinstance(recorded, dict):
            here = {"arch": hashlib.sha256(canonical_json(model.arch).encode()).hexdigest()[:8],
                    "start": model.start,
                    "table": table_digest(model.table, model.arch["vocab_size"]).hex()[:8],
                    "weights": weights_digest(model).hex()[:8]}
            differ = [k for k in here if recorded.get(k) != here[k]]
            message += f"; differing: {', '.join(differ) or 'nothing recorded differs'}"
        return message


def parse_payload(payload: bytes, size: int, length: int
                  ) -> tuple[int, list[tuple[int, int]], list[bytes]]:
    """llm-codec.md §3.2, int-v1/int-v2 layout, checks in the order given there."""
    cur = Cursor(payload, "llm payload")
    count = cur.varint()
    escape_count = cur.varint()
    if escape_count > size or 2 * escape_count > len(payload) - cur.pos:
        raise CorruptArchiveError(f"llm payload: {escape_count} escapes")
    escapes, offset = [], -1
    for _ in range(escape_count):
        offset += 1 + cur.varint()
        escapes.append((offset, cur.u8()))
    if escapes and escapes[-1][0] >= size:
        raise CorruptArchiveError("llm payload: an escape past the entry's end")
    if count < 1 or count + escape_count > size:
        raise CorruptArchiveError(f"llm payload: {count} tokens")
    segments = -(-count // length)
    if segments > len(payload) - cur.pos:
        raise CorruptArchiveError("llm payload: more segments than bytes")
    lengths = [cur.varint() for _ in range(segments)]
    if sum(lengths) != len(payload) - cur.pos:
        raise CorruptArchiveError("llm payload: coded lengths do not add up")
    streams = []
    for n in lengths:
        streams.append(cur.take(n))
    return count, escapes, streams


# ----------------------------------------------------------------------------- main


def decode_file(path: Path, model: Path | None = None) -> dict[str, bytes | None]:
    """Every member of the archive at ``path``; ``model``: a model folder or GGUF file."""
    return read_all(open_archive(path.read_bytes()), model)


if __name__ == "__main__":
    archive = Path(sys.argv[1])
    folder = Path(sys.argv[2]) if len(sys.argv) > 2 else None
    members = decode_file(archive, folder)
    if len(sys.argv) > 3:
        dest = Path(sys.argv[3])
        for name, data in members.items():
            target = dest / name
            if data is None:
                target.mkdir(parents=True, exist_ok=True)
            else:
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(data)
    print(f"{len(members)} members decoded and verified")
