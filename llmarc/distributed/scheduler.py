"""Drive chunks of segments through a set of actors with ``ray.wait``, in bounded flight.

Why not ``ActorPool`` or Ray Data: a dead actor can hang a fixed pool, and Ray Data does
not keep order by default.  Here the loop is ours: each worker has at most
``per_worker`` chunks in flight (one running, one queued so it never idles), results are
stored by chunk index so the caller reassembles them in input order, and failures are
handled explicitly:

* an actor that dies is restarted by Ray (``max_restarts``), which also re-runs the
  chunks it had in flight (``max_task_retries``); whatever still fails comes back here,
  is put back at the head of the queue and re-run on any live worker;
* a chunk that has failed ``max_attempts`` times ends the run with a ClusterError
  naming it and the last error; so does a cluster whose workers are all dead;
* every result carries its worker's report, checked by ``check`` (a restarted actor
  re-loads its model, which must still be the driver's).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from llmarc.distributed import ClusterError
from llmarc.distributed.worker import WorkerReport

log = logging.getLogger("llmarc.distributed")

#: Seconds between checks for Ctrl-C while waiting on the cluster.
WAIT_SLICE = 1.0
#: Seconds an actor may take to load its model (a first GGUF conversion, a 7B model
#: from a network file system) before the run goes on without it.
START_TIMEOUT = 900.0


@dataclass
class Chunk:
    """One unit of work: whole lockstep groups of segments, and where they came from."""

    index: int
    slots: list[int]  # positions of its segments in the caller's list
    items: list[Any]  # the segments (encode) or SegmentJobs (decode)
    tokens: int
    attempts: int = 0
    errors: list[str] = field(default_factory=list)


@dataclass
class _Worker:
    name: str
    actor: Any
    state: str = "starting"  # starting -> alive; alive -> probing (after an error); dead
    pid: int | None = None
    in_flight: int = 0


@dataclass
class RunLog:
    """What happened on the cluster during one run (for tests, benchmarks and logs)."""

    workers: int = 0
    chunks: int = 0
    retried: int = 0  # chunk failures that were re-queued
    restarts: int = 0  # actors seen with a new process after an error or a retry
    pids: dict[str, list[int]] = field(default_factory=dict)  # worker -> processes seen
    startup_s: float = 0.0  # until every actor had loaded its model and reported
    coding_s: float = 0.0  # from then until the last chunk came back


def _describe(exc: BaseException) -> str:
    """One line for a worker failure: the original exception of a task, not its traceback."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException):
        exc = cause
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


