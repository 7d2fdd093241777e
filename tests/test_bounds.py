"""Bounded work for hostile archives (issue 22): every allocation and loop of the reader is
bounded by the archive's real bytes and the model's real limits before it starts.

Nothing here asserts a wall-clock time (the suite runs on loaded machines): work is
bounded by counts (cache positions, parsed records) or by the peak memory of a
subprocess (its VmHWM, :data:`PEAK`)."""

from __future__ import annotations

import struct
import subprocess
import sys
from pathlib import Path

import pytest
import zstandard

import llmarc
from llmarc.codecs import llm
from llmarc.container.compact import decode_table, put_varint
from llmarc.container.index import assemble
from llmarc.container.layout import (
    EXT_COMPACT_ENTRIES,
    HEADER_SIZE,
    TYPE_DIR,
    TYPE_FILE,
    EntryRecord,
    Extension,
    Index,
    ModelRecord,
    crc32,
)
from llmarc.errors import CorruptArchiveError
from llmarc.model.fingerprint import canonical_json

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
TINY = FIXTURES / "tiny-llama-bpe"
#: What a fresh interpreter that imported llmarc (numpy, zstandard) holds: ~40 MiB here.
OPEN = """
import sys, llmarc
try:
    with llmarc.open(sys.argv[1]) as archive:
        print("members", len(archive.members()))
except llmarc.LlmarcError as exc:
    print(type(exc).__name__, exc)
"""
#: Prefix of TEST: count the segments given to the decoder (printed before TEST's line).
COUNTED = """
from llmarc.codecs.llm import LLMCodec
_seen = [0]
_decode = LLMCodec.decode_segments
def _counted(self, jobs, progress=None):
    _seen[0] += len(jobs)
    return _decode(self, jobs, progress)
LLMCodec.decode_segments = _counted
print_count = lambda: print("segments", _seen[0])
"""
TEST = """
import sys, llmarc
try:
    with llmarc.open(sys.argv[1]) as archive:
        archive.test()
    print("ok")
except llmarc.LlmarcError as exc:
    if "print_count" in globals():
        print_count()
    print(type(exc).__name__, exc)
"""


#: The child's own peak RSS in KiB: VmHWM of its address space, made at exec.  Not
#: ru_maxrss: Linux carries the forked parent's resident size (this test process, with
#: torch and a model loaded: 200+ MB) over exec into the child's ru_maxrss, and
#: RUSAGE_CHILDREN would be the largest of every child the session ever waited for.
PEAK = """
import resource
try:
    with open("/proc/self/status") as status:
        peak = next(int(line.split()[1]) for line in status if line.startswith("VmHWM:"))
except (OSError, StopIteration):
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print("peak", peak)
"""


def child(code: str, path: Path) -> tuple[str, int]:
    """Run ``code`` on ``path`` in a fresh interpreter; return its output and its own
    peak RSS in MiB."""
    script = code + PEAK
    done = subprocess.run([sys.executable, "-c", script, str(path)], capture_output=True,
                          text=True, timeout=900, check=False)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stderr[-2000:]
    out, _, peak = done.stdout.rpartition("peak ")
    return out.strip(), int(peak) // 1024


def compact_archive(body: bytes) -> bytes:
    """A format 1.1 archive with no data whose compact table is ``body`` in one frame."""
    frame = zstandard.ZstdCompressor(level=19, write_content_size=False).compress(body)
    table = bytes((1,)) + struct.pack("<I", len(body)) + frame
    return assemble(b"", Index("t", [], [], (Extension(EXT_COMPACT_ENTRIES, table),)),
                    minor=1)


def directory_records(names: list[tuple[int, bytes]]) -> bytes:
    """A table body of directory records, each (keep, added bytes) front-coded."""
    body = bytearray()
    put_varint(body, len(names))
    for keep, add in names:
        put_varint(body, keep)
        put_varint(body, len(add))
        body += add + bytes((TYPE_DIR, 0)) + b"\xed\x03" + b"\x00\x00\x00"
    return bytes(body)


def varints(*values: int) -> bytes:
    out = bytearray()
    for value in values:
        put_varint(out, value)
    return bytes(out)


