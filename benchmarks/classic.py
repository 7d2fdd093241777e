"""Classic compressors, each run in-process at its strongest common setting.

Every compressor's output is decompressed and compared with the input, so a row can
never report a size for a lossy or broken run.  Sizes are whole compressed streams
(headers included), as a user would store them.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import zstandard

PPMD_ORDER, PPMD_MEMORY = 16, 256 << 20
ZSTD_LONG_WINDOW_LOG = 27  # what `zstd --long` selects


@dataclass(frozen=True)
class Compressor:
    name: str  # the row label, with its setting
    compress: Callable[[bytes], bytes]
    decompress: Callable[[bytes, int], bytes]


def _zstd(level: int, long: bool = False) -> Compressor:
    def compress(data: bytes) -> bytes:
        if long:
            params = zstandard.ZstdCompressionParameters.from_level(
                level, source_size=len(data), window_log=ZSTD_LONG_WINDOW_LOG, enable_ldm=True)
            return zstandard.ZstdCompressor(compression_params=params).compress(data)
        return zstandard.ZstdCompressor(level=level).compress(data)

    def decompress(blob: bytes, size: int) -> bytes:
        return zstandard.ZstdDecompressor(max_window_size=1 << 31).decompress(
            blob, max_output_size=size)

    name = f"zstd --ultra -{level} --long" if long else f"zstd -{level}"
    return Compressor(name, compress, decompress)


def _ppmd() -> Compressor:
    """PPMd variant I (PPMd8, as in RAR/7-Zip's .ppmd), raw stream, no header."""
    import pyppmd

    def compress(data: bytes) -> bytes:
        encoder = pyppmd.Ppmd8Encoder(PPMD_ORDER, PPMD_MEMORY,
                                      pyppmd.PPMD8_RESTORE_METHOD_RESTART)
        return encoder.encode(data) + encoder.flush()

    def decompress(blob: bytes, size: int) -> bytes:
        decoder = pyppmd.Ppmd8Decoder(PPMD_ORDER, PPMD_MEMORY,
                                      pyppmd.PPMD8_RESTORE_METHOD_RESTART)
        return decoder.decode(blob, size)  # the size travels out of band, as in .7z

    return Compressor(f"PPMd var.I -o{PPMD_ORDER} (pyppmd)", compress, decompress)


def _brotli() -> Compressor:
    import brotli

    return Compressor("brotli -q 11", lambda d: brotli.compress(d, quality=11),
                      lambda b, _n: brotli.decompress(b))


def _zpaq() -> Compressor:
    import zpaq

    return Compressor("ZPAQ -m5 (zpaq)", lambda d: zpaq.compress(d, level=5, threads=1),
                      lambda b, _n: zpaq.decompress(b))


def reference_compressors() -> list[Compressor]:
    """The two rows the binaries table shows beside llmarc's fallback."""
    return [c for c in compressors() if c.name in ("xz -9e", "zstd -19")]


def compressors() -> list[Compressor]:
    """All classic rows, weakest family first."""
    return [
        Compressor("gzip -9", lambda d: gzip.compress(d, 9, mtime=0),
                   lambda b, _n: gzip.decompress(b)),
        Compressor("bzip2 -9", lambda d: bz2.compress(d, 9), lambda b, _n: bz2.decompress(b)),
        Compressor("xz -9e", lambda d: lzma.compress(d, preset=9 | lzma.PRESET_EXTREME),
                   lambda b, _n: lzma.decompress(b)),
        _zstd(19),
        _zstd(22, long=True),
        _brotli(),
        _ppmd(),
        _zpaq(),
    ]


def run_classic(name: str, data: bytes, compressor: Compressor) -> dict[str, Any]:
    """Compress, check the roundtrip byte for byte, and report the size.

    A failed roundtrip is reported as such (``compressed`` None), never as a size:
    pyppmd 1.3 fails to decode some binaries it encoded (fireworks.jpeg, paper-100k.pdf)."""
    started = time.perf_counter()
    blob = compressor.compress(data)
    seconds = time.perf_counter() - started
    try:
        ok = compressor.decompress(blob, len(data)) == data
    except ValueError:
        ok = False
    return {"compressor": compressor.name, "input": name,
            "compressed": len(blob) if ok else None, "seconds": seconds}