class Scheduler:
    """Runs chunks on workers and returns each chunk's result list, in chunk order."""

    def __init__(
        self,
        ray: Any,
        actors: list[tuple[str, Any]],
        check: Callable[[WorkerReport], None],
        *,
        per_worker: int = 2,
        max_attempts: int = 3,
        note: Callable[[str], None] | None = None,
    ) -> None:
        self.ray = ray
        self.workers = [_Worker(name, actor) for name, actor in actors]
        self.check = check
        self.per_worker = per_worker
        self.max_attempts = max_attempts
        self.note = note
        self.log = RunLog(workers=len(actors))

    # ------------------------------------------------------------------ bookkeeping
    def _event(self, message: str) -> None:
        log.info("%s", message)
        if self.note is not None:
            alive = sum(w.state == "alive" for w in self.workers)
            self.note(f"ray: {message} ({alive}/{len(self.workers)} workers alive)")

    def _accept_report(self, worker: _Worker, report: WorkerReport) -> None:
        """Check a worker's report; notice a new process (the actor was restarted)."""
        self.check(report)
        seen = self.log.pids.setdefault(worker.name, [])
        if worker.pid is not None and report.pid != worker.pid:
            self.log.restarts += 1
            self._event(f"{worker.name} restarted (pid {worker.pid} -> {report.pid})")
        if report.pid not in seen:
            seen.append(report.pid)
        worker.pid = report.pid

    def _fail(self, chunk: Chunk, worker: _Worker, exc: BaseException,
              queue: deque[Chunk]) -> None:
        chunk.attempts += 1
        chunk.errors.append(f"{worker.name}: {_describe(exc)}")
        if chunk.attempts >= self.max_attempts:
            first, last = chunk.slots[0], chunk.slots[-1]
            raise ClusterError(
                f"segment group {chunk.index} ({len(chunk.slots)} segments, first slot "
                f"{first}, last {last}) failed {chunk.attempts} times; last error: "
                f"{chunk.errors[-1]}"
            )
        self.log.retried += 1
        self._event(f"group {chunk.index} failed on {worker.name} ({_describe(exc)}); "
                    "re-queued")
        queue.appendleft(chunk)

    # ------------------------------------------------------------------ main loop
    def run(
        self,
        chunks: list[Chunk],
        submit: Callable[[Any, Chunk], Any],
        progress: Callable[[int], None] | None = None,
    ) -> list[list[Any]]:
        """Run every chunk; ``submit(actor, chunk)`` returns the ObjectRef of
        ``(WorkerReport, results)``.  Raises ClusterError / the check's errors."""
        ray = self.ray
        results: list[list[Any] | None] = [None] * len(chunks)
        queue: deque[Chunk] = deque(chunks)
        began = time.perf_counter()
        self._start_up()
        all_up = time.perf_counter()
        self.log.startup_s = all_up - began
        pending: dict[Any, tuple[str, _Worker, Chunk | None]] = {}
        self.log.chunks = len(chunks)
        remaining = len(chunks)
        while remaining:
            for worker in self.workers:
                while queue and worker.state == "alive" and worker.in_flight < self.per_worker:
                    chunk = queue.popleft()
                    pending[submit(worker.actor, chunk)] = ("chunk", worker, chunk)
                    worker.in_flight += 1
            if not pending:
                raise ClusterError("every Ray worker has died; nothing was written")
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_SLICE)
            for ref in ready:
                kind, worker, chunk = pending.pop(ref)
                if kind == "probe":
                    self._probed(ref, worker)
                    continue
                assert chunk is not None
                worker.in_flight -= 1
                try:
                    report, output = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    self._fail(chunk, worker, exc, queue)
                    if worker.state == "alive":  # wait until Ray has it back (or not)
                        worker.state = "probing"
                        pending[worker.actor.report.remote()] = ("probe", worker, None)
                    continue
                except ray.exceptions.RayError as exc:
                    self._fail(chunk, worker, exc, queue)
                    continue
                self._accept_report(worker, report)
                if len(output) != len(chunk.items):
                    raise ClusterError(f"{report.where} returned {len(output)} results "
                                       f"for {len(chunk.items)} segments")
                results[chunk.index] = output
                remaining -= 1
                if progress is not None:
                    progress(chunk.tokens)
        self.log.coding_s = time.perf_counter() - all_up
        return results  # type: ignore[return-value]

    def _start_up(self) -> None:
        """Wait for every worker's first report before any work goes out: the cluster is
        checked as a whole (a worker with another model is refused even if the others
        could have finished alone), and one that cannot start is known to be gone."""
        starting = {w.actor.report.remote(): w for w in self.workers}
        deadline = time.monotonic() + START_TIMEOUT
        while starting and time.monotonic() < deadline:
            ready, _ = self.ray.wait(list(starting), num_returns=len(starting),
                                     timeout=WAIT_SLICE)
            for ref in ready:
                self._probed(ref, starting.pop(ref))
        for worker in starting.values():  # no resources for it, or a node that hangs
            worker.state = "dead"
            self._event(f"{worker.name} did not start within {START_TIMEOUT:.0f} s; "
                        "going on without it")
        alive = sum(w.state == "alive" for w in self.workers)
        if not alive:
            raise ClusterError(f"none of the {len(self.workers)} Ray workers could start")
        self._event(f"{alive} workers ready")

    def _probed(self, ref: Any, worker: _Worker) -> None:
        """A start-up or post-failure probe came back: the worker is alive or dead."""
        ray = self.ray
        try:
            report = ray.get(ref)
        except ray.exceptions.RayError as exc:
            worker.state = "dead"
            self._event(f"{worker.name} is gone ({_describe(exc)})")
            return
        self._accept_report(worker, report)
        was = worker.state
        worker.state = "alive"
        if was == "probing":
            self._event(f"{worker.name} is back")
