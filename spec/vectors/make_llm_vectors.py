#!/usr/bin/env python3
"""Generate the LLM codec's archive vectors (spec/vectors/llm/) with the tiny fixture models.

    python spec/vectors/make_llm_vectors.py

The tiny models' weights ship in fixtures/, so anyone can rerun these; decoding them
bit-exactly needs the reference engine (llmarc/inference/engine.py) on a CPU in float32.
Files are written with fixed names, bytes and mtimes; manifest.json lists each vector
with the model to decode it with and the expected member SHA-256s or error class.
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
from llmarc.container.layout import assemble, canonical_json, crc32, disassemble  # noqa: E402

OUT = HERE / "llm"
MTIME_NS = 1_700_000_000_000_000_000
MODELS = {"bpe": "fixtures/tiny-llama-bpe", "sp": "fixtures/tiny-llama-sp"}
FILES = {
    "poem.txt": "The quick brown fox jumps over the lazy dog.\r\n"
    "Été: naïve café, 日本語, emoji 😀.\n".encode() * 3,
    "bytes.txt": b"tabs\tand NUL \x00 and invalid \xff\xfe utf-8\n",
    "notes/one.txt": b"x",
}


def pack_tiny(model: str, workdir: Path) -> bytes:
    src = workdir / f"src-{model}"
    for name, data in FILES.items():
        path = src / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        os.utime(path, ns=(MTIME_NS, MTIME_NS))
    os.utime(src / "notes", ns=(MTIME_NS, MTIME_NS))
    out = workdir / f"{model}.llma"
    options = llmarc.LLMOptions(model=str(ROOT / MODELS[model]), device="cpu", threads=1,
                                segment_length=48, batch_width=4)
    llmarc.pack(src, out, codec="llm", llm=options, warn=lambda message: None)
    return out.read_bytes()


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


def set_params(archive: bytes, name: str, params: bytes) -> bytes:
    def change(index) -> None:
        index.entries = [replace(e, codec_params=params) if e.name == name else e
                         for e in index.entries]

    return with_index(archive, change)


def main() -> None:
    manifest: dict[str, dict] = {}
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        made = {m: pack_tiny(m, Path(tmp)) for m in MODELS}
    members = {name: hashlib.sha256(data).hexdigest() for name, data in FILES.items()}
    vectors = {
        "good-tiny-bpe.llma": (made["bpe"], "bpe", None,
                               "three text members LLM-coded with the byte-level BPE tiny model"),
        "good-tiny-sp.llma": (made["sp"], "sp", None,
                              "the same members coded with the SentencePiece tiny model"),
        "bad-model-mismatch.llma": (made["bpe"], "sp", "ModelMismatchError",
                                    "decoded with the other tiny model: refused, naming both"),
        "bad-stream-byte.llma": (flip_stream_byte(made["bpe"], "poem.txt"), "bpe",
                                 "CorruptArchiveError",
                                 "last byte of an llm stream flipped, stored CRC fixed up"),
        "bad-model-index.llma": (set_params(made["bpe"], "poem.txt", b"\x07\x00"), "bpe",
                                 "CorruptArchiveError", "codec params name model 7 of 1"),
        "bad-params-length.llma": (set_params(made["bpe"], "poem.txt", b"\x00"), "bpe",
                                   "CorruptArchiveError", "codec params of 1 byte, not 2"),
        "bad-batch-width.llma": (set_profile(made["bpe"], batch_width=0), "bpe",
                                 "CorruptArchiveError", "profile batch_width 0"),
        "bad-huge-segment.llma": (set_profile(made["bpe"], segment_length=10**9), "bpe",
                                  "CorruptArchiveError",
                                  "profile segment_length 10^9 (refused before allocating)"),
        "unsupported-engine.llma": (set_profile(made["bpe"], engine="lockstep-v9"), "bpe",
                                    "UnsupportedFeatureError", "profile engine lockstep-v9"),
    }
    OUT.mkdir(exist_ok=True)
    for old in OUT.glob("*.llma"):
        old.unlink()
    for name, (data, model, error, why) in vectors.items():
        (OUT / name).write_bytes(data)
        entry = {"model": MODELS[model], "why": why}
        if error is None:
            entry["members"] = members
        else:
            entry["error"] = error
        manifest[name] = entry
        lines.append(f"* `{name}` — {why} (decode with `{MODELS[model]}`) → "
                     + (f"`{error}`" if error else "every member's SHA-256 as listed"))
    (OUT / "manifest.json").write_text(json.dumps(manifest, indent=1, sort_keys=True) + "\n")
    readme = [
        "# LLM codec archive vectors",
        "",
        "Generated by `python spec/vectors/make_llm_vectors.py` with the tiny seeded LLaMA "
        "models in `fixtures/` (their weights are in the repository), float32 on a CPU, "
        "1 thread, L = 48, B = 4. `manifest.json` gives, per file, the model folder to "
        "decode with and either the SHA-256 of every member or the error class; "
        "`tests/test_llm_vectors.py` runs them all. Decoding the good ones bit-exactly "
        "needs the reference engine (spec/llm-codec.md §5); the entropy layers alone are "
        "covered model-free by `../entropy/`.",
        "",
        *lines,
        "",
    ]
    (OUT / "README.md").write_text("\n".join(readme))
    print(f"wrote {len(vectors)} vectors to {OUT}")


if __name__ == "__main__":
    main()