@pytest.fixture(scope="module")
def tiny() -> object:
    pytest.importorskip("numba")
    from llmarc.model.loader import load_model

    return load_model(str(TINY), device="cpu")


def llm_archive(fingerprint: bytes, segment_length: int, payload: bytes, size: int) -> bytes:
    """One int-v2 llm member ``a.txt`` of ``size`` bytes whose payload is ``payload``."""
    profile = {"engine": "int-v2", "precision": 24, "segment_length": segment_length}
    record = ModelRecord(fingerprint, "tiny", canonical_json(profile))
    entry = EntryRecord("a.txt", TYPE_FILE, 0o644, 0, size, 2, b"\0\0", HEADER_SIZE,
                        len(payload), b"\1" * 32, crc32(payload))
    return assemble(payload, Index("t", [record], [entry]))


def first_token_stream(loaded: object) -> tuple[bytes, bytes]:
    """(stream, bytes) of the model's likeliest first token: a segment of one token
    decodes from it; a longer one decodes it, then fails within a few tokens (its
    stream runs out)."""
    import numpy as np

    from llmarc.entropy.fast import frequency_tables
    from llmarc.entropy.rangecoder import RangeEncoder

    model = loaded.integer_model(1, "int-v2")  # type: ignore[attr-defined]
    logits = model.prefill(np.array([[loaded.start_token]]))[0]  # type: ignore[attr-defined]
    freqs = frequency_tables(logits, 24)[0]
    token = int(np.argmax(freqs))
    encoder = RangeEncoder(24)
    encoder.encode(int(freqs[:token].sum()), int(freqs[token]))
    return encoder.finish(), loaded.table[token]  # type: ignore[attr-defined]


def test_stepper_caches_grow_with_the_positions_stepped() -> None:
    """A stepper made for 2,048 positions holds caches for a few; they double as the
    positions are stepped, and the logits equal prefill's across every growth (the CPU
    engine's, and the torch operations a GPU runs where torch is installed)."""
    import importlib.util

    import numpy as np

    from llmarc.inference.stepping import CACHE_START
    from llmarc.model.loader import load_model

    loaded = load_model(str(FIXTURES / "tiny-llama-bpe"), device="cpu")
    tokens = np.random.default_rng(7).integers(0, 300, (2, 3 * CACHE_START - 5))
    models = [loaded.integer_model(2048, engine) for engine in ("int-v2", "int-v1")]
    if importlib.util.find_spec("torch") is not None:
        from llmarc.inference.integer import ATTENTION_LEVELS
        from llmarc.inference.integer_torch import TorchIntegerModel

        models.append(TorchIntegerModel(loaded.derived, 2048, "cpu", ATTENTION_LEVELS["int-v2"]))
    for model in models:
        expected = model.prefill(tokens)
        stepper = model.stepper(2, 2048)
        assert stepper.capacity == CACHE_START
        full = model.stepper(2, CACHE_START)  # what 64 positions take
        assert _cache_values(stepper) == _cache_values(full)
        stepped = np.stack([stepper.step(tokens[:, t]).copy()
                            for t in range(tokens.shape[1])], axis=1)
        assert stepper.capacity == 4 * CACHE_START  # 64 -> 128 -> 256 positions
        assert np.array_equal(stepped, expected)
        stepper.reset()  # a reused stepper keeps its caches and gives the same logits
        again = np.stack([stepper.step(tokens[:, t]).copy() for t in range(10)], axis=1)
        assert np.array_equal(again, stepped[:, :10])


def _cache_values(stepper: object) -> int:
    """How many values a stepper's key caches hold (either engine's layout)."""
    caches = getattr(stepper, "caches", None)
    if caches is not None:
        return sum(layer[0].size for layer in caches)
    return sum(k.numel() for k in stepper.keys)  # type: ignore[attr-defined]


# --------------------------------------------------------------------------- the model's limits


