"""The Ray actor that codes segments: one model per actor, loaded in ``__init__``.

The model is never shipped from the driver (pickling a model into a closure copies
gigabytes per task and pins it in the object store): every actor loads it from the same
*source* the driver resolved, so every node must hold the same model at the same path
(or have the embedded one installed).  Each result carries the worker's report, so the
driver checks the model of a restarted actor too, not just of the first incarnation.

This module must not import Ray or torch at import time: Ray imports it in every worker
process to rebuild the actor class, and the driver imports it before Ray is up.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass, field
from typing import Any

from llmarc.codecs.llm import CodingSettings, CodingStats, Segment, SegmentJob
from llmarc.errors import CorruptArchiveError, LlmarcError


@dataclass(frozen=True)
class WorkerSpec:
    """What an actor needs to build the same coder as the driver (all picklable)."""

    name: str  # shown in errors: "worker 2"
    model: str  # a path every node has, or the embedded model's name
    device: str  # "cpu" or "cuda" (a GPU actor sees only its own GPU as cuda:0)
    dtype: str
    threads: int
    settings: CodingSettings


@dataclass(frozen=True)
class WorkerReport:
    """Who a worker is and what it computes with: checked by the driver on every result."""

    name: str
    host: str
    pid: int
    fingerprint: bytes = b""
    environment: dict[str, Any] = field(default_factory=dict)
    dtype: str = ""
    threads: int = 0
    error: str | None = None  # the model could not be loaded on this node

    @property
    def where(self) -> str:
        return f"{self.name} (host {self.host}, pid {self.pid})"


def engine_of(settings: CodingSettings) -> str:
    """The engine these settings code with: settings that name one, else the codec's
    only engine (the float lockstep one, before the integer engine existed)."""
    from llmarc.codecs import llm

    return getattr(settings, "engine", None) or getattr(llm, "ENGINE_NAME", "lockstep-v1")


class SegmentWorker:
    """Actor body; :mod:`llmarc.distributed.ray_coder` wraps it with ``ray.remote``.

    ``__init__`` never raises: a model that is missing on one node is reported by
    :meth:`report`, so the driver can name the node in a one-line error instead of
    surfacing Ray's actor-creation traceback."""

    def __init__(self, spec: WorkerSpec) -> None:
        # Before numba (or torch) loads OpenMP: idle threads must not spin long against the
        # other actors on a shared machine.
        from llmarc.inference.threads import set_openmp_waiting

        set_openmp_waiting()
        os.environ["OMP_NUM_THREADS"] = str(spec.threads)
        self.spec = spec
        self.codec: Any = None
        base = {"name": spec.name, "host": socket.gethostname(), "pid": os.getpid()}
        try:
            from llmarc.codecs.llm import LLMCodec
            from llmarc.model.loader import load_model

            loaded = load_model(spec.model, device=spec.device, dtype=spec.dtype,
                                threads=spec.threads, engine=engine_of(spec.settings))
            self.codec = LLMCodec(loaded, spec.settings)
        except (LlmarcError, OSError) as exc:
            self._report = WorkerReport(**base, error=str(exc))
            return
        self._report = WorkerReport(
            **base,
            fingerprint=loaded.fingerprint,
            environment=dict(loaded.environment),
            dtype=loaded.dtype_name,
            threads=loaded.threads,
        )

    def report(self) -> WorkerReport:
        return self._report

    def _coder(self) -> Any:
        if self.codec is None:
            raise RuntimeError(f"{self._report.where} has no model: {self._report.error}")
        return self.codec

    def encode(
        self, segments: list[Segment], collect_stats: bool
    ) -> tuple[WorkerReport, list[tuple[bytes, CodingStats]]]:
        """Code one chunk of segments (a whole lockstep group, longest first)."""
        return self._report, self._coder().encode_segments(segments, None, collect_stats)

    def decode(
        self, jobs: list[SegmentJob]
    ) -> tuple[WorkerReport, list[list[int] | CorruptArchiveError]]:
        """Decode one chunk of segments; a hostile stream is an error in its slot."""
        return self._report, self._coder().decode_segments(jobs, None)
