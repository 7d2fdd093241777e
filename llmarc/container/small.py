"""Format 3.0's index (spec/format.md §12): encode and hostile decode.

Why a second index form: a one-file archive of a 700-byte text coded by the LLM was
about 490 bytes, of which 120 were the coded text. The 1.x frame alone (32-byte header,
40-byte footer, fixed-width index fields, the compact table in a TLV record with its own
5-byte header) is 90 bytes before any content, and the model record carried a 134-byte
JSON profile. Format 3.0 keeps every piece of information a reader needs and drops the
rest: the header is the magic and the version, the trailer the index size and CRC, every
number a varint, the compact entry table (§4.2) is the index's tail, and a model record
of the integer engines is 35 bytes of binary (a 16-byte fingerprint prefix, the engine,
precision and segment length, and the 4-byte component digests that name what differs
when the model does not match).

Decoding parses the body as it inflates (the compact table's bounded reader), so a
hostile index is worth at most its own bytes in memory and work.
"""

from __future__ import annotations

from collections.abc import Iterator

import zstandard

from ..entropy.mixing import MAX_MIX_PRECISION
from ..entropy.mixing import MAX_ORDER as MAX_MIX_ORDER
from ..errors import CorruptArchiveError, UnsupportedFeatureError
from .compact import TABLE_LEVEL, _Body, _inflate, encode_body, parse_body, put_varint
from .json_safe import canonical_json, parse_profile_json
from .layout import (
    BLOCK_LLM,
    EXT_COMPACT_ENTRIES,
    EXT_LLM_BLOCKS,
    MAX_ARCHIVE_EXT_BYTES,
    MAX_CHAIN,
    MAX_CREATOR_BYTES,
    MAX_INDEX_SIZE,
    MAX_MODEL_NAME_BYTES,
    MAX_MODELS,
    MAX_PROFILE_BYTES,
    SHORT_FINGERPRINT,
    SMALL_HEADER_SIZE,
    TABLE_PLAIN,
    TABLE_ZSTD,
    Extension,
    Index,
    ModelRecord,
    block_position,
    decode_ext_area,
    encode_ext_area,
)

#: Model record forms (§12.3): 0 any profile as JSON, 1 the integer engines in binary,
#: 2 form 1 with context carry (llm-codec.md §3.4), 3 form 2 with mixing (§3.6).
FORM_JSON = 0
FORM_INTEGER = 1
FORM_CARRY = 2
FORM_MIX = 3
#: Engine codes of form 1.
ENGINE_CODES = {1: "int-v1", 2: "int-v2"}
_ENGINE_IDS = {name: code for code, name in ENGINE_CODES.items()}
_COMPONENTS = ("arch", "table", "weights")
MAX_START_TOKEN = 2**32 - 1


# ---------------------------------------------------------------- encode


def _integer_form(profile: dict) -> tuple[int, int, int, bytes, int] | None:
    """(engine code, precision, L, 12 digest bytes, start) when ``profile`` is exactly
    what form 1 stands for (form 2 without its carry and chain), else None (the record
    is written as form 0, JSON)."""
    comps = profile.get("model")
    if set(profile) != {"engine", "precision", "segment_length", "model"} \
            or profile["engine"] not in _ENGINE_IDS or not isinstance(comps, dict) \
            or set(comps) != {*_COMPONENTS, "start"}:
        return None
    p, length, start = profile["precision"], profile["segment_length"], comps["start"]
    ints = (p, length, start)
    if any(isinstance(v, bool) or not isinstance(v, int) for v in ints) \
            or not (12 <= p <= 28 and 1 <= length <= 65536 and 0 <= start <= MAX_START_TOKEN):
        return None
    digests = b""
    for key in _COMPONENTS:
        value = comps[key]
        if not isinstance(value, str) or len(value) != 8 or value != value.lower():
            return None
        try:
            digests += bytes.fromhex(value)
        except ValueError:
            return None
    return _ENGINE_IDS[profile["engine"]], p, length, digests, start


def _carry_and_mix(profile: dict) -> tuple[int, ...] | None:
    """(carry, chain) of a profile with context carry, (carry, chain, mix) with mixing
    too, else None; ValueError for keys that forms 2 and 3 cannot hold (a writer may
    record carry and mix in no other form)."""
    if not {"carry", "chain", "mix"} & set(profile):
        return None
    carry, chain = profile.get("carry"), profile.get("chain")
    length, precision = profile.get("segment_length"), profile.get("precision")
    mix = profile.get("mix", 1)
    if any(isinstance(v, bool) or not isinstance(v, int)
           for v in (carry, chain, length, precision, mix)) \
            or not (1 <= carry <= length and 2 <= chain <= MAX_CHAIN) \
            or not (1 <= mix <= MAX_MIX_ORDER and precision <= MAX_MIX_PRECISION):
        raise ValueError(f"carry {carry!r} / chain {chain!r} / mix {mix!r}: no model record "
                         "can hold them")
    return (carry, chain, mix) if "mix" in profile else (carry, chain)


