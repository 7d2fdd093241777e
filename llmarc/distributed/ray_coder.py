"""RayCoder: the SegmentCoder whose segments are coded by Ray actors.

The driver keeps everything that decides the archive's bytes (scan, tokenization,
segment plan, payload assembly in :class:`~llmarc.codecs.llm.SegmentCoder`, the writer);
actors only turn segments into streams and back.  Chunks are whole lockstep groups built
exactly like the local coder builds them (segments sorted longest first, B at a time),
so even an engine whose rows depended on their companions would code the same groups.

Actors live for one ``encode_many``/``decode_many`` call (which may call the segment
methods several times: decoding goes in bounded slices), or for a :meth:`session` that
spans several (a pack's windows of text, llmarc.codecs.llm_pipeline.WINDOW_BYTES), and
are killed in a ``finally``, so Ctrl-C or an error leaves none behind and a finished
pack holds no cluster resources.
"""

from __future__ import annotations

import contextlib
import logging
import os
import uuid
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from llmarc.codecs.llm import (
    CodingSettings,
    CodingStats,
    ProgressCallback,
    Segment,
    SegmentCoder,
    SegmentJob,
)
from llmarc.distributed import LOCAL, ClusterError, require_ray
from llmarc.distributed.scheduler import Chunk, RunLog, Scheduler
from llmarc.distributed.worker import SegmentWorker, WorkerReport, WorkerSpec, engine_of
from llmarc.errors import CorruptArchiveError, ModelError, ModelMismatchError

if TYPE_CHECKING:
    from llmarc.codecs.llm_options import LLMOptions

log = logging.getLogger("llmarc.distributed")

#: Engines whose streams are the same on any hardware and library version.  With any
#: other engine (the float ``lockstep-v1``) every worker must share the driver's
#: numerics environment, or the cluster is refused.
PORTABLE_ENGINES = frozenset({"int-v1", "int-v2"})
#: Caps the number of actors (default: one per GPU, or per ``threads`` CPU cores).
WORKERS_ENV = "LLMARC_RAY_WORKERS"
#: Ray restarts a dead actor this many times, re-running its in-flight chunks once.
MAX_RESTARTS = 3
MAX_TASK_RETRIES = 1
#: A chunk that fails this many times (on any workers) ends the run.
MAX_ATTEMPTS = 3
#: Chunks in flight per actor: one running and one queued behind it.
PER_WORKER_IN_FLIGHT = 2
NAMESPACE = "llmarc"


