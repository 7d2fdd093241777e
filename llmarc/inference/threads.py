"""How many threads the integer engines use, and independent pieces of their work on
worker threads, one core each.

The compiled kernels' own threads split every operation and meet at a barrier after it: a
prefill has hundreds of such regions, a decoding step about 150.  When other processes
compete for the cores, the scheduler parks one thread of a region for a time slice and
the others wait for it: the 8 KB pack took four times its unloaded coding time with a busy
process on each core.  The integer engines' logits do not depend on how segments are
grouped, so independent segments (an encoder's prefill batches, a decoder's groups of
rows) can go to separate threads instead, each computing single-threaded: nothing waits
at a barrier, and a parked thread delays only its own rows.  On this repository's 2-core
host (benchmarks/README.md) a 1,736-token pack's prefill took 6.5 s instead of 13-17 s
under that load, and 2.5-3.2 s instead of 3.1-3.8 s without it; 32 rows of 1,024
positions decoded as two threads of 16 at 347-425 tokens/s, as one group of 32 at 307-325.

lockstep-v1 never comes here: its float logits depend on the batch shape it records.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

Item = TypeVar("Item")

#: The process's thread count (``--threads``), None until set: then the CPUs this
#: process may run on.
_PROCESS_THREADS: int | None = None
#: A worker thread's own count (1), which overrides the process's on that thread.
_THIS_THREAD = threading.local()


#: Spin iterations before an idle OpenMP thread sleeps (libgomp; numba's pool reads it too).
OPENMP_SPIN = "10000"


def set_openmp_waiting() -> None:
    """Short spinning for OpenMP threads, set before numba (or torch) loads its runtime.

    Endless spinning collapses a busy machine (issue 9: 862 s of CPU and no result where
    one thread took 219 s); no spinning at all (``OMP_WAIT_POLICY=PASSIVE``) makes each
    of a decoding step's ~150 small parallel regions wake sleeping threads: 0.43 s a step
    at batch width 32 against 0.30 s with a short spin, and 0.19 s against 0.12 s at width
    2 with a busy process on every core (benchmarks/README.md).  A short spin serves both."""
    os.environ.setdefault("GOMP_SPINCOUNT", OPENMP_SPIN)


def set_thread_count(count: int) -> None:
    """The number of threads the engines' kernels use (the user's ``--threads``)."""
    global _PROCESS_THREADS
    if count < 1:
        raise ValueError("a thread count is at least 1")
    _PROCESS_THREADS = count


def thread_count() -> int:
    """Threads the kernels called on this thread may use: 1 on a worker of
    :func:`run_split`, else the process's count."""
    own = getattr(_THIS_THREAD, "count", None)
    if own is not None:
        return int(own)
    if _PROCESS_THREADS is not None:
        return _PROCESS_THREADS
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


#: Fewest rows a decoding thread steps: at 1-2 rows a step reads every weight for little
#: arithmetic, so two threads of 1-2 rows read twice the bytes of one group stepped by
#: torch's threads, and were 10-30 % slower here; from 3 rows on (the VNNI kernel's
#: range) the split was faster (5-13 % at 3 rows, 6-9 % at 4, 13-31 % at 16).
STEP_ROWS_PER_THREAD = 3


def worker_count(model: Any, units: int, per_worker: int = 1) -> int:
    """Worker threads for ``units`` independent pieces of ``model``'s work: the thread
    count (the user's ``--threads``), with at least ``per_worker`` pieces each; 1 (the
    calling thread with the kernels' own threads) off the CPU or for too few pieces."""
    threads = min(thread_count(), units // per_worker)
    if model.device_type != "cpu" or threads <= 1:
        return 1
    return threads


def _one_core() -> None:
    """A worker thread's set-up: the kernels (and numba, a per-thread setting) compute
    on the calling thread alone."""
    import numba

    _THIS_THREAD.count = 1
    numba.set_num_threads(1)


class Cancelled(Exception):
    """Raised inside a worker whose companions failed or were interrupted."""


def run_split(items: Sequence[Item], work: Callable[[Item, threading.Event], None],
              workers: int) -> None:
    """``work(item, stop)`` for every item, in order of the sequence.

    With several workers, the first ``len(items) - len(items) % workers`` items go to
    that many single-threaded threads, each taking the next item when it finishes one;
    the rest (fewer than one per worker, which would leave cores idle) run afterwards on
    the calling thread with the kernels' threads.  ``stop`` is set when any item fails or the
    caller is interrupted (Ctrl-C): long work checks it and raises :class:`Cancelled`.
    The first failure is raised here once every worker has ended."""
    stop = threading.Event()
    shared = len(items) - len(items) % workers if workers > 1 else 0
    if shared:
        _run_threads(items[:shared], work, workers, stop)
    for item in items[shared:]:
        work(item, stop)


def _run_threads(items: Sequence[Item], work: Callable[[Item, threading.Event], None],
                 workers: int, stop: threading.Event) -> None:
    pending: Iterator[Item] = iter(items)
    lock = threading.Lock()

    def drain() -> None:
        _one_core()
        while not stop.is_set():
            with lock:
                item = next(pending, None)
            if item is None:
                return
            try:
                work(item, stop)
            except BaseException:
                stop.set()
                raise

    with ThreadPoolExecutor(workers, thread_name_prefix="llmarc-rows") as pool:
        futures = [pool.submit(drain) for _ in range(workers)]
        try:
            for future in futures:
                future.exception()  # wait; Ctrl-C lands here
        except BaseException:
            stop.set()
            raise
    failures = [f.exception() for f in futures if f.exception() is not None]
    real = [e for e in failures if not isinstance(e, Cancelled)]
    if failures:  # the first real one, not the Cancelled it caused
        raise (real or failures)[0]  # type: ignore[misc]


def locked(callback: Callable[..., Any] | None) -> Callable[..., Any] | None:
    """``callback`` serialized for calls from several threads (progress bars)."""
    if callback is None:
        return None
    lock = threading.Lock()

    def call(*args: Any) -> Any:
        with lock:
            return callback(*args)

    return call