def encode_model(m: ModelRecord) -> bytes:
    """One model record: form 1 when the profile is an integer engine's as llmarc writes
    it (the fingerprint is cut to its first 16 bytes), form 2 when it also has context
    carry, else form 0 (the 1.x record's fields, lengths as varints)."""
    out = bytearray()
    name = m.name.encode("utf-8")
    if len(name) > MAX_MODEL_NAME_BYTES:
        raise ValueError("model name too long")
    profile = parse_profile_json(m.profile)
    carry = _carry_and_mix(profile)
    if carry is not None:
        profile = {k: v for k, v in profile.items() if k not in ("carry", "chain", "mix")}
    form = _integer_form(profile)
    if form is not None and len(m.fingerprint) in (SHORT_FINGERPRINT, 32):
        engine, precision, length, digests, start = form
        out.append({0: FORM_INTEGER, 2: FORM_CARRY, 3: FORM_MIX}[len(carry or ())])
        out += m.fingerprint[:SHORT_FINGERPRINT]
        put_varint(out, len(name))
        out += name + bytes((engine, precision))
        put_varint(out, length)
        out += digests
        put_varint(out, start)
        for value in carry or ():
            put_varint(out, value)
        return bytes(out)
    if carry is not None:
        raise ValueError("a profile with context carry must be recorded in form 2 or 3")
    if len(m.fingerprint) != 32:
        raise ValueError("a JSON-profile model record needs the 32-byte fingerprint")
    prof = m.profile.encode("utf-8")
    out.append(FORM_JSON)
    out += m.fingerprint
    put_varint(out, len(name))
    out += name
    put_varint(out, len(prof))
    return bytes(out + prof)


def encode_small_index(index: Index, level: int = TABLE_LEVEL, *,
                       ext_area: bytes | None = None) -> bytes:
    """The 3.0 index of ``index``: plain, or one zstd frame when that is smaller.
    ``ext_area``: the archive extension area's bytes as given, not made from
    ``index.extensions`` and the entries (for tests and vectors of hostile archives)."""
    body = bytearray()
    creator = index.creator.encode("utf-8")
    if len(creator) > MAX_CREATOR_BYTES:
        raise ValueError("creator string too long")
    if any(e.tag == EXT_COMPACT_ENTRIES for e in index.extensions):
        raise ValueError("tag 0x8001 belongs to format 1.1")
    put_varint(body, len(creator))
    body += creator
    # 0x8002 follows the entries, whatever ``index`` read from an archive said
    exts = tuple(e for e in index.extensions if e.tag != EXT_LLM_BLOCKS)
    if any(e.codec_id == BLOCK_LLM and block_position(e) for e in index.entries):
        exts = (Extension(EXT_LLM_BLOCKS, b""), *exts)  # §12.6: declared when used
    ext = encode_ext_area(exts) if ext_area is None else ext_area
    put_varint(body, len(ext))
    body += ext
    if len(index.models) > MAX_MODELS:
        raise ValueError("too many models")
    put_varint(body, len(index.models))
    for m in index.models:
        body += encode_model(m)
    body += encode_body(index.entries, data_start=SMALL_HEADER_SIZE, small=True)
    plain = bytes((TABLE_PLAIN,)) + body
    if level and len(body) > 64:  # below that a frame's own bytes outweigh any gain
        head = bytearray((TABLE_ZSTD,))
        put_varint(head, len(body))
        packed = bytes(head) + zstandard.ZstdCompressor(
            level=level, write_content_size=False).compress(bytes(body))
        if len(packed) < len(plain):
            return packed
    return plain


# ---------------------------------------------------------------- decode


def _text(cur: _Body, limit: int, what: str) -> str:
    n = cur.varint(f"{what} length")
    if n > limit:
        raise CorruptArchiveError(f"{what} is {n} bytes, over the limit of {limit}")
    try:
        return cur.take(n, what).decode("utf-8")
    except UnicodeDecodeError:
        raise CorruptArchiveError(f"{what} is not valid UTF-8") from None