@contextlib.contextmanager
def _quiet_ray_logging() -> Iterator[None]:
    """Keep Ray's start-up notices (e.g. its token-authentication banner) off llmarc's
    stderr: with ``configure_logging=False`` Ray's logger has no handler, so Python's
    last-resort handler printed them. They go to llmarc's debug log instead; failures
    still surface as exceptions (ClusterError)."""
    handler = _Forward()
    # ray.init drops the handlers of the "ray" logger, so the notice's own module too
    loggers = [logging.getLogger(n) for n in _RAY_NOTICE_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        yield
    finally:
        for logger in loggers:
            logger.removeHandler(handler)


_RAY_NOTICE_LOGGERS = ("ray", "ray._private.authentication.authentication_token_setup")


class _Forward(logging.Handler):
    """Re-logs Ray's records on ``llmarc.distributed`` at debug level."""

    def emit(self, record: logging.LogRecord) -> None:
        log.debug("ray: %s", record.getMessage())


def connect(address: str) -> Any:
    """Join the cluster at ``address`` (or start a local runtime for ``local``)."""
    ray = require_ray()
    if ray.is_initialized():
        return ray
    kwargs: dict[str, Any] = {"namespace": NAMESPACE, "log_to_driver": False,
                              "configure_logging": False}
    try:
        with _quiet_ray_logging():
            if address == LOCAL:
                ray.init(include_dashboard=False, **kwargs)
            else:
                ray.init(address=address, **kwargs)
    except ImportError as exc:  # ray:// needs Ray Client's grpcio
        raise ClusterError(f"cannot connect to {address!r}: {exc.name or exc} is missing; "
                           "pip install 'llmarc[ray]' installs Ray with its client") from None
    except (ConnectionError, RuntimeError, ValueError) as exc:
        raise ClusterError(f"cannot connect to the Ray cluster at {address!r}: "
                           f"{' '.join(str(exc).split())[:300]}") from None
    return ray


def worker_model(source: Any) -> str:
    """How a worker names the driver's model: the embedded one by name (its wheel may sit
    at another path on another node), anything else by its absolute path."""
    from llmarc.model.sources import DEFAULT_MODEL, embedded_gguf_path

    with contextlib.suppress(ModelError):
        if source.kind == "gguf" and source.path == embedded_gguf_path():
            return DEFAULT_MODEL
    return str(source.path)


class RayCoder(SegmentCoder):
    """Codes segments on Ray actors; archives are byte-identical to :class:`LLMCodec`'s."""

    def __init__(self, loaded: Any, settings: CodingSettings, options: LLMOptions,
                 *, workers: int | None = None) -> None:
        settings.validate()
        self.loaded = loaded
        self.settings = settings
        self.table = loaded.table
        self.address = options.ray or LOCAL
        self.device = options.device
        env_workers = os.environ.get(WORKERS_ENV)
        if workers is None and env_workers:
            try:
                workers = int(env_workers)
            except ValueError:
                raise ClusterError(f"{WORKERS_ENV} must be a whole number, "
                                   f"not {env_workers!r}") from None
        if workers is not None and workers < 1:
            raise ClusterError(f"the number of Ray workers must be at least 1, not {workers}")
        self.max_workers = workers
        self.portable = engine_of(settings) in PORTABLE_ENGINES
        self.last_run: RunLog | None = None  # what the cluster did in the last call
        self._actors: list[tuple[str, Any]] = []  # alive during an outermost call only
        self._depth = 0
        self.starts = self.runs = 0  # actor sets started, scheduler runs (tests, logs)
        self.ray = connect(self.address)

    # ------------------------------------------------------------------ planning
    def _plan(self) -> tuple[int, dict[str, Any], str]:
        """(actors, ray actor resources, device for the workers): one actor per GPU when
        the model is to run on CUDA and the cluster has GPUs; else one per ``threads``
        CPU cores of a node (an actor reserves no more CPUs than the largest node has, or
        a cluster of nodes smaller than ``threads`` could never place one; threads is
        part of lockstep-v1's recorded numerics, so its actors run that many anyway)."""
        resources = self.ray.cluster_resources()
        gpus = int(resources.get("GPU", 0))
        threads = self.loaded.threads
        if self.device != "cpu" and gpus:
            count, options, device = gpus, {"num_gpus": 1, "num_cpus": 1}, "cuda"
        elif self.device.startswith("cuda"):
            raise ClusterError(f"--device {self.device} was asked for, but the Ray cluster "
                               "has no GPU")
        else:
            nodes = [int(node["Resources"].get("CPU", 0)) for node in self.ray.nodes()
                     if node.get("Alive")] or [max(1, int(resources.get("CPU", 1)))]
            per_actor = max(1, min(threads, max(nodes)))
            count, device = max(1, sum(cpus // per_actor for cpus in nodes)), "cpu"
            options = {"num_cpus": per_actor}
        if self.max_workers is not None:
            count = min(count, self.max_workers)
        return count, options, device

    def _start(self, run: str) -> list[tuple[str, Any]]:
        count, resources, device = self._plan()
        remote = self.ray.remote(SegmentWorker)
        common = dict(max_restarts=MAX_RESTARTS, max_task_retries=MAX_TASK_RETRIES,
                      namespace=NAMESPACE, **resources)
        # int-v1/v2 on CPUs: the thread count is the actor's own choice (the numbers do not
        # depend on it), so each runs the CPUs it reserved, no more than a node has.
        threads = resources["num_cpus"] if device == "cpu" and self.portable \
            else self.loaded.threads
        actors = []
        for index in range(count):
            name = f"worker {index + 1}"
            spec = WorkerSpec(name=name, model=worker_model(self.loaded.source), device=device,
                              dtype=self.loaded.dtype_name, threads=threads,
                              settings=self.settings)
            actors.append((name, remote.options(name=f"{run}-{index + 1}", **common).remote(spec)))
        log.info("ray: %d workers (%s) for run %s", count, resources, run)
        return actors

    def _check(self, report: WorkerReport) -> None:
        """Refuse a worker that would not code what this process would code."""
        here = self.loaded
        if report.error is not None:
            raise ModelError(f"Ray {report.where} cannot load the model: {report.error}")
        if report.fingerprint != here.fingerprint:
            raise ModelMismatchError(
                f"Ray {report.where} loaded a different model (fingerprint "
                f"{report.fingerprint.hex()[:16]}) than this process "
                f"{here.source.display_name!r} ({here.fingerprint.hex()[:16]}); every node "
                f"needs the same model at {worker_model(here.source)}"
            )
        if self.portable:  # the same numbers on any machine, dtype and thread count
            return
        if (report.dtype, report.threads) != (here.dtype_name, here.threads):
            raise ClusterError(f"Ray {report.where} runs {report.dtype} with {report.threads} "
                               f"threads, not {here.dtype_name} with {here.threads}")
        if report.environment != here.environment:
            keys = sorted(k for k in set(report.environment) | set(here.environment)
                          if report.environment.get(k) != here.environment.get(k))
            diffs = "; ".join(f"{k}: {here.environment.get(k)!r} here, "
                              f"{report.environment.get(k)!r} there" for k in keys)
            raise ClusterError(
                f"Ray {report.where} has a different numerics environment ({diffs}); the "
                f"{engine_of(self.settings)} engine is only byte-exact when every worker "
                "shares the driver's environment"
            )

    # ------------------------------------------------------------------ running
    def _run(self, items: list[Any], lengths: list[int], method: str,
             progress: ProgressCallback | None, *args: Any) -> list[Any]:
        """Code ``items`` on the cluster in chunks of B (a lockstep group each, longest
        first, as :class:`LLMCodec` groups them); return the results in input order."""
        if not items:
            return []
        width = self.settings.batch_width
        order = sorted(range(len(items)), key=lambda i: (-lengths[i], i))
        chunks = [
            Chunk(index=n, slots=slots, items=[items[i] for i in slots],
                  tokens=sum(lengths[i] for i in slots))
            for n, slots in enumerate(order[s:s + width] for s in range(0, len(order), width))
        ]
        with self._session():
            if not self._actors:
                self._actors = self._start(f"llmarc-{uuid.uuid4().hex[:12]}")
                self.starts += 1
            self.runs += 1
            scheduler = Scheduler(self.ray, self._actors, self._check,
                                  per_worker=PER_WORKER_IN_FLIGHT, max_attempts=MAX_ATTEMPTS,
                                  note=getattr(progress, "note", None))
            self.last_run = scheduler.log
            outputs = scheduler.run(
                chunks, lambda actor, chunk: getattr(actor, method).remote(chunk.items, *args),
                progress,
            )
        results: list[Any] = [None] * len(items)
        for chunk, output in zip(chunks, outputs, strict=True):
            for slot, value in zip(chunk.slots, output, strict=True):
                results[slot] = value
        return results

    @contextlib.contextmanager
    def _session(self) -> Iterator[None]:
        """Keep one set of actors for the outermost call; kill them when it ends, however
        it ends (also on Ctrl-C: actors would outlive the driver)."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth:
                actors, self._actors = self._actors, []
                for _name, actor in actors:
                    with contextlib.suppress(Exception):
                        self.ray.kill(actor, no_restart=True)

    def session(self) -> contextlib.AbstractContextManager[None]:
        """One set of actors for every call until the block ends (a pack's windows)."""
        return self._session()

    def encode_many(self, *args: Any, **kwargs: Any) -> Any:
        with self._session():
            return super().encode_many(*args, **kwargs)

    def decode_many(self, *args: Any, **kwargs: Any) -> Any:
        with self._session():
            return super().decode_many(*args, **kwargs)

    def encode_segments(
        self,
        segments: list[Segment],
        progress: ProgressCallback | None = None,
        collect_stats: bool = False,
    ) -> list[tuple[bytes, CodingStats]]:
        return self._run(segments, [s.positions for s in segments], "encode", progress,
                         collect_stats)

    def decode_segments(
        self, jobs: list[SegmentJob], progress: ProgressCallback | None = None
    ) -> list[list[int] | CorruptArchiveError]:
        return self._run(jobs, [job.positions for job in jobs], "decode", progress)
