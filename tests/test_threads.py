"""Coding threads (llmarc.inference.threads): independent segments on single-threaded
worker threads give the bytes and tokens of one thread, fail as one, and stop together.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numba
import numpy as np
import pytest

from llmarc.codecs.llm import CodingSettings, LLMCodec, Segment, SegmentJob, _group_width
from llmarc.errors import CorruptArchiveError
from llmarc.inference import threads
from llmarc.model.loader import load_model

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


@pytest.fixture(scope="module")
def loaded():
    return load_model(str(FIXTURES / "tiny-llama-bpe"), device="cpu", threads=2)


@pytest.fixture
def two_threads():
    previous = threads.thread_count()
    threads.set_thread_count(2)
    yield
    threads.set_thread_count(previous)


def test_items_go_to_single_threaded_workers_and_the_rest_to_the_caller(two_threads) -> None:
    seen: list[tuple[int, str, int, int]] = []
    lock = threading.Lock()

    def work(item: int, _stop: threading.Event) -> None:
        with lock:
            seen.append((item, threading.current_thread().name, threads.thread_count(),
                         numba.get_num_threads()))

    threads.run_split(list(range(5)), work, workers=2)
    assert sorted(item for item, *_ in seen) == list(range(5))
    by_item = {item: rest for item, *rest in seen}
    for item in range(4):  # 4 = 5 - 5 % 2 on the workers, one core each
        name, kernel_threads, numba_threads = by_item[item]
        assert name.startswith("llmarc-rows") and (kernel_threads, numba_threads) == (1, 1)
    assert by_item[4][0] == threading.current_thread().name  # the remainder: the caller's
    assert by_item[4][1] == 2  # with the process's threads: the workers' 1 is their own
    assert threads.thread_count() == 2


def test_one_failure_stops_the_other_workers_and_is_raised(two_threads) -> None:
    """Item 0 works until told to stop (as a decoder's steps check ``stop``); item 1
    fails once item 0 is running.  Events, not timings: item 0 must see ``stop`` set
    (the wait's 120 s is only a hang guard), and no item after the failure starts."""
    started = threading.Event()
    seen: list[str] = []

    def work(item: int, stop: threading.Event) -> None:
        seen.append(f"start {item}")
        if item == 0:
            started.set()
            if stop.wait(120):
                seen.append("0 stopped")
                raise threads.Cancelled
            raise AssertionError("never stopped")
        assert started.wait(120)
        raise ValueError(f"item {item} failed")

    with pytest.raises(ValueError, match="item 1 failed"):  # not the Cancelled it caused
        threads.run_split([0, 1, 2, 3], work, workers=2)
    assert "0 stopped" in seen, seen
    assert "start 2" not in seen and "start 3" not in seen, seen
    assert threads.thread_count() == 2


@pytest.mark.parametrize(("rows", "batch_width", "workers", "width"), [
    (32, 32, 2, 16), (92, 32, 2, 16), (40, 32, 2, 10), (7, 32, 2, 4), (6, 32, 2, 3),
    (2, 32, 1, 2), (40, 32, 1, 20), (5, 1, 1, 1), (3, 64, 3, 1),
])
def test_groups_share_the_batch_width_evenly(rows, batch_width, workers, width) -> None:
    assert _group_width(rows, batch_width, workers) == width
    assert width * workers <= max(batch_width, workers)  # rows in flight at once
    assert -(-rows // width) >= workers  # a group for every worker


def test_worker_count_needs_work_for_each_thread_and_a_cpu(loaded, two_threads) -> None:
    model = loaded.integer_model(64, "int-v2")
    assert threads.worker_count(model, 2) == 2
    assert threads.worker_count(model, 1) == 1
    assert threads.worker_count(model, 5, threads.STEP_ROWS_PER_THREAD) == 1
    assert threads.worker_count(model, 6, threads.STEP_ROWS_PER_THREAD) == 2
    threads.set_thread_count(1)  # --threads 1: nothing is split
    assert threads.worker_count(model, 64) == 1


def _segments(count: int, length: int) -> list[list[int]]:
    generator = np.random.default_rng(count * 1000 + length)
    lengths = [length - (i * 7) % (length // 2) for i in range(count)]  # uneven rows
    return [generator.integers(1, 300, n).tolist() for n in lengths]


@pytest.mark.parametrize("engine", ["int-v2", "int-v1"])
def test_split_coding_gives_the_bytes_of_one_thread(loaded, engine, monkeypatch) -> None:
    """Encoder batches (3: two on workers, one on the caller) and decoder groups (7 rows:
    4 + 3 on two workers) against the same work on one thread, with every token counted
    once by the progress callback; every other segment has a context (context carry)."""
    monkeypatch.setattr("llmarc.codecs.llm.PREFILL_POSITIONS", 96)  # rows 2 + 2 + 3
    segments = _segments(7, 48)
    contexts = [segments[i - 1][-8:] if i % 2 else [] for i in range(len(segments))]
    codec = LLMCodec(loaded, CodingSettings(32, 48, engine=engine))
    results = {}
    for count in (1, 2):
        threads.set_thread_count(count)
        counted: list[int] = []
        try:
            encoded = codec.encode_segments(
                [Segment(s, c) for s, c in zip(segments, contexts, strict=True)],
                progress=counted.append)
            assert sum(counted) == sum(map(len, segments))
            jobs = [SegmentJob(stream, len(tokens), 10**6, context) for (stream, _), tokens,
                    context in zip(encoded, segments, contexts, strict=True)]
            counted.clear()
            decoded = codec.decode_segments(jobs, progress=counted.append)
            assert sum(counted) == sum(map(len, segments))
        finally:
            threads.set_thread_count(2)
        assert decoded == segments
        results[count] = [stream for stream, _ in encoded]
    assert results[1] == results[2]


def test_a_corrupt_segment_fails_alone_in_a_split_decode(loaded, two_threads) -> None:
    segments = _segments(8, 40)
    codec = LLMCodec(loaded, CodingSettings(32, 40, engine="int-v2"))
    jobs = [SegmentJob(stream, len(tokens), 10**6) for (stream, _), tokens
            in zip(codec.encode_segments([Segment(s) for s in segments]), segments,
                   strict=True)]
    jobs[5] = SegmentJob(jobs[5].stream, jobs[5].count, 3)  # decodes past its byte limit
    decoded = codec.decode_segments(jobs)
    assert isinstance(decoded[5], CorruptArchiveError)
    assert [d for i, d in enumerate(decoded) if i != 5] == segments[:5] + segments[6:]
