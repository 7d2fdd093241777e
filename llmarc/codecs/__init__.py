"""Per-entry codecs and the codec id registry (spec/format.md, "Codecs").

========  =======  ==========================================================
id        name     payload
========  =======  ==========================================================
0         store    the original bytes
1         zstd     one standard zstd frame (params empty: this entry alone;
                   params = u64 skip + u64 share: a member of a solid block)
2         llm      spec/llm-codec.md (batched; see llmarc/codecs/llm.py)
========  =======  ==========================================================

The store and zstd codecs stream (bounded memory); the llm codec is batch-encoded by the
packer and batch-decoded by the reader (``ArchiveReader._decode_llm``).
"""

from __future__ import annotations

CODEC_STORE = 0
CODEC_ZSTD = 1
CODEC_LLM = 2

CODEC_NAMES: dict[int, str] = {CODEC_STORE: "store", CODEC_ZSTD: "zstd", CODEC_LLM: "llm"}
CODEC_IDS: dict[str, int] = {name: cid for cid, name in CODEC_NAMES.items()}

#: Codecs whose payloads the container layer encodes/decodes as streams.
STREAMING_CODECS = frozenset({CODEC_STORE, CODEC_ZSTD})


def codec_name(codec_id: int) -> str:
    """The name of a codec id; unknown ids get a stable placeholder like ``"#7"``."""
    name = CODEC_NAMES.get(codec_id)  # not .get(id, f"..."): that formats on every call
    return name if name is not None else f"#{codec_id}"


__all__ = ["CODEC_IDS", "CODEC_LLM", "CODEC_NAMES", "CODEC_STORE", "CODEC_ZSTD",
           "STREAMING_CODECS", "codec_name"]
