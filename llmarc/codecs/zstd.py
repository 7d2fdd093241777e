"""Codec 1, zstd: the payload is one standard zstd frame (RFC 8878).

Encoding streams chunks through a compressor; decoding feeds the frame to the decoder in
small pieces so a hostile frame can never make one call produce more than a few tens of
MiB, and stops as soon as the output passes the declared size.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import zstandard

from ..errors import CorruptArchiveError

MIN_LEVEL = 1
MAX_LEVEL = 22
#: Decoders refuse frames whose window is larger than this (zstd's own default limit).
MAX_WINDOW = 1 << 27
#: No zstd frame decodes to more than this many bytes per byte of frame: every block
#: (3-byte header + at least 1 byte of content) yields at most 128 KiB (RFC 8878 §3.1.1.2.4,
#: Block_Maximum_Size), i.e. at most 32,768 bytes per 4 frame bytes. A size claim above
#: MAX_EXPANSION x stored size is corrupt before anything is decoded, so the output (and
#: any temporary file) is bounded by the archive's real size, not by what it claims.
MAX_EXPANSION = 1 << 15
FRAME_MAGIC = b"\x28\xb5\x2f\xfd"
#: Input fed per decompress call: at most ~32768x expansion per zstd block, so this caps one
#: call's output at ~64 MiB even for a hostile frame.
_FEED = 2048


def compressor(level: int, size_hint: int = 0) -> zstandard.ZstdCompressor:
    """A compressor for ``level`` tuned for about ``size_hint`` input bytes (0 = unknown)."""
    if not MIN_LEVEL <= level <= MAX_LEVEL:
        raise ValueError(f"zstd level must be in {MIN_LEVEL}..{MAX_LEVEL}, not {level}")
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=max(0, size_hint), write_content_size=False, write_checksum=False,
        threads=0)
    return zstandard.ZstdCompressor(compression_params=params)


def encode(chunks: Iterable[bytes], level: int, size_hint: int = 0) -> Iterator[bytes]:
    """Compress the concatenation of ``chunks`` into one frame, yielding its bytes."""
    cobj = compressor(level, size_hint).compressobj()
    for chunk in chunks:
        out = cobj.compress(chunk)
        if out:
            yield out
    yield cobj.flush()


def encode_solid(members: Iterable[Iterable[bytes]], level: int, size_hint: int,
                 shares: list[int]) -> Iterator[bytes]:
    """Compress several members into one frame (a solid block), flushing a zstd block at
    the end of each member so ``shares`` receives the exact number of frame bytes each
    member produced (they sum to the frame size; the last one includes the epilogue)."""
    cobj = compressor(level, size_hint).compressobj()
    for member in members:
        n = 0
        for chunk in member:
            out = cobj.compress(chunk)
            n += len(out)
            if out:
                yield out
        out = cobj.flush(zstandard.COMPRESSOBJ_FLUSH_BLOCK)
        shares.append(n + len(out))
        yield out
    out = cobj.flush()
    if shares:
        shares[-1] += len(out)
    else:
        shares.append(len(out))
    yield out


def check_claim(size: int, stored_size: int, what: str) -> None:
    """Refuse a frame of ``stored_size`` bytes claiming to decode to ``size`` bytes when no
    zstd frame can expand that much (CorruptArchiveError)."""
    if size > MAX_EXPANSION * stored_size:
        raise CorruptArchiveError(
            f"{what} claims {size} bytes from a {stored_size}-byte zstd frame, more than "
            f"any zstd frame can hold ({MAX_EXPANSION} bytes per byte)")


def check_header(head: bytes, size: int) -> None:
    """Check a frame's header before decoding: a zstd frame (no skippable frame), a
    window within MAX_WINDOW, and a declared content size, if present, equal to ``size``.
    A frame declaring 2^63 bytes thus fails here, before any output exists."""
    if len(head) >= 4 and head[:4] != FRAME_MAGIC:  # also refuses skippable frames
        raise CorruptArchiveError("zstd payload is not a zstd frame")
    try:
        params = zstandard.get_frame_parameters(head[:18])
    except zstandard.ZstdError:
        return  # header cut short or invalid: the decoder reports it as corrupt
    if params.window_size > MAX_WINDOW:
        raise CorruptArchiveError(
            f"zstd frame window of {params.window_size} bytes exceeds {MAX_WINDOW}")
    if params.content_size != zstandard.CONTENTSIZE_UNKNOWN and params.content_size != size:
        relation = "more than" if params.content_size > size else "not"
        raise CorruptArchiveError(
            f"zstd frame declares {params.content_size} bytes, {relation} the recorded {size}")


def decode(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Decode one frame that must produce exactly ``size`` bytes and fill its payload.

    Its header is checked first (``check_header``); no output past ``size`` is ever
    yielded (the overflowing piece raises instead). Each decompress call gets at most
    _FEED bytes of a chunk, so it yields at most that many x 32,768 bytes (smaller
    chunks, smaller pieces)."""
    dobj = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).decompressobj()
    produced = 0
    first = True
    try:
        for chunk in chunks:
            if first and chunk:
                check_header(chunk, size)
                first = False
            for i in range(0, len(chunk), _FEED):
                if dobj.eof:
                    raise CorruptArchiveError("zstd payload has bytes after the frame")
                out = dobj.decompress(chunk[i:i + _FEED])
                if out:
                    produced += len(out)
                    if produced > size:
                        raise CorruptArchiveError(
                            f"zstd payload decodes to more than the declared {size} bytes")
                    yield out
        if not dobj.eof:
            raise CorruptArchiveError("zstd payload is truncated (incomplete frame)")
        if dobj.unused_data:
            raise CorruptArchiveError("zstd payload has bytes after the frame")
    except zstandard.ZstdError as exc:
        raise CorruptArchiveError(f"zstd payload is corrupt: {exc}") from None
    if produced != size:
        raise CorruptArchiveError(
            f"zstd payload decodes to {produced} bytes, not the declared {size}")


def compressed_size(chunks: Iterable[bytes], level: int, size_hint: int = 0) -> int:
    """The size of the frame ``encode`` would produce (nothing is kept)."""
    return sum(len(b) for b in encode(chunks, level, size_hint))
