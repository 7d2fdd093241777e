"""How to run the LLM codec: the options a pack, an extraction or a Ray cluster is given.

Its own module because both the local pipeline (:mod:`llmarc.codecs.llm_pipeline`) and
the cluster coder (:mod:`llmarc.distributed.ray_coder`) read it, and neither may import
the other's module for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from llmarc.codecs.llm import DEFAULT_ENGINE, DEFAULT_SEGMENT_LENGTH, CodingStats


@dataclass(frozen=True)
class LLMOptions:
    """How to run the LLM codec: which model, where, and (for packing) which settings."""

    model: str | None = None  # None: the embedded default
    device: str = "auto"
    engine: str = DEFAULT_ENGINE  # pack only; extraction adopts the archive's
    dtype: str | None = None  # lockstep-v1 pack only; extraction adopts the archive's
    #: CPU threads for the model; None: the library default.  A runtime choice with
    #: int-v1/v2; lockstep-v1 records it and its extraction adopts the archive's.
    threads: int | None = None
    segment_length: int = DEFAULT_SEGMENT_LENGTH
    #: Context carry (int-v1/v2, spec/llm-codec.md §3.4): tokens of the segment before
    #: fed to each segment that does not start a chain; 0: none; None (auto): 256 with
    #: an integer engine when the input's segments leave extraction enough rows
    #: (:func:`~llmarc.codecs.llm.carry_pays`), else none.  Pack only.
    carry: int | None = None
    #: Segments per chain with context carry: more gives fewer cold segments, fewer
    #: gives an extraction more independent rows to step together; None: the longest
    #: that keeps a round's rows (:func:`~llmarc.codecs.llm.auto_chain`).  Pack only.
    chain: int | None = None
    #: Adaptive n-gram mixing (spec/llm-codec.md §3.6): the highest order mixed into
    #: every table, 0: none; None (auto): 3 whenever carry is on.  It learns along
    #: carry's chains, so it applies only when carry is on.  Pack only.
    mix: int | None = None
    #: Rows stepped together; None: sized from memory and workload.  Recorded by
    #: lockstep-v1; with int-v1/v2 a runtime ceiling for decoding (encoding is prefill).
    batch_width: int | None = None
    #: Code segments on a Ray cluster: "local" starts a local runtime, else an address
    #: (``ray://host:port`` or ``auto``).  None: in this process.
    ray: str | None = None
    #: Called after a pack's LLM coding with {member name: CodingStats} for every entry
    #: the model coded (whether or not it kept the LLM payload; an LLM solid block as
    #: "FIRST and N more"): benchmarks, diagnostics.
    on_encoded: Callable[[dict[str, CodingStats]], None] | None = None
