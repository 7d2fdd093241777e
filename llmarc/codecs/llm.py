"""The LLM codec (id 2): language-model probabilities + range coding, batched over entries.

Layout (spec/llm-codec.md is normative):

* codec params (in the entry record): ``u16 model_index`` (little-endian) into the
  archive's model table, whose numerics profile gives batch width B, segment length L
  and coder precision P;
* payload: ``varint token_count``, then ``varint coded_length`` for each of the
  ``ceil(token_count / L)`` segments, then the segments' range-coded streams back to back.

A segment holds at most L tokens and starts from the model's start token at position 0,
so its stream depends on nothing but its own tokens (and, with context carry, on the
last C tokens of the segment before it: spec/llm-codec.md §3.4): extracting one member
decodes only that member's segments.  Segments of many entries share the rows stepped
together, sorted longest first so short segments waste few steps.  With adaptive mixing
(§3.6) every table is refined by n-gram counts of the tokens of the segment's chain
before it (:mod:`llmarc.entropy.mixing`), which a job carries as its ``history``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from llmarc.container.layout import MAX_CHAIN, SHORT_FINGERPRINT
from llmarc.entropy.mixing import MAX_MIX_PRECISION, NgramMixer
from llmarc.entropy.mixing import MAX_ORDER as MAX_MIX_ORDER
from llmarc.errors import (
    CorruptArchiveError,
    ModelError,
    ModelMismatchError,
    UnsupportedFeatureError,
)
from llmarc.model.fingerprint import (
    COMPONENTS_KEY,
    PROFILE_SETTINGS,
    differing_components,
    profile_differences,
)

ENGINE_LOCKSTEP = "lockstep-v1"  # float, bound to the environment that made it
# Exact integer arithmetic: the same logits on every machine.  int-v2 (8-bit attention)
# is int-v1 (16-bit attention) made faster for +0.1-0.6 % of bytes; int-v1 stays readable.
INTEGER_ENGINES = ("int-v2", "int-v1")
ENGINES = (*INTEGER_ENGINES, ENGINE_LOCKSTEP)
DEFAULT_ENGINE = INTEGER_ENGINES[0]
DEFAULT_SEGMENT_LENGTH = 1024
DEFAULT_CPU_BATCH_WIDTH = 32
DEFAULT_PRECISION = 24
MAX_BATCH_WIDTH = 1024
MAX_SEGMENT_LENGTH = 1 << 16
#: Most positions of a row with context (L + C): the int-v2 attention's int32 sums are
#: proven for up to 2^16 positions (llm-codec.md §5.6).
MAX_POSITIONS = 1 << 16
#: The longest chain a pack picks by itself (§3.4): 7 of 8 segments carry context.
AUTO_CHAIN_LIMIT = 8
#: What ``--carry auto`` (the default) carries and mixes when carry pays
#: (:func:`carry_pays`): C = 256 keeps 87 % of C = 512's gain on alice29.txt for 1,280
#: positions a segment instead of 1,536, and n-gram orders 0..3 were the measured choice
#: (benchmarks/results/ratio_options.md, pareto.md).
AUTO_CARRY = 256
AUTO_MIX = 3
#: Bytes a token when a pack sizes its choices before tokenizing (:func:`planned_segments`):
#: SmolLM2 codes English at 3.6 (alice29.txt: 152,089 bytes, 41,931 tokens).
PLANNING_BYTES_PER_TOKEN = 4
MAX_VARINT_BYTES = 10
MAX_THREADS = 1024
#: int-v1/v2 encode by prefill: segments are stacked into batches of about this many
#: positions (a bigger batch gives bigger GEMMs; the attention scores grow with it).
PREFILL_POSITIONS = 1024
#: Segments decoded per call of decode_segments: bounds the per-segment state that a
#: payload of millions of one-token segments could otherwise make the reader hold.
DECODE_CHUNK = 4096
#: Positions the prefill encoder codes per call (bounds the statistics' float64
#: [rows, V] temporaries; the interval kernel itself holds one int64 row per thread).
FREQUENCY_ROWS = 128

ProgressCallback = Callable[[int], None]  # called with the number of tokens just coded


# --------------------------------------------------------------------------- varints
def write_varint(value: int) -> bytes:
    """Unsigned LEB128: 7 bits per byte, low bits first, high bit = more bytes follow."""
    if value < 0:
        raise ValueError("varint must be non-negative")
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def read_varint(data: bytes, offset: int) -> tuple[int, int]:
    """Decode a LEB128 varint at ``offset``; return (value, next offset). Hostile-safe."""
    value = shift = 0
    for index in range(MAX_VARINT_BYTES):
        if offset + index >= len(data):
            raise CorruptArchiveError("llm payload: truncated varint")
        byte = data[offset + index]
        value |= (byte & 0x7F) << shift
        if not byte & 0x80:
            if index and byte == 0:
                raise CorruptArchiveError("llm payload: non-minimal varint")
            return value, offset + index + 1
        shift += 7
    raise CorruptArchiveError("llm payload: varint longer than 10 bytes")


# --------------------------------------------------------------------------- profile
@dataclass(frozen=True)
class CodingSettings:
    """How segments are coded.

    ``segment_length``, ``precision`` and ``engine`` are recorded and adopted by the
    decoder.  ``batch_width`` (rows stepped together) is adopted too for lockstep-v1,
    whose numbers depend on it; for the integer engines it is only this process's
    ceiling."""

    batch_width: int
    segment_length: int
    precision: int = DEFAULT_PRECISION
    engine: str = DEFAULT_ENGINE
    #: Context carry (spec/llm-codec.md §3.4): C tokens of the segment before fed to
    #: each segment that does not start a chain of ``chain`` segments; 0: none.
    carry: int = 0
    chain: int = 1
    #: Adaptive n-gram mixing (llm-codec.md §3.6, entropy.md §4): the highest order K,
    #: orders 0..K mixed into every table; 0: none.  Needs context carry's chains.
    mix: int = 0

    def validate(self) -> None:
        """Bounds-check settings read from a (hostile) archive before allocating anything."""
        if self.mix:
            if not self.carry:
                raise CorruptArchiveError("llm profile: mix needs context carry (its chains)")
            if not 1 <= self.mix <= MAX_MIX_ORDER:
                raise CorruptArchiveError(f"llm profile: mix {self.mix} out of range "
                                          f"(1 to {MAX_MIX_ORDER})")
            if self.precision > MAX_MIX_PRECISION:
                raise CorruptArchiveError(f"llm profile: mixing needs a precision of at "
                                          f"most {MAX_MIX_PRECISION}, not {self.precision}")
        if self.carry:
            if self.engine not in INTEGER_ENGINES:
                raise CorruptArchiveError(f"llm profile: context carry needs int-v1 or int-v2, "
                                          f"not {self.engine}")
            if not 1 <= self.carry <= self.segment_length:
                raise CorruptArchiveError(f"llm profile: carry {self.carry} out of range "
                                          f"(1 to the segment length {self.segment_length})")
            if not 2 <= self.chain <= MAX_CHAIN:
                raise CorruptArchiveError(f"llm profile: chain {self.chain} out of range")
            if self.segment_length + self.carry > MAX_POSITIONS:
                raise CorruptArchiveError(
                    f"llm profile: segment length {self.segment_length} plus carry "
                    f"{self.carry} exceeds {MAX_POSITIONS} positions")
        if not 1 <= self.batch_width <= MAX_BATCH_WIDTH:
            raise CorruptArchiveError(f"llm profile: batch width {self.batch_width} out of range")
        if not 1 <= self.segment_length <= MAX_SEGMENT_LENGTH:
            raise CorruptArchiveError(
                f"llm profile: segment length {self.segment_length} out of range"
            )
        if not 12 <= self.precision <= 28:
            raise CorruptArchiveError(f"llm profile: precision {self.precision} out of range")
        if self.engine not in ENGINES:
            raise UnsupportedFeatureError(
                f"llm codec engine {self.engine!r} is not supported (this reader has "
                f"{', '.join(ENGINES)})"
            )


def build_profile(loaded: Any, settings: CodingSettings) -> dict[str, Any]:
    """The numerics profile recorded in the model table.

    The integer engines record only what changes the numbers (engine, L, P): their
    logits do not depend on the machine, batch width or thread count.  lockstep-v1 also
    records the settings the decoder must reproduce (B, dtype, threads) and the
    environment.  Both add the model's short component digests (``model``), so that a
    reader with another model can say which part of it differs."""
    components = {COMPONENTS_KEY: loaded.components.short()}
    if settings.engine in INTEGER_ENGINES:
        carry = {"carry": settings.carry, "chain": settings.chain} if settings.carry else {}
        if settings.mix:
            carry["mix"] = settings.mix
        return {
            "engine": settings.engine,
            "segment_length": settings.segment_length,
            "precision": settings.precision,
            **carry,
            **components,
        }
    profile = dict(loaded.environment)
    profile.update(
        engine=ENGINE_LOCKSTEP,
        batch_width=settings.batch_width,
        segment_length=settings.segment_length,
        precision=settings.precision,
        dtype=loaded.dtype_name,
        threads=loaded.threads,
        **components,
    )
    return profile


def _profile_int(profile: dict[str, Any], key: str, low: int, high: int) -> int:
    """An integer setting of a (hostile) profile, range-checked; bools are not ints."""
    value = profile.get(key)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CorruptArchiveError(f"llm profile: {key} {value!r} is missing or out of range")
    return value


def settings_from_profile(
    profile: dict[str, Any], batch_width: int = DEFAULT_CPU_BATCH_WIDTH
) -> CodingSettings:
    """Read and validate the adopted settings of a recorded profile.

    ``batch_width`` is the reader's own ceiling, used for int-v1/v2 (lockstep-v1 adopts
    the recorded one)."""
    engine = profile.get("engine")
    if engine not in ENGINES:
        raise UnsupportedFeatureError(
            f"llm codec engine {engine!r} is not supported (this reader has "
            f"{', '.join(ENGINES)})"
        )
    length = _profile_int(profile, "segment_length", 1, MAX_SEGMENT_LENGTH)
    precision = _profile_int(profile, "precision", 12, 28)
    carry, chain = 0, 1
    if engine in INTEGER_ENGINES and ("carry" in profile or "chain" in profile):
        carry = _profile_int(profile, "carry", 1, length)  # §2.2: both keys, or neither
        chain = _profile_int(profile, "chain", 2, MAX_CHAIN)
    mix = 0
    if engine in INTEGER_ENGINES and "mix" in profile:
        if not carry:
            raise CorruptArchiveError("llm profile: mix without carry")
        mix = _profile_int(profile, "mix", 1, MAX_MIX_ORDER)
    if engine == ENGINE_LOCKSTEP:
        batch_width = _profile_int(profile, "batch_width", 1, MAX_BATCH_WIDTH)
        _profile_int(profile, "threads", 1, MAX_THREADS)
        if profile.get("dtype") not in ("float32", "bfloat16", "float16"):
            raise CorruptArchiveError(f"llm profile: unknown dtype {profile.get('dtype')!r}")
    settings = CodingSettings(batch_width, length, precision, engine, carry, chain, mix)
    settings.validate()
    return settings


def check_model(
    loaded: Any, fingerprint: bytes, name: str, profile: dict[str, Any]
) -> list[str]:
    """Refuse a different model; return warnings for environment differences (only
    lockstep-v1 depends on the environment)."""
    # A format 3.0 short record keeps the version-2 fingerprint's first 16 bytes
    # (spec/format.md §12.3); a full one may also be a version-1 value (model.md §6.2).
    accepted = (loaded.fingerprint[:SHORT_FINGERPRINT] == fingerprint
                if len(fingerprint) == SHORT_FINGERPRINT else loaded.accepts(fingerprint))
    if not accepted:
        raise ModelMismatchError(mismatch_message(loaded, fingerprint, name, profile))
    settings = settings_from_profile(profile)
    check_model_limits(loaded, settings)
    if settings.engine != ENGINE_LOCKSTEP:
        return []
    current = build_profile(loaded, settings)
    ignored = (*PROFILE_SETTINGS, COMPONENTS_KEY)
    recorded = {k: v for k, v in profile.items() if k not in ignored}
    here = {k: v for k, v in current.items() if k not in ignored}
    return profile_differences(recorded, here)


def mismatch_message(loaded: Any, fingerprint: bytes, name: str,
                     profile: dict[str, Any]) -> str:
    """Why this model cannot decode the entry, and what to do: the component that
    differs where the archive recorded component digests (llmarc >= 0.2)."""
    here = loaded.source.display_name
    shown = repr(name) if name else "(unnamed)"  # small 3.0 archives record no name
    what = (f"archive was made with model {shown} (fingerprint {fingerprint.hex()[:16]}); "
            f"the model given here, {here!r} ({loaded.source.path}), has fingerprint "
            f"{loaded.fingerprint.hex()[:16]}")
    differing = differing_components(profile.get(COMPONENTS_KEY), loaded.components)
    if differing:
        what += f": its {', '.join(differing)} differ{'s' if len(differing) == 1 else ''}"
    elif COMPONENTS_KEY not in profile:
        what += " (the archive predates component digests, so which part differs is unknown)"
    return (f"{what}; extract with the model that made the archive "
            f"(--model FOLDER_OR_GGUF, or LLMARC_MODEL)")


def check_model_limits(loaded: Any, settings: CodingSettings) -> None:
    """Refuse (CorruptArchiveError) a profile that the model it names cannot have made.

    Checked once the fingerprint matched (a different model is ModelMismatchError) and
    before anything is allocated (spec/llm-codec.md §2.2): a segment longer than the
    model's window (``max_position_embeddings``, part of the fingerprint) would size the
    decoder by a number no writer can record, and a precision whose 2^P does not exceed
    the logits width V leaves no room for every symbol's frequency of at least 1
    (entropy.md §2)."""
    window = loaded.context_window
    if settings.segment_length + settings.carry > window:
        carried = f" plus carry {settings.carry}" if settings.carry else ""
        raise CorruptArchiveError(
            f"llm profile: segment length {settings.segment_length}{carried} exceeds the "
            f"model's window of {window} positions")
    if loaded.vocab_size >= 1 << settings.precision:
        raise CorruptArchiveError(
            f"llm profile: precision {settings.precision} is too small for the model's "
            f"{loaded.vocab_size} logits (2^precision must exceed it)")


def default_batch_width(loaded: Any, segment_length: int, segments: int) -> int:
    """B for a new archive: sized from memory, then balanced over the work.

    On CUDA the ceiling is floor(0.85 * free_bytes / per_row_bytes), where per_row_bytes
    is one row's KV cache (2 * layers * kv_heads * head_dim * L * dtype size) plus its
    working set (4 * (V + 4 * hidden + 2 * intermediate) bytes for logits and
    activations), capped at 256 and rounded down to a multiple of 8.  On CPU the ceiling
    is 32 (the measured throughput knee on 2 cores).  Then, with
    groups = ceil(segments / ceiling), B = ceil(segments / groups): the same number of
    lockstep groups, but no group wider than it needs to be.
    """
    config = loaded.config
    if loaded.device.type == "cuda":
        import torch

        free, _total = torch.cuda.mem_get_info(str(loaded.device))
        ceiling = cuda_batch_ceiling(free, config, segment_length, loaded.dtype_name,
                                     loaded.vocab_size)
    else:
        ceiling = DEFAULT_CPU_BATCH_WIDTH
    segments = max(1, segments)
    groups = -(-segments // ceiling)
    return -(-segments // groups)


def planned_segments(sizes: list[int], segment_length: int) -> list[int]:
    """Segments that texts of ``sizes`` bytes are planned to have: what a pack's carry and
    chain choices count, from sizes known before any text is read or tokenized, so that
    neither the window a pack reads at a time nor a file's place in it changes them.
    An estimate (PLANNING_BYTES_PER_TOKEN), which the choices tolerate."""
    per_segment = PLANNING_BYTES_PER_TOKEN * segment_length
    return [-(-size // per_segment) for size in sizes if size]


def carry_pays(segment_counts: list[int], rows: int = DEFAULT_CPU_BATCH_WIDTH) -> bool:
    """Whether ``--carry auto`` turns context carry on for entries of ``segment_counts``
    segments: when chains of two still give a round at least half of ``rows`` to step
    together.  Carry's price is extraction's parallelism, not ratio: a round decodes one
    segment of each chain, so a short text's few segments become rounds of one or two
    rows (pareto.md: an 8 KB text of 2 segments extracts 1.6-1.7x slower with carry, a
    41-segment book at 0.88x).  Counted from the input alone, never from this machine's
    batch width, so every machine packs the same archive."""
    return sum(-(-count // 2) for count in segment_counts) >= rows // 2


def auto_chain(segment_counts: list[int], rows: int = DEFAULT_CPU_BATCH_WIDTH,
               limit: int = AUTO_CHAIN_LIMIT) -> int:
    """G for context carry when no G was given (``--chain``): the longest
    chain (2 at least, ``limit`` at most) whose rounds still give a decoder ``rows``
    independent rows to step together (every segment, when there are fewer), for
    entries of ``segment_counts`` segments.  A round decodes one segment of each chain
    (§3.4), so an entry of S segments offers ceil(S / G) rows: longer chains would give
    context to more segments and extraction fewer rows (pareto.md: one 41-segment book
    extracted at 0.88x with G = 2, 0.67x with G = 4, 0.49x with G = 8)."""
    need = min(rows, sum(segment_counts))
    chain = 2
    while chain < limit and sum(-(-count // (chain + 1)) for count in segment_counts) >= need:
        chain += 1
    return chain


#: Bytes per value of lockstep-v1's dtypes.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def kv_row_bytes(config: Any, segment_length: int, dtype_name: str) -> int:
    """One row's float KV cache: 2 * layers * kv_heads * head_dim * L * dtype size."""
    head_dim = getattr(config, "head_dim", None) or (
        config.hidden_size // config.num_attention_heads
    )
    dtype_size = DTYPE_BYTES[dtype_name]
    return (2 * config.num_hidden_layers * config.num_key_value_heads * head_dim
            * segment_length * dtype_size)


