"""Coding LLM segments on a Ray cluster (``--ray``), byte-identical to one machine.

Segments are independent by design (spec/llm-codec.md), so a cluster only changes
*where* they are coded: the driver still scans, tokenizes, plans and writes the archive;
actors (``worker.py``) load the same model and code whole lockstep groups; the
scheduler (``scheduler.py``) keeps a bounded number of groups in flight and puts the
results back in input order; ``ray_coder.py`` ties them into a
:class:`~llmarc.codecs.llm.SegmentCoder`.

This module imports nothing heavy: the CLI asks it whether Ray is there before any
model is loaded, so a missing extra is a one-line error and not a slow one.
"""

from __future__ import annotations

import re
from types import ModuleType

from llmarc.errors import LlmarcError

#: What ``--ray`` without an address means: start a Ray runtime in this process.
LOCAL = "local"
RAY_EXTRA_HINT = "pip install 'llmarc[ray]'"

_HOST_PORT = re.compile(r"^[A-Za-z0-9._\-\[\]:]+:\d{1,5}$")


class ClusterError(LlmarcError):
    """The cluster could not finish the work: no worker could start, every worker died,
    or a group of segments kept failing.  Nothing is written (the pack writer renames
    its temporary file only on success)."""


class RayNotInstalledError(ClusterError):
    """``--ray`` was asked for but the optional ``ray`` extra is not installed."""


def require_ray() -> ModuleType:
    """Import Ray or raise a one-line error naming the extra to install."""
    try:
        import ray
    except ImportError:
        raise RayNotInstalledError(
            f"--ray needs the optional Ray extra: {RAY_EXTRA_HINT}"
        ) from None
    return ray


def is_address(value: str) -> bool:
    """Whether a command-line word is a Ray address (``local``, ``auto``, ``ray://…``,
    ``HOST:PORT``) rather than the next argument: ``--ray`` takes an optional value,
    which typer cannot express, so the CLI decides with this."""
    return value in (LOCAL, "auto") or value.startswith("ray://") or bool(
        _HOST_PORT.match(value)
    )


__all__ = ["LOCAL", "ClusterError", "RayNotInstalledError", "is_address", "require_ray"]
