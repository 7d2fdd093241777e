"""``--codec auto``: pick a codec for one regular file.

Today: binary and text both go to zstd unless zstd does not make the file smaller, in
which case the file is stored. Text detection is here already because the LLM codec will
take text entries (the packer's plan step is the seam where it plugs in).
"""

from __future__ import annotations

from collections.abc import Iterable

from . import zstd

SAMPLE_SIZE = 64 * 1024
#: Level used to decide whether zstd helps at all (fast; the real encode uses --level).
PROBE_LEVEL = 3


def is_text(sample: bytes) -> bool:
    """True if ``sample`` looks like text: no NUL bytes, almost all valid UTF-8, few controls."""
    if not sample:
        return False
    if b"\0" in sample:
        return False
    text = sample.decode("utf-8", errors="replace")
    # A multi-byte character cut at the end of the sample is not a sign of binary data.
    bad = text[:-4].count("\ufffd") if len(sample) == SAMPLE_SIZE else text.count("\ufffd")
    if bad > len(text) // 100:
        return False
    controls = sum(1 for ch in text if ord(ch) < 32 and ch not in "\t\n\r\f\v\x1b")
    return controls <= len(text) // 100


def zstd_shrinks(chunks: Iterable[bytes], size: int) -> bool:
    """True if a fast zstd pass over the data makes it strictly smaller."""
    if size == 0:
        return False
    return zstd.compressed_size(chunks, PROBE_LEVEL, size) < size


def choose(sample: bytes, size: int, chunks: Iterable[bytes], allowed: frozenset[str]) -> str:
    """The codec name for a file of ``size`` bytes whose first bytes are ``sample``.

    ``chunks`` yields the whole file (only consumed when the answer depends on it);
    ``allowed`` is the set of codec names the caller can use ("store", "zstd", later "llm").
    """
    if size == 0:
        return "store"
    if "llm" in allowed and is_text(sample):
        return "llm"
    if "zstd" in allowed and zstd_shrinks(chunks, size):
        return "zstd"
    return "store"
