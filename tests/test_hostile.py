"""Hostile archives (issue 8): every class of attack gets a typed error, bounded work, or
the correct bytes; never a traceback, a hang, a world-writable file or a huge temp file."""

from __future__ import annotations

import json
import math
import stat
import time
from pathlib import Path

import numpy as np
import pytest
import zstandard

import llmarc
from llmarc.container.index import assemble
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


def test_deep_json_is_rejected_before_any_recursive_parsing(monkeypatch) -> None:
    """30,000-deep JSON: refused by the depth scan, never handed to the recursive
    ``json.loads`` (which would hit the recursion limit or the stack), and with no
    recursion of its own (it runs under a recursion limit a few frames above this one)."""
    import json as json_module
    import sys

    from llmarc.container import json_safe

    calls: list[int] = []
    loads = json_module.loads  # json_safe.json is the json module itself

    def counting_loads(*args, **kwargs):
        calls.append(1)
        return loads(*args, **kwargs)

    monkeypatch.setattr(json_safe.json, "loads", counting_loads)
    text = '{"a":' + "[" * 30000 + "]" * 30000 + "}"
    frames = 0
    frame = sys._getframe()
    while frame is not None:
        frames, frame = frames + 1, frame.f_back
    limit = sys.getrecursionlimit()
    sys.setrecursionlimit(frames + 50)
    try:
        with pytest.raises(CorruptArchiveError, match="nested"):
            parse_profile_json(text)
    finally:
        sys.setrecursionlimit(limit)
    assert calls == []
    assert parse_profile_json('{"a":[[1]]}') == {"a": [[1]]} and calls == [1]  # the spy works


def python_lines(fn, *args) -> int:
    """How many lines of llmarc's Python ``fn(*args)`` executes: a measure of work that
    does not depend on the machine's speed or load (timing on 2 shared cores did)."""
    import sys

    count = 0

    def local(frame, event, arg):
        nonlocal count
        if event == "line":
            count += 1
        return local

    def tracer(frame, event, arg):
        return local if "/llmarc/" in frame.f_code.co_filename else None

    sys.settrace(tracer)
    try:
        fn(*args)
    finally:
        sys.settrace(None)
    return count


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


# --------------------------------------------------------------------------- bounded costs


def test_deep_names_are_checked_in_linear_time() -> None:
    """600-deep names (a 2.5 MB index) made the below-a-file check quadratic."""
    from llmarc.safety import check_names

    names = [("/".join(["d"] * 600) + f"/{i}", False) for i in range(2000)]
    check_names(names)
    with pytest.raises(llmarc.UnsafeArchiveError, match="lies inside"):
        check_names([*names, ("/".join(["d"] * 300), False)])

    def deep(depth: int) -> list[tuple[str, bool]]:
        return [("/".join(["d"] * depth) + f"/{i}", False) for i in range(200)]

    # Work grows linearly with the depth: in Python lines run, and in this thread's CPU
    # time (a ratio of two runs, so the machine's speed and load cancel; checking every
    # prefix, quadratic in C string work, made it 11x for 4x the depth, linear is 3.6x).
    # The time of the 600-deep case is a benchmark (benchmarks/hostile_costs.py).
    shallow, twice = python_lines(check_names, deep(150)), python_lines(check_names, deep(300))
    assert twice <= 2.2 * shallow, (shallow, twice)
    assert cpu_ratio(check_names, deep(200), deep(800)) < 7, "superlinear in the depth"


def cpu_ratio(fn, small, large) -> float:
    """CPU time of ``fn(large)`` over ``fn(small)`` in this thread (best of three each):
    waiting for a core does not count, and the machine's speed cancels out."""
    def best(arg) -> float:
        times = []
        for _ in range(3):
            start = time.thread_time()
            fn(arg)
            times.append(time.thread_time() - start)
        return max(min(times), 1e-6)

    return best(large) / best(small)


@pytest.mark.parametrize("names, bad", [
    (["a", "a/b"], ("a/b", "a")),
    (["a/b", "a"], ("a/b", "a")),
    (["a", "a-b", "a.c", "a/b/c"], ("a/b/c", "a")),
    (["x/y", "x/y/z", "x/y0"], ("x/y/z", "x/y")),
    (["a", "ab", "a b", "b/a"], None),
])
def test_member_below_file(names: list[str], bad: tuple[str, str] | None) -> None:
    from llmarc.safety import member_below_file

    assert member_below_file([(n, False) for n in names]) == bad
    assert member_below_file([(n, True) for n in names]) is None  # directories may hold


