"""Seeded mutation fuzzing of the good container vectors (issue 8).

10,000 mutated archives go through open, members, read, test and (for some) extract. The
only acceptable outcomes are a typed error (an LlmarcError subclass) or correct bytes:
whatever a read returns must hash to the digest the archive itself records, and
extraction must not write outside its destination. Half of the mutations land in the
index with the index and footer CRCs recomputed, so they reach the parsers instead of
dying at the first checksum. Store/zstd archives only: LLM members need a model.
"""

from __future__ import annotations

import hashlib
import os
import random
import struct
import time
import zlib
from pathlib import Path

import pytest

import llmarc
from llmarc.errors import LlmarcError

VECTORS = Path(__file__).resolve().parent.parent / "spec" / "vectors" / "good"
CASES = 10_000
SEED = 20261129
#: Extract every n-th case (extraction creates directories: the slow part).
EXTRACT_EVERY = 10
#: Work per case is bounded by what the archive holds (format.md §9): every case may
#: decode at most this many bytes per byte of mutated archive (a zstd block's 128 KiB
#: per 4 bytes, §6.1), counted, not timed; the time of the slowest case is printed and
#: measured by benchmarks/hostile_costs.py.
MAX_OUTPUT_PER_BYTE = 32768


def _seeds() -> list[bytes]:
    seeds = []
    for path in sorted(VECTORS.glob("*.llma")):
        data = path.read_bytes()
        if len(data) < 200_000:  # keep each case cheap
            seeds.append(data)
    return seeds


def _small(data: bytes | bytearray) -> bool:
    """A format 3.0 archive (spec/format.md §12: 12-byte header, 8-byte trailer)?"""
    return len(data) >= 20 and data[8:10] == b"\x03\x00"


def _index_range(data: bytes | bytearray) -> tuple[int, int]:
    """(offset, size) of the index as the footer or trailer gives it."""
    if _small(data):
        (size,) = struct.unpack_from("<I", data, len(data) - 8)
        return len(data) - 8 - size, size
    off, size = struct.unpack_from("<QQ", data, len(data) - 40)
    return off, size


def _fix_crcs(data: bytearray) -> bytearray:
    """Recompute the index CRC and the footer CRC (if the footer still parses); for 3.0
    the trailer's CRC over header and index (if the trailer still fits)."""
    if _small(data):
        off, size = _index_range(data)
        if off >= 12:
            crc = zlib.crc32(data[off:off + size], zlib.crc32(data[:12]))
            struct.pack_into("<I", data, len(data) - 4, crc)
        return data
    if len(data) < 72:
        return data
    off, size = struct.unpack_from("<QQ", data, len(data) - 40)
    if off >= 32 and off + size + 40 == len(data):
        struct.pack_into("<I", data, len(data) - 16, zlib.crc32(data[off:off + size]))
        struct.pack_into("<I", data, len(data) - 4, zlib.crc32(data[len(data) - 40:-4]))
    return data


def mutate(rng: random.Random, seed: bytes) -> bytes:
    data = bytearray(seed)
    off, size = _index_range(data)
    in_index = rng.random() < 0.5 and size > 0
    lo, hi = (off, off + size) if in_index else (0, len(data))
    for _ in range(rng.choice((1, 1, 1, 2, 3, 8))):
        kind = rng.random()
        hi = min(hi, len(data))  # deletions shrink the archive
        if hi <= lo:
            break
        pos = rng.randrange(lo, hi)
        if kind < 0.45:
            data[pos] ^= 1 << rng.randrange(8)
        elif kind < 0.7:
            data[pos] = rng.choice((0x00, 0xFF, 0x7F, 0x80, 0x01, rng.randrange(256)))
        elif kind < 0.8 and pos + 8 <= hi:  # a hostile integer
            struct.pack_into("<Q", data, pos, rng.choice((0, 1, 2**31, 2**32 - 1, 2**63 - 1,
                                                          2**63, 2**64 - 1)))
        elif kind < 0.9 and not in_index:
            del data[pos:pos + rng.randrange(1, 16)]
        elif not in_index:
            data[pos:pos] = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 16)))
        else:
            data[pos] = rng.randrange(256)
    if in_index and len(data) == len(seed):
        _fix_crcs(data)
    return bytes(data)


def _check_member_bytes(info: llmarc.MemberInfo, data: bytes) -> None:
    """Correct bytes: the recorded size and the recorded SHA-256 (1.1 solid members
    record a CRC-32 instead, which the reader has checked; their sha256 is empty)."""
    assert len(data) == info.size
    if len(info.sha256) in (64, 32):  # 32 hex digits: a 3.0 DIGEST128 prefix
        assert hashlib.sha256(data).hexdigest().startswith(info.sha256)


def exercise(path: Path, dest: Path | None) -> None:
    with llmarc.open(path) as ar:
        members = ar.members()
        for m in members:
            if m.is_file():
                _check_member_bytes(m, ar.read(m.name))
        ar.test()
        if dest is not None:
            ar.extract(dest)
            for m in members:
                if m.is_file():
                    got = (dest / m.name).read_bytes()
                    _check_member_bytes(m, got)


def _count_decoded_bytes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Count every byte the zstd decoder hands to the reader (the only codec whose output
    can exceed its stored bytes here): a one-element list, reset per case."""
    from llmarc.codecs import zstd as zstd_codec

    total = [0]
    original = zstd_codec.decode

    def counting(chunks, size):
        for out in original(chunks, size):
            total[0] += len(out)
            yield out

    monkeypatch.setattr(zstd_codec, "decode", counting)
    return total


def test_fuzz_mutated_archives_give_only_typed_errors(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    seeds = _seeds()
    assert seeds
    rng = random.Random(SEED)
    path = tmp_path / "m.llma"
    outcomes: dict[str, int] = {}
    slowest = 0.0
    start = time.perf_counter()
    decoded = _count_decoded_bytes(monkeypatch)
    for case in range(CASES):
        seed = seeds[case % len(seeds)]
        data = mutate(rng, seed)
        path.write_bytes(data)
        dest = tmp_path / f"x{case}" if case % EXTRACT_EVERY == 0 else None
        t0 = time.perf_counter()
        decoded[0] = 0
        try:
            exercise(path, dest)
            outcome = "ok"
        except LlmarcError as exc:
            outcome = type(exc).__name__
        except Exception as exc:  # anything else is a bug: show the reproducer
            pytest.fail(f"case {case}: {type(exc).__name__}: {exc} (mutated archive "
                        f"{data.hex()[:400]}...)")
        slowest = max(slowest, time.perf_counter() - t0)  # reported, never asserted
        # read + test (+ extract): the members are decoded at most three times
        assert decoded[0] <= 3 * MAX_OUTPUT_PER_BYTE * len(data), (case, decoded[0])
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
        if dest is not None and dest.exists():
            for p in dest.rglob("*"):  # never outside dest, nothing world-writable
                assert p.resolve().is_relative_to(dest.resolve())
                if not p.is_symlink():
                    assert not os.lstat(p).st_mode & 0o002, p
    total = time.perf_counter() - start
    print(f"\nfuzz: {CASES} cases in {total:.1f} s, slowest {slowest:.3f} s: {outcomes}")
    assert sum(outcomes.values()) == CASES
    assert outcomes.get("ok", 0) > 0  # some mutations are harmless (mtime, shares, ...)
    assert len(outcomes) >= 3  # and the errors are of several kinds