def test_a_segment_longer_than_the_window_is_corrupt(tiny, tmp_path: Path) -> None:
    """L = 65,536 on a model of 2,048 positions, 32 segments of empty streams: refused
    (CorruptArchiveError) after the fingerprint check, before any cache exists."""
    window = tiny.context_window
    path = tmp_path / "window.llma"
    path.write_bytes(llm_archive(tiny.fingerprint, 65536, varints(32 * 65536, 0)
                                 + bytes(32), 32 * 65536))
    with llmarc.open(path) as archive, pytest.raises(CorruptArchiveError,
                                                     match=f"window of {window}"):
        archive.test()
    path.write_bytes(llm_archive(tiny.fingerprint, window, varints(window, 0) + bytes(1),
                                 window))
    with llmarc.open(path) as archive, pytest.raises(CorruptArchiveError) as caught:
        archive.test()
    assert "window" not in str(caught.value)  # L = the window is allowed: the stream fails


def test_a_precision_too_small_for_the_logits_is_corrupt() -> None:
    """2^P must exceed the logits width V (every symbol gets a frequency >= 1): checked
    with the profile, not a ValueError from the frequency tables."""
    from types import SimpleNamespace

    from llmarc.codecs.llm import CodingSettings, check_model_limits

    loaded = SimpleNamespace(context_window=8192, vocab_size=4096)
    check_model_limits(loaded, CodingSettings(1, 1024, 13, "int-v2"))
    with pytest.raises(CorruptArchiveError, match="precision 12 is too small"):
        check_model_limits(loaded, CodingSettings(1, 1024, 12, "int-v2"))


def test_a_lockstep_profile_asking_more_threads_than_cpus_gets_the_cpus() -> None:
    """threads 1,024 (the range's top) ran out of memory starting OpenMP threads."""
    import os

    from llmarc.codecs.llm_pipeline import adopted_threads

    cpus = len(os.sched_getaffinity(0))
    warnings: list[str] = []
    assert adopted_threads(1024, warnings.append) == cpus
    assert "1024 threads" in warnings[0]
    assert adopted_threads(1, warnings.append) == 1 and len(warnings) == 1