def _listing_lines(path: Path, expected_lines: int) -> int:
    """Python lines of llmarc run by ``llmarc list`` on ``path`` (checked to succeed)."""
    result: list[tuple[int, str, str]] = []
    lines = python_lines(lambda: result.append(run_cli("list", str(path))))
    code, out, err = result[0]
    assert code == 0, err
    assert out.count("\n") == expected_lines + 1  # the listing's total line
    return lines


def test_deep_names_archive_lists_in_linear_work(tmp_path: Path) -> None:
    """Listing deep names: the work (Python lines run) grows at most linearly with the
    depth; the 600-deep, 2,000-name case is timed by benchmarks/hostile_costs.py."""
    counts = []
    for depth in (150, 300):
        files = [("/".join(["d"] * depth) + f"/{i}", b"") for i in range(200)]
        counts.append(_listing_lines(write(tmp_path, archive(files), f"{depth}.llma"), 201))
    assert counts[1] <= 2.2 * counts[0], counts


def test_listing_work_is_linear_in_the_entry_count(tmp_path: Path) -> None:
    """Twice the entries, at most about twice the work (a quadratic step in the index,
    name checks or listing would show as 4x); 20,000 entries are timed by
    benchmarks/hostile_costs.py."""
    counts = []
    for n in (1000, 2000):
        files = [(f"dir{i % 50}/file-{i:05d}.txt", b"") for i in range(n)]
        counts.append(_listing_lines(write(tmp_path, archive(files), f"{n}.llma"), n + 1))
    assert counts[1] <= 2.2 * counts[0], counts


def _zstd_archive(frame: bytes, size: int, content: bytes = b"") -> bytes:
    entry = EntryRecord("z", TYPE_FILE, 0o644, MTIME, size, 1, b"", HEADER_SIZE, len(frame),
                        sha(content), crc32(frame))
    return assemble(frame, Index("test", [], [entry]))


def test_zstd_frame_declaring_2_63_bytes_fails_before_output(tmp_path: Path) -> None:
    """A small frame whose header declares 2^63 bytes, recorded as 2^63 - 1: refused at
    open (no frame of this size can hold that much), not after a 4 GiB temp file."""
    body = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(
        b"\0" * (1 << 22))
    huge = _zstd_archive(body, 2**63 - 1)
    path = write(tmp_path, huge)
    with pytest.raises(CorruptArchiveError, match="more than any zstd frame"):
        llmarc.open(path)
    for code, _out, err in every_command(path, tmp_path / "out"):
        assert code == 1 and err.startswith("llmarc: error:")
    assert not any((tmp_path / "out").rglob("*")) if (tmp_path / "out").exists() else True


def test_zstd_frame_header_size_must_match_the_record(tmp_path: Path) -> None:
    """A plausible claim (within the expansion bound) but a frame header declaring more:
    refused from the header, before any byte is decoded or written."""
    content = b"\0" * 5000
    frame = zstandard.ZstdCompressor(level=19, write_content_size=True).compress(
        content * 100)
    path = write(tmp_path, _zstd_archive(frame, len(content), content))
    with llmarc.open(path) as ar, pytest.raises(CorruptArchiveError, match="declares"):
        ar.read("z")
    with llmarc.open(path) as ar, pytest.raises(CorruptArchiveError):
        ar.extract(tmp_path / "out")
    assert list((tmp_path / "out").iterdir()) == []


def test_zstd_decoder_never_yields_past_the_recorded_size() -> None:
    from llmarc.codecs import zstd as zstd_codec

    frame = zstandard.ZstdCompressor(level=3, write_content_size=False).compress(
        b"\0" * (8 << 20))
    got = 0
    with pytest.raises(CorruptArchiveError, match="more than"):
        for piece in zstd_codec.decode([frame], 1000):
            got += len(piece)
    assert got <= 1000


# --------------------------------------------------------------------------- terminal text


@pytest.mark.parametrize("name", ["[/x]", "[red]x[/red]", "[bold]b", "a]b[", "[link=x]y"])
def test_markup_in_names_is_literal(name: str, tmp_path: Path) -> None:
    path = write(tmp_path, archive([(name, b"1")]))
    code, out, err = run_cli("list", str(path))
    assert code == 0, err
    assert name in out
    code, out, _ = run_cli("list", "--json", str(path))
    assert json.loads(out)[0]["name"] == name


def test_creator_and_model_escapes_are_made_visible(tmp_path: Path) -> None:
    creator = "evil\x1b[2J\x1b]0;pwned\x07\n\u202efake"
    model = ModelRecord(bytes(32), "m\x1b[31mred\x9b", canonical_json({"a": "\x1b"}))
    path = write(tmp_path, archive([("a.txt", b"1")], models=(model,), creator=creator))
    code, out, err = run_cli("info", str(path))
    assert code == 0, err
    assert "\x1b" not in out and "\x07" not in out and "\x9b" not in out
    assert "\u202e" not in out
    assert "evil\\x1b[2J\\x1b]0;pwned\\x07\\x0a\\u202efake" in out
    assert "m\\x1b[31mred\\x9b" in out


