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


def decode(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Decode one frame that must produce exactly ``size`` bytes and fill its payload."""
    dobj = zstandard.ZstdDecompressor(max_window_size=MAX_WINDOW).decompressobj()
    produced = 0
    try:
        for chunk in chunks:
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