def test_caches_grow_only_with_tokens_really_decoded(tiny, tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """32 segments of L = 2,048 whose streams decode a likely first token, then run out:
    the decoder's caches hold what was stepped, never L positions per row."""
    from llmarc.inference import stepping

    made: list[stepping.IntegerStepper] = []
    original = stepping.IntegerStepper.__init__

    def record(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        made.append(self)

    monkeypatch.setattr(stepping.IntegerStepper, "__init__", record)
    stream, _piece = first_token_stream(tiny)
    length = tiny.context_window
    payload = varints(32 * length, 0) + varints(len(stream)) * 32 + stream * 32
    path = tmp_path / "steps.llma"
    path.write_bytes(llm_archive(tiny.fingerprint, length, payload, 32 * length))
    with llmarc.open(path) as archive, pytest.raises(CorruptArchiveError):
        archive.test()
    assert made and all(s.length == length for s in made)  # the rows reached the model
    assert max(s.capacity for s in made) <= 2 * stepping.CACHE_START


def test_a_million_segments_cost_their_payload_not_the_model(tiny, tmp_path: Path) -> None:
    """1.5 million one-token segments (1.5 MB of payload): decoded from the one table
    every segment's first token shares, then refused; a segment that fails ends its
    entry's decoding.  (It took 40 s and 2.4 GB, or a MemoryError.)"""
    count = 1_500_000
    path = tmp_path / "segments.llma"
    path.write_bytes(llm_archive(tiny.fingerprint, 1, varints(count, 0) + bytes(count),
                                 count))
    out, peak = child(COUNTED + TEST, path)
    decoded, _, out = out.partition("\n")
    assert out.startswith("CorruptArchiveError") and "past the end" in out, out
    assert peak < 500, peak  # MiB: the model, numba and the first table
    # The first slice of segments fails: the 1.5 million others are never decoded.
    assert decoded == f"segments {llm.DECODE_CHUNK}", decoded


def test_many_good_segments_take_no_model_step(tiny, tmp_path: Path) -> None:
    """200,000 one-token segments that all decode (400 KB of payload): no model step
    (each would be a step of the model per 32 rows), memory bounded by the chunk of
    segments alive at a time, then the made-up SHA-256 fails."""
    count = 200_000
    stream, piece = first_token_stream(tiny)
    payload = varints(count, 0) + varints(len(stream)) * count + stream * count
    path = tmp_path / "good.llma"
    path.write_bytes(llm_archive(tiny.fingerprint, 1, payload, count * len(piece)))
    out, peak = child(TEST, path)
    assert out.startswith("ChecksumMismatchError"), out  # all decoded; the digest is made up
    assert peak < 500, peak


# --------------------------------------------------------------------------- the compact table


@pytest.mark.parametrize("after", [b"\x00", struct.pack("<II", 0x184D2A50, 4) + b"skip",
                                   zstandard.ZstdCompressor().compress(b"")],
                         ids=["byte", "skippable", "empty-frame"])
def test_the_compact_table_is_exactly_one_frame(after: bytes) -> None:
    body = directory_records([(0, b"d")])
    frame = zstandard.ZstdCompressor().compress(body)
    head = bytes((1,)) + struct.pack("<I", len(body))
    assert [e.name for e in decode_table(head + frame)] == ["d"]
    with pytest.raises(CorruptArchiveError, match="after the frame"):
        decode_table(head + frame + after)


def test_a_table_of_256_mib_of_zeros_is_refused_in_bounded_memory() -> None:
    """8 KB of frame declaring exactly 256 MiB of zeros: parsed as it inflates, so it
    fails after the first piece (it held 583 MB)."""
    out, peak = child(OPEN, REPO / "spec" / "vectors" / "bad" / "compact-zeros.llma")
    assert out.startswith("CorruptArchiveError"), out
    assert peak < 150, peak  # 51 MiB here


def test_256_mib_of_names_cost_the_names(tmp_path: Path) -> None:
    """65,536 directories of 4,096-byte names (a 6 KB archive; §4.2 allows 256 MiB of
    names): the names are held once, checked without per-character Python work or a
    second copy of them (a sort key) — about the names' own size, not 1.4 GB."""
    stem = ((b"d" * 250 + b"/") * 17)[:4088]
    names = [(0, stem + b"00000000")] + [(4088, b"%08x" % i) for i in range(1, 65536)]
    path = tmp_path / "names.llma"
    path.write_bytes(compact_archive(directory_records(names)))
    out, peak = child(OPEN, path)
    assert out == "members 65536", out
    assert peak < 256 + 200, peak  # 327 MiB here, 574 with a sort key per name


#: The CLI's listing, its output counted, not kept (stdout is the child's pipe).
LIST = """
import sys
from llmarc.cli import main
class Lines:
    count = 0
    def write(self, text):
        Lines.count += text.count(chr(10))
    def isatty(self):
        return False
    def flush(self):
        pass
sys.stdout, real = Lines(), sys.stdout
try:
    main(["list", sys.argv[1]])
except SystemExit:
    pass
sys.stdout = real
print("lines", Lines.count)
"""


def test_listing_256_mib_of_names_writes_them_once(tmp_path: Path) -> None:
    """``llmarc list`` of the same archive: each line is written as it is made, so the
    names are not copied into a table and a joined string (1.43 GB before, 359 MB)."""
    stem = ((b"d" * 250 + b"/") * 17)[:4088]
    names = [(0, stem + b"00000000")] + [(4088, b"%08x" % i) for i in range(1, 65536)]
    path = tmp_path / "names.llma"
    path.write_bytes(compact_archive(directory_records(names)))
    out, peak = child(LIST, path)
    assert out == "lines 65538", out  # header, 65,536 members, total
    assert peak < 256 + 200, peak  # 1.43 GB when the rows and lines held every name


def test_a_million_directories_open_in_bounded_memory(tmp_path: Path) -> None:
    """The format's limit of entries, as directories (a 26 KB archive)."""
    names = [(0, b"%07d" % i) for i in range(1_000_000)]
    path = tmp_path / "dirs.llma"
    path.write_bytes(compact_archive(directory_records(names)))
    out, peak = child(OPEN, path)
    assert out == "members 1000000", out
    assert peak < 600, peak  # 470 MiB here; 682 with a __dict__ per record and member


# --------------------------------------------------------------------------- packing in windows


def test_a_pack_writes_each_window_before_reading_the_next(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """int-v1/v2 packs read, code and write a window of text at a time (memory holds one
    window, not the corpus), and the archive is the same as one window's."""
    pytest.importorskip("numba")
    from llmarc.codecs import llm_pipeline
    from llmarc.codecs.llm_options import LLMOptions
    from llmarc.container.writer import ArchiveWriter

    src = tmp_path / "src"
    src.mkdir()
    for i in range(8):
        (src / f"t{i}.txt").write_bytes(b"the quick brown fox %d jumps over it\n" % i * 6)
    options = LLMOptions(model=str(TINY), threads=1, segment_length=16)
    # one LLM block of the 8 files: formed before windowing, so no window changes it
    llmarc.pack(src, tmp_path / "block.llma", codec="llm", llm=options)
    with monkeypatch.context() as patch:
        patch.setattr(llm_pipeline, "WINDOW_BYTES", 700)
        llmarc.pack(src, tmp_path / "block-windows.llma", codec="llm", llm=options)
    assert (tmp_path / "block.llma").read_bytes() == \
        (tmp_path / "block-windows.llma").read_bytes()
    # each file its own member (--no-solid): windows of 3, 3 and 2 of them
    llmarc.pack(src, tmp_path / "one.llma", codec="llm", llm=options, solid=False)
    events: list[str] = []
    encode, write = llm_pipeline.TextEncoder.encode, ArchiveWriter.write_stored

    def encoded(self, datas, names, zstd_size):
        events.append(f"window {len(datas)}")
        return encode(self, datas, names, zstd_size)

    def written(self, chunks):
        events.append("write")
        return write(self, chunks)

    monkeypatch.setattr(llm_pipeline, "WINDOW_BYTES", 700)
    monkeypatch.setattr(llm_pipeline.TextEncoder, "encode", encoded)
    monkeypatch.setattr(ArchiveWriter, "write_stored", written)
    llmarc.pack(src, tmp_path / "windows.llma", codec="llm", llm=options, solid=False)
    assert (tmp_path / "windows.llma").read_bytes() == (tmp_path / "one.llma").read_bytes()
    llm_events = events[events.index("window 3"):]  # 8 entries of 228 bytes: 3 + 3 + 2
    assert llm_events == ["window 3", *["write"] * 3, "window 3", *["write"] * 3,
                          "window 2", *["write"] * 2], events


def test_an_extract_decodes_a_window_at_a_time(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """The reader decodes llm members a window of output at a time, each window's files
    written before the next is decoded, with one model (and one set of Ray actors)."""
    pytest.importorskip("numba")
    from llmarc.codecs import llm_pipeline
    from llmarc.codecs.llm_options import LLMOptions

    src = tmp_path / "src"
    src.mkdir()
    texts = {f"t{i}.txt": b"the quick brown fox %d jumps over it\n" % i * 6 for i in range(8)}
    for name, data in texts.items():
        (src / name).write_bytes(data)
    path = tmp_path / "a.llma"  # solid=False: 8 members, not one LLM block
    llmarc.pack(src, path, codec="llm", solid=False,
                llm=LLMOptions(model=str(TINY), threads=1, segment_length=16))
    events: list[str] = []
    decode, finish = llm_pipeline.LLMDecoder.decode, llmarc.safety.write_file
    loads: list[int] = []
    codec = llm_pipeline.LLMDecoder._codec

    def decoded(self, items, progress=None):
        events.append(f"decode {len(items)}")
        return decode(self, items, progress)

    def written(*args, **kwargs):
        events.append("write")
        return finish(*args, **kwargs)

    def made(self, *args, **kwargs):
        loads.append(self._current is None)
        return codec(self, *args, **kwargs)

    monkeypatch.setattr(llm_pipeline, "WINDOW_BYTES", 700)
    monkeypatch.setattr(llm_pipeline.LLMDecoder, "decode", decoded)
    monkeypatch.setattr(llm_pipeline.LLMDecoder, "_codec", made)
    monkeypatch.setattr(llmarc.safety, "write_file", written)
    with llmarc.open(path, model=str(TINY)) as archive:
        archive.extract(tmp_path / "out")
    assert events == ["decode 3", *["write"] * 3, "decode 3", *["write"] * 3,
                      "decode 2", *["write"] * 2], events
    assert loads == [True, False, False]  # the model loaded once
    assert {p.name: p.read_bytes() for p in (tmp_path / "out").iterdir()} == texts