def test_names_in_json_listing_have_no_terminal_controls(tmp_path: Path) -> None:
    name = "bidi\u202etxt.exe\u2028x"  # printable checks pass at open; not on a terminal
    path = write(tmp_path, archive([(name, b"1")]))
    code, out, _ = run_cli("list", "--json", str(path))
    assert code == 0
    assert "\u202e" not in out and "\u2028" not in out
    assert json.loads(out)[0]["name"] == name
    code, out, _ = run_cli("list", str(path))
    assert "\u202e" not in out and "bidi\\u202etxt.exe\\u2028x" in out


def test_error_messages_escape_archive_text(tmp_path: Path) -> None:
    path = write(tmp_path, archive([("ok", b"1")]))
    code, _out, err = run_cli("extract", str(path), "missing\x1b]0;x\x07", "-C",
                              str(tmp_path / "o"))
    assert code == 1 and "\x1b" not in err and "\x07" not in err
    assert err.count("\n") == 1


def test_warnings_escape_text() -> None:
    import contextlib
    import io

    from llmarc.cli import _warn

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        _warn("model \x1b[31m\ud800")
    assert err.getvalue() == "llmarc: warning: model \\x1b[31m\\ud800\n"


# --------------------------------------------------------------------------- modes, names


def test_modes_follow_the_data_filter_by_default(tmp_path: Path) -> None:
    path = write(tmp_path, archive([("d/f", b"1"), ("d/x", b"2")], dirs=("d",), mode=0o777,
                                   dir_mode=0o777))
    with llmarc.open(path) as ar:
        ar.extract(tmp_path / "out")
        ar.extract(tmp_path / "kept", keep_modes=True)
    for p in ("d", "d/f", "d/x"):
        assert stat.S_IMODE((tmp_path / "out" / p).stat().st_mode) == 0o755, p
        assert stat.S_IMODE((tmp_path / "kept" / p).stat().st_mode) == 0o777, p


def test_cli_keep_modes(tmp_path: Path) -> None:
    path = write(tmp_path, archive([("f", b"1")], mode=0o666))
    assert run_cli("extract", "-q", str(path), "-C", str(tmp_path / "a"))[0] == 0
    assert run_cli("extract", "-q", "--keep-modes", str(path), "-C", str(tmp_path / "b"))[0] == 0
    assert stat.S_IMODE((tmp_path / "a/f").stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "b/f").stat().st_mode) == 0o666


@pytest.mark.parametrize("component", ["é" * 127, "名" * 85, "😀" * 63, "a" * 255])
def test_long_non_ascii_component_extracts(component: str, tmp_path: Path) -> None:
    assert len(component.encode()) <= 255
    path = write(tmp_path, archive([(f"d/{component}", b"payload")]))
    with llmarc.open(path) as ar:
        ar.extract(tmp_path / "out")
    assert (tmp_path / "out" / "d" / component).read_bytes() == b"payload"
    assert [p.name for p in (tmp_path / "out" / "d").iterdir()] == [component]


def test_temporary_name_is_cut_by_bytes() -> None:
    from llmarc.safety import temporary_name

    for leaf in ("é" * 127, "😀" * 63, "a" * 255, "x"):
        tmp = temporary_name(leaf)
        assert len(tmp.encode()) <= 221
        assert tmp.startswith(".") and tmp.endswith(".llmarc-tmp")


def test_extraction_walks_each_directory_once_not_once_per_file(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """1,000 files 200 directories deep: parents are opened per directory, not per file
    (2,000 files 600 deep took 23 s to extract, now ~5 s)."""
    import llmarc.safety as safety

    deep = "/".join(["d"] * 200)
    path = write(tmp_path, archive([(f"{deep}/{i}", b"x") for i in range(1000)]))
    calls = []
    real = safety.open_dirs
    monkeypatch.setattr(safety, "open_dirs", lambda *a, **k: calls.append(1) or real(*a, **k))
    with llmarc.open(path) as ar:
        ar.extract(tmp_path / "out")
    assert len(calls) <= 4, len(calls)
    assert (tmp_path / "out" / deep / "999").read_bytes() == b"x"


def test_progress_notes_are_literal() -> None:
    """Status lines (model paths) may hold rich markup or escapes: printed literally."""
    import io

    from rich.console import Console

    from llmarc.progress import ByteProgress

    out = io.StringIO()
    ByteProgress(Console(file=out, force_terminal=False)).note("loading /m/[/x]\x1b[2J")
    assert out.getvalue() == "llmarc: loading /m/[/x]\\x1b[2J\n"