def _decode_model(cur: _Body, i: int) -> ModelRecord:
    """One record, checked as it is read (§12.3). A form-1 record becomes the profile it
    stands for, so the LLM codec reads both forms alike; its 16-byte fingerprint tells
    the codec to compare a prefix."""
    (form,) = cur.take(1, f"model {i} form")
    if form == FORM_JSON:
        fp = cur.take(32, f"model {i} fingerprint")
        name = _text(cur, MAX_MODEL_NAME_BYTES, f"model {i} name")
        prof = _text(cur, MAX_PROFILE_BYTES, f"model {i} numerics profile")
        parse_profile_json(prof, what=f"model {i} numerics profile")  # hostile: bounded
        return ModelRecord(fp, name, prof)
    if form not in (FORM_INTEGER, FORM_CARRY, FORM_MIX):
        raise UnsupportedFeatureError(f"model {i} uses record form {form}, which this "
                                      "reader does not know")
    fp = cur.take(SHORT_FINGERPRINT, f"model {i} fingerprint")
    name = _text(cur, MAX_MODEL_NAME_BYTES, f"model {i} name")
    engine, precision = cur.take(2, f"model {i} engine")
    if engine not in ENGINE_CODES:
        raise UnsupportedFeatureError(f"model {i} uses engine code {engine}, which this "
                                      f"reader does not know (it has {sorted(ENGINE_CODES)})")
    if not 12 <= precision <= 28:
        raise CorruptArchiveError(f"model {i}: precision {precision} out of range")
    length = cur.varint(f"model {i} segment length")
    if not 1 <= length <= 65536:
        raise CorruptArchiveError(f"model {i}: segment length {length} out of range")
    digests = cur.take(12, f"model {i} component digests")
    start = cur.varint(f"model {i} start token")
    if start > MAX_START_TOKEN:
        raise CorruptArchiveError(f"model {i}: start token {start} out of range")
    comps: dict[str, object] = {k: digests[4 * j:4 * j + 4].hex()
                                for j, k in enumerate(_COMPONENTS)}
    comps["start"] = start
    profile = {"engine": ENGINE_CODES[engine], "model": comps, "precision": precision,
               "segment_length": length}
    if form in (FORM_CARRY, FORM_MIX):
        carry = cur.varint(f"model {i} carry")
        if not 1 <= carry <= length:
            raise CorruptArchiveError(f"model {i}: carry {carry} out of range (1 to the "
                                      f"segment length {length})")
        chain = cur.varint(f"model {i} chain")
        if not 2 <= chain <= MAX_CHAIN:
            raise CorruptArchiveError(f"model {i}: chain {chain} out of range")
        profile.update(carry=carry, chain=chain)
    if form == FORM_MIX:
        mix = cur.varint(f"model {i} mix")
        if not 1 <= mix <= MAX_MIX_ORDER:
            raise CorruptArchiveError(f"model {i}: mix {mix} out of range (1 to "
                                      f"{MAX_MIX_ORDER})")
        if precision > MAX_MIX_PRECISION:
            raise CorruptArchiveError(f"model {i}: mixing needs a precision of at most "
                                      f"{MAX_MIX_PRECISION}, not {precision}")
        profile["mix"] = mix
    return ModelRecord(fp, name, canonical_json(profile))


def decode_small_index(raw: bytes, data_end: int) -> Index:
    """Parse a 3.0 index (``data_end``: its offset, where the data area ends)."""
    if not raw:
        raise CorruptArchiveError("index is empty (no encoding byte)")
    encoding = raw[0]
    if encoding == TABLE_PLAIN:
        size = len(raw) - 1
        source: Iterator[bytes] = iter((raw[1:],))
    elif encoding == TABLE_ZSTD:
        head = _Body(iter((raw[1:],)))
        size = head.varint("index body size")
        if size > MAX_INDEX_SIZE:
            raise CorruptArchiveError(f"index body of {size} bytes is over the limit")
        source = _inflate(raw[1 + head.tell():], size)
    else:
        raise UnsupportedFeatureError(f"index uses unknown encoding {encoding}")
    cur = _Body(source)
    creator = _text(cur, MAX_CREATOR_BYTES, "creator string")
    n = cur.varint("archive extension length")
    if n > MAX_ARCHIVE_EXT_BYTES:
        raise CorruptArchiveError(f"archive extension area of {n} bytes is over the limit")
    exts = decode_ext_area(cur.take(n, "archive extension area"), "archive",
                           frozenset({EXT_LLM_BLOCKS}))
    llm_blocks = next((e.value for e in exts if e.tag == EXT_LLM_BLOCKS), None)
    if llm_blocks:
        raise CorruptArchiveError("archive extension 0x8002 (LLM solid blocks) is not empty")
    n_models = cur.varint("model count")
    if n_models > MAX_MODELS:
        raise CorruptArchiveError(f"{n_models} models, over the limit of {MAX_MODELS}")
    models = [_decode_model(cur, i) for i in range(n_models)]
    entries = parse_body(cur, size, data_end, data_start=SMALL_HEADER_SIZE, small=True,
                         llm_blocks=llm_blocks is not None)
    return Index(creator, models, entries, exts)
