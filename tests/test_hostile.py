"""Hostile archives (issue 8): every class of attack gets a typed error, bounded work, or
the correct bytes; never a traceback, a hang, a world-writable file or a huge temp file."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

import llmarc
from llmarc.container.json_safe import (
    MAX_JSON_DEPTH,
    canonical_json,
    parse_profile_json,
)
from llmarc.container.layout import (
    EMPTY_SHA256,
    HEADER_SIZE,
    TYPE_DIR,
    TYPE_FILE,
    EntryRecord,
    Index,
    ModelRecord,
    assemble,
    crc32,
)
from llmarc.entropy.rangecoder import MAX_IMPLICIT_ZEROS, RangeDecoder, RangeEncoder
from llmarc.errors import CorruptArchiveError

MTIME = 1_700_000_000_000_000_000


def sha(data: bytes) -> bytes:
    import hashlib

    return hashlib.sha256(data).digest()


def archive(files: list[tuple[str, bytes]], *, dirs: tuple[str, ...] = (), mode: int = 0o644,
            dir_mode: int = 0o755, models: tuple[ModelRecord, ...] = (),
            creator: str = "test") -> bytes:
    """A store-codec archive of ``files`` (and directories), built without validation."""
    data = bytearray()
    entries = [EntryRecord(d, TYPE_DIR, dir_mode, MTIME, 0, 0, b"", 0, 0, EMPTY_SHA256, 0)
               for d in dirs]
    for name, content in files:
        entries.append(EntryRecord(name, TYPE_FILE, mode, MTIME, len(content), 0, b"",
                                   HEADER_SIZE + len(data), len(content), sha(content),
                                   crc32(content)))
        data += content
    return assemble(bytes(data), Index(creator, list(models), entries))


def write(tmp_path: Path, data: bytes, name: str = "a.llma") -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


def run_cli(*args: str) -> tuple[int, str, str]:
    """Run the CLI in-process; return (exit code, stdout, stderr)."""
    import contextlib
    import io

    from llmarc.cli import run

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(list(args))
    return code, out.getvalue(), err.getvalue()


COMMANDS = (("list",), ("list", "--json"), ("info",), ("test", "-q"))


def every_command(path: Path, dest: Path) -> list[tuple[int, str, str]]:
    results = [run_cli(*cmd[:1], str(path), *cmd[1:]) for cmd in COMMANDS]
    results.append(run_cli("extract", "-q", str(path), "-C", str(dest)))
    return results


# --------------------------------------------------------------------------- range decoder


def test_range_decoder_stops_at_the_end_of_its_stream() -> None:
    """A 4-byte stream and a near-certain table: decoding used to read zeros forever
    (bounded only by a claimed token count); it now fails within the stream's bound."""
    precision, vocab = 24, 256
    table = np.ones(vocab, dtype=np.int64)
    table[0] = (1 << precision) - (vocab - 1)
    cumulative = np.cumsum(table)
    decoder = RangeDecoder(b"\x00\x00\x00\x01", precision)
    bits = -math.log2(table[0] / (1 << precision))
    bound = math.floor(8 * (4 + MAX_IMPLICIT_ZEROS) / bits) + 1
    count = 0
    with pytest.raises(CorruptArchiveError, match="past the end"):
        while True:
            decoder.decode_cumulative(cumulative)
            count += 1
            assert count <= bound
    assert count > 1000  # it did decode the symbols the stream really holds


def test_range_coder_roundtrip_with_a_long_zero_tail() -> None:
    """Streams whose value ends in many 0x00 bytes keep all but the last 7, so the
    decoder never needs more than 7 implicit zeros and still decodes every symbol."""
    precision = 12
    table = np.array([1 << 11, 1 << 11], dtype=np.int64)
    for count in (7, 8, 9, 64, 200):
        encoder = RangeEncoder(precision)
        for _ in range(count):
            encoder.encode_symbol(table, 0)
        stream = encoder.finish()
        decoder = RangeDecoder(stream, precision)
        assert [decoder.decode(table) for _ in range(count)] == [0] * count
        if count >= 8:
            assert stream and set(stream) == {0}
            with pytest.raises(CorruptArchiveError):  # one byte less is refused
                short = RangeDecoder(stream[:-1], precision)
                for _ in range(count):
                    short.decode(table)


# --------------------------------------------------------------------------- hostile JSON


HOSTILE_JSON = {
    "nan": '{"a":NaN}',
    "infinity": '{"a":Infinity}',
    "minus-infinity": '{"a":-Infinity}',
    "overflow": '{"a":1e400}',
    "huge-int": '{"a":' + "9" * 5000 + "}",
    "int-over-i64": '{"a":9223372036854775808}',
    "deep-array": '{"a":' + "[" * 5000 + "]" * 5000 + "}",
    "deep-object": '{"a":' + '{"a":' * 3000 + "1" + "}" * 3000 + "}",
    "not-object": "[1,2]",
    "string": '"x"',
    "number": "1",
    "null": "null",
    "truncated": '{"a":',
    "duplicate": '{"a":1,"a":1}',
    "not-canonical": '{"b":1, "a":2}',
    "too-big": '{"a":"' + "x" * 70000 + '"}',
    "lone-surrogate": '{"a":"\\ud800"}',
}


@pytest.mark.parametrize("name", sorted(HOSTILE_JSON))
def test_parse_profile_json_rejects(name: str) -> None:
    with pytest.raises(CorruptArchiveError):
        parse_profile_json(HOSTILE_JSON[name])


def test_parse_profile_json_accepts_canonical_objects() -> None:
    profile = {"batch_width": 8, "dtype": "float32", "eps": 1e-05, "name": "名前",
               "nested": {"x": [1, 2, {"y": None}]}, "ok": True}
    text = canonical_json(profile)
    assert text.isascii()  # one canonical form: non-ASCII as \\u escapes
    assert parse_profile_json(text) == profile
    assert parse_profile_json(text.encode()) == profile
    depth_ok = '{"a":' + "[" * (MAX_JSON_DEPTH - 1) + "]" * (MAX_JSON_DEPTH - 1) + "}"
    assert parse_profile_json(depth_ok)
    assert parse_profile_json('{"b":1, "a":2}', canonical=False) == {"a": 2, "b": 1}


def test_deep_json_is_rejected_quickly() -> None:
    text = '{"a":' + "[" * 30000 + "]" * 30000 + "}"
    start = time.perf_counter()
    with pytest.raises(CorruptArchiveError, match="nested"):
        parse_profile_json(text)
    assert time.perf_counter() - start < 1.0


@pytest.mark.parametrize("name", ["nan", "overflow", "deep-array", "not-object",
                                  "huge-int", "duplicate"])
def test_hostile_profile_gives_one_error_line_from_every_command(name: str,
                                                                 tmp_path: Path) -> None:
    model = ModelRecord(bytes(32), "m", HOSTILE_JSON[name])
    path = write(tmp_path, archive([("a.txt", b"hello")], models=(model,)))
    for code, _out, err in every_command(path, tmp_path / "out"):
        assert code == 1
        assert err.startswith("llmarc: error: model 0 numerics profile"), err
        assert err.count("\n") == 1 and "Traceback" not in err
    with pytest.raises(CorruptArchiveError):
        llmarc.open(path)
    assert not (tmp_path / "out" / "a.txt").exists()