def cuda_batch_ceiling(free_bytes: int, config: Any, segment_length: int, dtype_name: str,
                       vocab_size: int) -> int:
    """The widest B whose KV cache and working set fit in 85% of ``free_bytes``."""
    kv = kv_row_bytes(config, segment_length, dtype_name)
    work = 4 * (vocab_size + 4 * config.hidden_size + 2 * config.intermediate_size)
    width = int(0.85 * free_bytes // (kv + work))
    if width < 1:
        raise ModelError(
            f"not enough free device memory for one row of {segment_length} tokens "
            f"({(kv + work) / 2**20:.0f} MiB needed, {free_bytes / 2**20:.0f} MiB free)"
        )
    return min(256, width // 8 * 8) if width >= 8 else width


# --------------------------------------------------------------------------- payload
def encode_params(model_index: int) -> bytes:
    return model_index.to_bytes(2, "little")


def decode_params(params: bytes) -> int:
    if len(params) != 2:
        raise CorruptArchiveError(f"llm codec params must be 2 bytes, got {len(params)}")
    return int.from_bytes(params, "little")


Escapes = list[tuple[int, int]]  # (offset in the original bytes, byte value), ascending


def build_payload(token_count: int, streams: list[bytes], escapes: Escapes | None = None) -> bytes:
    """The payload: token count, [escapes (int-v1/v2)], segment lengths, streams."""
    head = bytearray(write_varint(token_count))
    if escapes is not None:
        head += write_varint(len(escapes))
        end = 0
        for offset, value in escapes:
            head += write_varint(offset - end)
            head.append(value)
            end = offset + 1
    for stream in streams:
        head += write_varint(len(stream))
    return bytes(head) + b"".join(streams)


def parse_payload(
    payload: bytes, original_size: int, segment_length: int, with_escapes: bool = False
) -> tuple[int, Escapes, list[bytes]]:
    """Split a payload into (token_count, escapes, streams), checking every count and
    length against the bytes that are really there before anything is allocated."""
    token_count, offset = read_varint(payload, 0)
    escapes: Escapes = []
    if with_escapes:
        escape_count, offset = read_varint(payload, offset)
        if escape_count > original_size or 2 * escape_count > len(payload) - offset:
            raise CorruptArchiveError(f"llm payload: {escape_count} escapes cannot fit")
        end = 0
        for _ in range(escape_count):
            gap, offset = read_varint(payload, offset)
            if offset >= len(payload):
                raise CorruptArchiveError("llm payload: truncated escape")
            escapes.append((end + gap, payload[offset]))
            end += gap + 1
            offset += 1
        if end > original_size:
            raise CorruptArchiveError("llm payload: an escape lies past the end of the entry")
    if token_count == 0 or token_count + len(escapes) > original_size:
        raise CorruptArchiveError(
            f"llm payload: {token_count} tokens cannot encode {original_size} bytes"
        )
    segments = -(-token_count // segment_length)
    if segments > len(payload) - offset:  # every segment has a length varint of >= 1 byte
        raise CorruptArchiveError(f"llm payload: {segments} segments cannot fit")
    lengths = []
    for _ in range(segments):
        length, offset = read_varint(payload, offset)
        lengths.append(length)
    if sum(lengths) != len(payload) - offset:
        raise CorruptArchiveError("llm payload: segment lengths do not add up to the payload")
    streams = []
    for length in lengths:
        streams.append(payload[offset : offset + length])
        offset += length
    return token_count, escapes, streams


def apply_escapes(data: bytes, escapes: Escapes) -> bytes:
    """Insert the escaped bytes back at their offsets (ascending)."""
    if not escapes:
        return data
    out = bytearray()
    taken = 0
    for offset, value in escapes:
        stop = offset - len(out) + taken
        out += data[taken:stop]
        taken = stop
        out.append(value)
    out += data[taken:]
    return bytes(out)


def parse_profile(text: str) -> dict[str, Any]:
    """A model record's profile as a dict (hostile JSON is a CorruptArchiveError)."""
    from llmarc.container.json_safe import parse_profile_json

    return parse_profile_json(text)


# --------------------------------------------------------------------------- statistics
@dataclass
class CodingStats:
    """What the coder spent on one input against what the model promised (benchmarks).

    ``model_bits`` is the paper's entropy upper bound (the model's cross-entropy in
    float64 from the very logits that were coded); ``coded_bits`` the same with the
    quantized frequencies; ``tbyt_bits`` LLMZip's token-by-token code, each token taking
    ``max(1, ceil(-log2 p))`` bits; ``ranks`` the rank of each true token (0 = argmax),
    for the paper's LLaMA+zlib scheme.  ``model_bits``, ``tbyt_bits`` and ``ranks`` are
    only filled when the coder was asked to collect them (they cost a log-softmax)."""

    tokens: int = 0
    coded_bits: float = 0.0
    model_bits: float = 0.0
    tbyt_bits: int = 0
    payload_bytes: int = 0
    ranks: list[int] = field(default_factory=list)

    def add(self, other: CodingStats) -> None:
        """Accumulate another segment's figures (ranks in segment order)."""
        self.tokens += other.tokens
        self.coded_bits += other.coded_bits
        self.model_bits += other.model_bits
        self.tbyt_bits += other.tbyt_bits
        self.ranks.extend(other.ranks)


# --------------------------------------------------------------------------- segments
@dataclass(frozen=True, slots=True)
class Segment:
    """One segment to encode: its tokens, and the uncoded context fed before them (the
    tokens before it, with context carry: spec/llm-codec.md §3.4; else none)."""

    tokens: list[int]
    context: list[int] = field(default_factory=list)
    #: With mixing (§3.6): the tokens of its chain before it, whose counts it starts
    #: from (a NumPy view into the entry's tokens: no copy per segment).
    history: Sequence[int] = ()

    @property
    def positions(self) -> int:
        """Model positions the segment takes (its cost)."""
        return len(self.context) + len(self.tokens)


@dataclass(frozen=True, slots=True)
class SegmentJob:
    """One segment to decode: its range-coder stream, how many tokens it holds, the
    most bytes its tokens may produce (:func:`segment_byte_limit`: a hostile stream
    cannot make the decoder build more than that), and its context (§3.4: tokens of the
    segment before, already decoded and verified; empty without carry)."""

    stream: bytes
    count: int
    byte_limit: int
    context: list[int] = field(default_factory=list)
    history: Sequence[int] = ()  # with mixing (§3.6): its chain's tokens before it

    @property
    def positions(self) -> int:
        """Model positions the segment takes at most (its cost)."""
        return len(self.context) + self.count


def segment_byte_limit(original_size: int, escape_count: int, token_count: int,
                       count: int) -> int:
    """The most bytes a segment of ``count`` tokens may decode to (spec/llm-codec.md
    §3.3): the entry's text is its original size less its escapes, and every token of
    the other segments gives at least one byte.  Segments decode independently (on any
    thread, in any order), so this bound needs nothing from the others, and a segment
    that passes it proves the text too long before the segments are joined."""
    return original_size - escape_count - (token_count - count)


def split_segments(tokens: list[int], length: int, carry: int = 0,
                   chain: int = 1, mix: bool = False) -> list[Segment]:
    """Cut an entry's tokens into segments of ``length`` (the last may be shorter), each
    with its context (spec/llm-codec.md §3.4): the ``carry`` tokens before it (as many as
    there are: an archive's C is at most L), unless it starts a chain of ``chain``
    segments; with ``mix``, also its chain's tokens before it (§3.6)."""
    every = np.asarray(tokens, dtype=np.int64) if mix else None
    return [Segment(tokens[begin : begin + length],
                    tokens[max(0, begin - carry) : begin] if carry and index % chain else [],
                    () if every is None else every[begin - index % chain * length : begin])
            for index, begin in enumerate(range(0, len(tokens), length))]


class SegmentCoder:
    """Entry-level coding (payloads) over two segment-level primitives.

    Segments are independent by design, so *where* they are coded does not matter:
    :class:`LLMCodec` codes them in this process; a distributed coder (Ray) sends them
    to workers.  Both inherit the payload assembly here, so their archives are the same
    byte for byte."""

    settings: CodingSettings
    table: list[bytes | None]

    def encode_segments(
        self,
        segments: list[Segment],
        progress: ProgressCallback | None = None,
        collect_stats: bool = False,
    ) -> list[tuple[bytes, CodingStats]]:
        """Code each segment (at most L tokens, after its context) into its own stream
        (input order kept)."""
        raise NotImplementedError

    def decode_segments(
        self, jobs: list[SegmentJob], progress: ProgressCallback | None = None
    ) -> list[list[int] | CorruptArchiveError]:
        """Decode each segment's tokens (without its context); a hostile stream gives an
        error in its slot."""
        raise NotImplementedError

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Keep what several calls share (a Ray coder's actors, each with the model
        loaded) alive until the block ends; a local coder has nothing to keep."""
        yield

    @staticmethod
    def count_tokens(jobs: Iterable[tuple[bytes, int]]) -> int:
        """Total tokens of (payload, size) jobs, for progress (malformed payloads count 0)."""
        total = 0
        for payload, _size in jobs:
            with contextlib.suppress(CorruptArchiveError):
                total += read_varint(payload, 0)[0]
        return total

    def encode_many(
        self,
        token_lists: list[list[int]],
        progress: ProgressCallback | None = None,
        collect_stats: bool = False,
        escapes: list[Escapes] | None = None,
    ) -> tuple[list[bytes], list[CodingStats]]:
        """Code each token list into an llm payload; return payloads and per-entry stats.

        ``escapes`` (int-v1/v2 payloads) are the bytes cut out of each entry before it was
        tokenized; None writes the lockstep-v1 layout, which has no escape list."""
        settings = self.settings
        owners: list[int] = []
        segments: list[Segment] = []
        for owner, tokens in enumerate(token_lists):
            for part in split_segments(tokens, settings.segment_length, settings.carry,
                                       settings.chain, bool(settings.mix)):
                owners.append(owner)
                segments.append(part)
        coded = self.encode_segments(segments, progress, collect_stats)
        streams: list[list[bytes]] = [[] for _ in token_lists]
        stats = [CodingStats() for _ in token_lists]
        for owner, (stream, segment_stats) in zip(owners, coded, strict=True):
            streams[owner].append(stream)
            stats[owner].add(segment_stats)
        payloads = []
        for owner, tokens in enumerate(token_lists):
            own_escapes = None if escapes is None else escapes[owner]
            payloads.append(build_payload(len(tokens), streams[owner], own_escapes))
            stats[owner].payload_bytes = len(payloads[-1])
        return payloads, stats

    def decode_many(
        self,
        jobs: Iterable[tuple[bytes, int]],
        progress: ProgressCallback | None = None,
    ) -> list[bytes | CorruptArchiveError]:
        """Decode (payload, original_size) pairs back into bytes (input order kept).

        A hostile payload gives a CorruptArchiveError *in its slot* (the others still
        decode); wrong-but-plausible output cannot be ruled out here and is caught by the
        caller's SHA-256.

        Segments are decoded in rounds over chains (spec/llm-codec.md §3.4): round r
        decodes segment r of every chain at hand as independent rows, each fed the tail
        of the segment round r - 1 decoded.  Without context carry every segment is its
        own chain, and one round decodes them all.
        """
        settings, table = self.settings, self.table
        length, carry = settings.segment_length, settings.carry
        chain = settings.chain if carry else 1
        with_escapes = settings.engine in INTEGER_ENGINES
        jobs = list(jobs)
        results: list[bytes | CorruptArchiveError] = [b""] * len(jobs)
        escapes: list[Escapes] = [[] for _ in jobs]
        chains: list[list[_Chain]] = [[] for _ in jobs]  # each entry's, in text order

        def failed(owner: int) -> bool:
            return isinstance(results[owner], CorruptArchiveError)

        def pending_chains() -> Iterator[_Chain]:
            """Every chain of segments, one payload at a time: the per-segment state of a
            payload of a million one-token segments is never all alive."""
            for owner, (payload, original_size) in enumerate(jobs):
                try:
                    token_count, escapes[owner], streams = parse_payload(
                        payload, original_size, length, with_escapes
                    )
                except CorruptArchiveError as exc:
                    results[owner] = exc
                    continue
                for first in range(0, len(streams), chain):
                    if failed(owner):
                        break  # a segment failed (in an earlier chunk): the entry is corrupt
                    links = []
                    for index in range(first, min(first + chain, len(streams))):
                        count = min(length, token_count - index * length)
                        limit = segment_byte_limit(original_size, len(escapes[owner]),
                                                   token_count, count)
                        links.append(SegmentJob(streams[index], count, limit))
                    chains[owner].append(_Chain(owner, links))
                    yield chains[owner][-1]

        pending = pending_chains()
        while chunk := _take_chains(pending, DECODE_CHUNK):  # bounded live state
            for depth in range(max(len(link.jobs) for link in chunk)):
                live = [link for link in chunk if depth < len(link.jobs) and not failed(link.owner)]
                round_jobs = [dataclasses.replace(link.jobs[depth], context=link.tail,
                                                  history=tuple(link.history))
                              for link in live]
                for link, decoded in zip(live, self.decode_segments(round_jobs, progress),
                                         strict=True):
                    if failed(link.owner):
                        continue
                    if isinstance(decoded, CorruptArchiveError):
                        results[link.owner] = decoded
                        chains[link.owner] = []
                        continue
                    link.parts.append(b"".join(table[t] for t in decoded))  # type: ignore[misc]
                    link.tail = decoded[len(decoded) - carry:] if carry else []
                    if settings.mix:
                        link.history.extend(decoded)
        for owner, (_payload, original_size) in enumerate(jobs):
            if failed(owner):
                continue
            text = b"".join(part for link in chains[owner] for part in link.parts)
            chains[owner] = []
            data = apply_escapes(text, escapes[owner])
            if len(data) > original_size:
                results[owner] = CorruptArchiveError(
                    "llm stream decodes to more bytes than recorded"
                )
            else:
                results[owner] = data
        return results


@dataclass(eq=False)
class _Chain:
    """One chain of an entry's segments being decoded round by round (§3.4)."""

    owner: int  # index of the entry
    jobs: list[SegmentJob]  # its segments, in order
    parts: list[bytes] = field(default_factory=list)  # decoded bytes, segment by segment
    tail: list[int] = field(default_factory=list)  # the next segment's context
    history: list[int] = field(default_factory=list)  # with mixing: every token so far


def _take_chains(pending: Iterator[_Chain], segments: int) -> list[_Chain]:
    """Chains from ``pending`` up to about ``segments`` segments (one chain at least)."""
    chunk: list[_Chain] = []
    total = 0
    for link in pending:
        chunk.append(link)
        total += len(link.jobs)
        if total >= segments:
            break
    return chunk


@dataclass
class _Row:
    """One segment being coded in a lockstep group."""

    slot: int  # index into the caller's segment list
    length: int  # positions: the segment's context and tokens
    tokens: list[int] = field(default_factory=list)  # context, then: encode known; decode grows
    produced: int = 0  # decode: bytes the decoded tokens stand for
    error: CorruptArchiveError | None = None  # a decoding failure stops only this row
    #: Leading tokens known before stepping (fed, not coded): the context, and for a
    #: decoder also a first token decoded without the model (_first_tokens).
    given: int = 0
    context: int = 0  # leading tokens that are context (§3.4), not the segment's
    history: Sequence[int] = ()  # with mixing (§3.6): its chain's tokens before it
    mixer: NgramMixer | None = None  # made at its first coded token, dropped at its end


def _groups(rows: list[_Row], width: int) -> list[list[_Row]]:
    """Rows sorted longest first (short segments waste few steps), ``width`` at a time."""
    ordered = sorted(rows, key=lambda row: (-row.length, row.slot))
    return [ordered[start : start + width] for start in range(0, len(ordered), width)]


def _group_width(rows: int, batch_width: int, workers: int) -> int:
    """Rows per stepped group: at most ``batch_width`` in flight across the ``workers``
    threads, in a multiple of ``workers`` groups of about equal size (so no thread steps
    the last group alone while the others idle)."""
    per_worker = max(1, batch_width // workers)
    groups = -(-rows // per_worker)
    groups = -(-groups // workers) * workers
    return max(1, -(-rows // groups))


class LLMCodec(SegmentCoder):
    """Codes segments in this process with a loaded model and fixed coding settings.

    lockstep-v1 encodes and decodes by the same fixed-width stepping (its float logits
    depend on the batch shape).  The integer engines' logits do not, so the encoder runs
    one parallel forward pass per batch of segments (prefill) and the decoder steps as
    many rows as it has segments, up to ``settings.batch_width``."""

    def __init__(self, loaded: Any, settings: CodingSettings) -> None:
        settings.validate()
        self.loaded = loaded
        self.settings = settings
        self.table = loaded.table
        self._lockstep: Any = None  # lockstep-v1's engine, made when first needed
        self._first_table: np.ndarray | None = None  # position 0's cumulative frequencies

    def _integer(self, positions: int) -> Any:
        """The integer model of this engine, with rotary tables for at least
        ``positions`` (the longest segment at hand, not the profile's L: a hostile L
        costs nothing)."""
        return self.loaded.integer_model(positions, self.settings.engine)

    def _lockstep_engine(self) -> Any:
        """lockstep-v1's engine, made when first needed.  Its shape is recorded in the
        archive (its numbers depend on it), so its memory is checked against the
        machine's before anything is allocated."""
        if self._lockstep is None:
            from llmarc.inference.engine import EngineShape, LockstepEngine

            shape = EngineShape(self.settings.batch_width, self.settings.segment_length)
            _check_lockstep_memory(self.loaded, shape)
            self._lockstep = LockstepEngine(self.loaded.model, shape)
        return self._lockstep

    def _run_groups(
        self,
        rows: list[_Row],
        code_row: Callable[[_Row, int, np.ndarray, Any], int],
        progress: ProgressCallback | None,
    ) -> None:
        """Step the engine over all rows; ``code_row`` codes one token of a row from its
        cumulative frequency table (and float logits) and returns the token fed next.

        lockstep-v1 steps groups of its recorded width.  An integer engine is made only
        after the payloads were validated, and sized by the work: at most
        ``batch_width`` rows of the longest segment's positions in all, in groups split
        among worker threads (:mod:`llmarc.inference.threads`), each with its own cache."""
        if not rows:
            return
        if self.settings.engine == ENGINE_LOCKSTEP:
            engine = self._lockstep_engine()
            for group in _groups(rows, self.settings.batch_width):
                self._step_group(engine, self.settings.batch_width, group, code_row, progress,
                                 None)
            return
        from llmarc.inference import threads

        positions = max(row.length for row in rows)
        model = self._integer(positions)
        workers = threads.worker_count(model, min(len(rows), self.settings.batch_width),
                                       threads.STEP_ROWS_PER_THREAD)
        width = _group_width(len(rows), self.settings.batch_width, workers)
        report = threads.locked(progress) if workers > 1 else progress
        steppers = threading.local()  # one cache per thread, reused by its groups

        def step(group: list[_Row], stop: threading.Event) -> None:
            stepper = getattr(steppers, "engine", None)
            if stepper is None:
                stepper = steppers.engine = model.stepper(width, positions)
            self._step_group(stepper, width, group, code_row, report, stop)

        threads.run_split(_groups(rows, width), step, workers)

    def _step_group(
        self,
        engine: Any,
        width: int,
        group: list[_Row],
        code_row: Callable[[_Row, int, np.ndarray, Any], int],
        progress: ProgressCallback | None,
        stop: threading.Event | None,
    ) -> None:
        """One group of rows (at most ``width``, the engine's) from position 0 to its
        longest row's end.  A row whose ``code_row`` raises CorruptArchiveError keeps its
        error and is fed padding from then on, so one bad segment cannot spoil its
        companions."""
        from llmarc.entropy.fast import frequency_tables
        from llmarc.inference.threads import Cancelled

        start = self.loaded.start_token
        engine.reset()
        feed = np.full(width, start, dtype=np.int64)
        # Positions every row knows (their contexts) go in one forward pass where the
        # engine has one: they code nothing, and a pass is cheaper than as many steps.
        known = min(row.given for row in group) if hasattr(engine, "prefill") else 0
        if known > 1:
            inputs = np.full((width, known), start, dtype=np.int64)
            for r, row in enumerate(group):
                inputs[r, 1:] = row.tokens[: known - 1]
                feed[r] = row.tokens[known - 1]
            engine.prefill(inputs)
        else:
            known = 0
        tables = picked = None  # made at the first step, reused by every step after it
        for t in range(known, group[0].length):
            if stop is not None and stop.is_set():
                raise Cancelled
            logits = engine.step(feed)
            active = [r for r, row in enumerate(group) if t < row.length and row.error is None]
            if not active:
                break
            next_feed = [start] * width
            for r in active:
                if t < group[r].given:  # decoded already: the step only fills the cache
                    next_feed[r] = group[r].tokens[t]
            active = [r for r in active if t >= group[r].given]
            if not active:
                feed = np.array(next_feed, dtype=np.int64)
                continue
            if tables is None:
                tables = np.empty(logits.shape, dtype=np.int64)
                picked = np.empty_like(logits)
            count = len(active)
            if count < width:  # rows that ended or failed get no table
                logits = np.take(logits, active, axis=0, out=picked[:count])
            ends = frequency_tables(logits, self.settings.precision,
                                    cumulative=True, out=tables[:count])
            for i, r in enumerate(active):
                try:
                    next_feed[r] = code_row(group[r], t, ends[i], logits[i])
                except CorruptArchiveError as exc:
                    group[r].error = exc.with_traceback(None)  # frames would hold the group
                    group[r].mixer = None
            feed = np.array(next_feed, dtype=np.int64)
            if progress is not None:
                progress(count)

    def _prefill_batches(self, rows: list[_Row]) -> list[tuple[list[_Row], Any]]:
        """(rows, tokens fed [N, T]) for batches of known segments, integer engines only.

        Rows are sorted longest first and stacked while N * T <= PREFILL_POSITIONS (one
        row at least); shorter rows are padded with the start token at their end, whose
        logits are ignored (rows do not influence each other)."""
        start = self.loaded.start_token
        ordered = sorted(rows, key=lambda row: (-row.length, row.slot))
        batches = []
        index = 0
        while index < len(ordered):
            longest = ordered[index].length
            count = max(1, PREFILL_POSITIONS // longest)
            batch = ordered[index : index + count]
            index += len(batch)
            feed = np.full((len(batch), longest), start, dtype=np.int64)
            for i, row in enumerate(batch):
                feed[i, 1 : row.length] = row.tokens[: row.length - 1]
            batches.append((batch, feed))
        return batches

    def encode_segments(
        self,
        segments: list[Segment],
        progress: ProgressCallback | None = None,
        collect_stats: bool = False,
    ) -> list[tuple[bytes, CodingStats]]:
        from llmarc.entropy.rangecoder import RangeEncoder

        precision = self.settings.precision
        encoders = [RangeEncoder(precision) for _ in segments]
        stats = [CodingStats(tokens=len(segment.tokens)) for segment in segments]
        one = 1 << precision

        def code(row: _Row, token: int, start: int, freq: int) -> None:
            total = one
            if self.settings.mix:  # §3.6: code against the mixed table instead
                start, freq, total = self._mixer(row, 0).interval(token, start, freq)
            encoders[row.slot].encode(start, freq, total)
            stats[row.slot].coded_bits -= math.log2(freq / total)

        def code_row(row: _Row, t: int, ends: np.ndarray, logits: Any) -> int:
            token = row.tokens[t]
            start = int(ends[token - 1]) if token else 0
            code(row, token, start, int(ends[token]) - start)
            return token

        rows = [_Row(slot, segment.positions, [*segment.context, *segment.tokens],
                     given=len(segment.context), context=len(segment.context),
                     history=segment.history)
                for slot, segment in enumerate(segments)]
        if self.settings.engine == ENGINE_LOCKSTEP:
            def stepped(row: _Row, t: int, freqs: np.ndarray, logits: Any) -> int:
                if collect_stats:
                    _add_model_stats(stats[row.slot], logits[None], [row.tokens[t]])
                return code_row(row, t, freqs, logits)

            self._run_groups(rows, stepped, progress)
        elif rows:
            def model_stats(row: _Row, logits: Any, tokens: list[int]) -> None:
                _add_model_stats(stats[row.slot], logits, tokens)

            self._prefill(rows, code, model_stats if collect_stats else None, progress)
        return [(encoder.finish(), own) for encoder, own in zip(encoders, stats, strict=True)]

    def _mixer(self, row: _Row, coded: int) -> NgramMixer:
        """The row's n-gram mixer (§3.6), made from its chain's tokens before it and the
        ``coded`` first tokens of its segment.  Made when first needed and dropped when
        the row ends, so only rows being stepped hold one; a row that starts a chain
        may decode its first token with a mixer made for it alone (_first_tokens): with
        no counts the weight's step is exactly 0, so the one made later is the same."""
        if row.mixer is None:
            done = row.tokens[row.context : row.context + coded]
            row.mixer = NgramMixer([*row.history, *done], self.settings.mix,
                                   self.settings.precision, len(self.table))
        return row.mixer

    def _prefill(
        self,
        rows: list[_Row],
        code: Callable[[_Row, int, int, int], None],
        model_stats: Callable[[_Row, Any, list[int]], None] | None,
        progress: ProgressCallback | None,
    ) -> None:
        """Integer engines: code known segments from one forward pass per batch, the
        batches split among worker threads (:mod:`llmarc.inference.threads`)."""
        from llmarc.entropy.fast import token_intervals
        from llmarc.inference import threads

        model = self._integer(max(row.length for row in rows))
        batches = self._prefill_batches(rows)
        workers = threads.worker_count(model, len(batches))
        report = threads.locked(progress) if workers > 1 else progress

        def encode(item: tuple[list[_Row], Any], _stop: threading.Event) -> None:
            batch, feed = item
            final, scales = model.final_rows(feed)
            for i, row in enumerate(batch):
                for begin in range(row.given, row.length, FREQUENCY_ROWS):
                    end = min(row.length, begin + FREQUENCY_ROWS)
                    logits = model.lm_head_logits(final[i, begin:end], scales[i, begin:end])
                    tokens = row.tokens[begin:end]
                    starts, freqs = token_intervals(logits, np.asarray(tokens),
                                                    self.settings.precision)
                    for token, start, freq in zip(tokens, starts.tolist(), freqs.tolist(),
                                                  strict=True):
                        code(row, token, start, freq)
                    if model_stats is not None:
                        model_stats(row, logits, tokens)
                row.mixer = None
                if report is not None:
                    report(row.length - row.given)

        threads.run_split(batches, encode, workers)

    def decode_segments(
        self, jobs: list[SegmentJob], progress: ProgressCallback | None = None
    ) -> list[list[int] | CorruptArchiveError]:
        from llmarc.entropy.rangecoder import RangeDecoder

        precision, table = self.settings.precision, self.table
        decoders = [RangeDecoder(job.stream, precision) for job in jobs]

        def code_row(row: _Row, t: int, ends: np.ndarray, logits: Any) -> int:
            if self.settings.mix:  # §3.6: the mixed table
                mixer = self._mixer(row, len(row.tokens) - row.context)
                token = mixer.decode(decoders[row.slot], ends)
            else:
                token = decoders[row.slot].decode_cumulative(ends)
            piece = table[token]
            if piece is None:
                raise CorruptArchiveError(f"llm stream decoded the non-text token {token}")
            row.produced += len(piece)
            if row.produced > jobs[row.slot].byte_limit:
                raise CorruptArchiveError("llm stream decodes to more bytes than recorded")
            row.tokens.append(token)
            if len(row.tokens) == row.length:
                row.mixer = None
            return token

        rows = [_Row(slot, job.positions, list(job.context), given=len(job.context),
                     context=len(job.context), history=job.history)
                for slot, job in enumerate(jobs)]
        stepped = rows
        if self.settings.engine in INTEGER_ENGINES:
            cold = [row for row in rows if not row.context]
            stepped = [row for row in rows if row.context]
            stepped += self._first_tokens(cold, code_row, progress)
        self._run_groups(stepped, code_row, progress)
        return [row.error if row.error is not None else row.tokens[row.context:]
                for row in rows]

    def _first_tokens(
        self,
        rows: list[_Row],
        code_row: Callable[[_Row, int, np.ndarray, Any], int],
        progress: ProgressCallback | None,
    ) -> list[_Row]:
        """Decode every row's first token from the one table all segments share; return
        the rows that still need the model.

        Every segment without context starts with the start token at position 0, so
        with an integer engine (whose logits depend on a row's tokens alone) its first
        prediction is the same for all: computed once per codec.  A payload of a million
        one-token segments (or of segments whose streams fail at once) then costs a
        range decoder step each, not a model step per row."""
        if self._first_table is None:
            from llmarc.entropy.fast import frequency_tables

            model = self._integer(1)
            logits = model.prefill(np.array([[self.loaded.start_token]]))[0]
            self._first_table = frequency_tables(logits, self.settings.precision,
                                                 cumulative=True)[0]
        table = self._first_table
        for row in rows:
            try:
                code_row(row, 0, table, None)
            except CorruptArchiveError as exc:
                row.error = exc.with_traceback(None)  # its frames would keep every row alive
            row.given = 1
            row.mixer = None  # every row here decodes; only stepped ones may hold one
        if progress is not None and rows:
            progress(len(rows))
        return [row for row in rows if row.error is None and row.length > 1]


def _check_lockstep_memory(loaded: Any, shape: Any) -> None:
    """Refuse a lockstep-v1 profile whose recorded KV cache cannot fit in memory."""
    import os

    need = shape.batch_width * kv_row_bytes(
        loaded.config, shape.segment_length, loaded.dtype_name
    )
    try:
        available = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):  # pragma: no cover - non-POSIX
        return
    if loaded.device.type == "cpu" and need > available // 2:
        raise ModelError(
            f"this lockstep-v1 archive needs a {need / 2**30:.1f} GiB cache "
            f"(batch width {shape.batch_width}, segment length {shape.segment_length}); "
            f"{available / 2**30:.1f} GiB are free"
        )


def _add_model_stats(own: CodingStats, logits: Any, tokens: list[int]) -> None:
    """Add the cross-entropy, TbyT bits and ranks of ``tokens`` under float32 ``logits``.

    log p = z_t - logsumexp(z) in float32 (relative error ~1e-7, far below what the
    statistics report) and ranks counted on the float32 logits (the order log_softmax
    keeps), with int32 sums: a fifth of the time of a float64 log_softmax and an int64
    count, which had been 18 % of a benchmark pack."""
    picked = logits[np.arange(len(tokens)), np.asarray(tokens)]
    top = logits.max(axis=-1)
    log_sum = top + np.log(np.exp(logits - top[:, None]).sum(axis=-1, dtype=np.float32))
    log_probs = (picked - log_sum).astype(np.float64)
    ranks = (logits > picked[:, None]).sum(axis=-1, dtype=np.int32)
    for log_prob, rank in zip(log_probs.tolist(), ranks.tolist(), strict=True):
        bits = -log_prob / math.log(2)
        own.model_bits += bits
        own.tbyt_bits += max(1, math.ceil(bits))
        own.ranks.append(int(rank))
