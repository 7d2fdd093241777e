"""Glue between the container and the LLM codec: choosing, encoding and decoding entries.

The packer hands over its text entries a window at a time (:class:`TextEncoder`), many at
once, because the codec fills its B lockstep rows with segments of many files; the
reader hands over all llm members it must decode (:class:`LLMDecoder`).  Both sides load
the model lazily, so archives without LLM entries never import torch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from llmarc.codecs import CODEC_LLM
from llmarc.codecs.llm import (
    AUTO_CARRY,
    AUTO_MIX,
    DEFAULT_CPU_BATCH_WIDTH,
    ENGINE_LOCKSTEP,
    INTEGER_ENGINES,
    MAX_CHAIN,
    MAX_MIX_ORDER,
    MAX_POSITIONS,
    CodingSettings,
    CodingStats,
    LLMCodec,
    SegmentCoder,
    auto_chain,
    build_profile,
    carry_pays,
    check_model,
    decode_params,
    default_batch_width,
    encode_params,
    parse_profile,
    planned_segments,
    settings_from_profile,
)
from llmarc.codecs.llm_options import LLMOptions
from llmarc.container.layout import ModelRecord
from llmarc.errors import CorruptArchiveError, ModelError
from llmarc.model.fingerprint import canonical_json

Warn = Callable[[str], None]


def llm_available(options: LLMOptions) -> str | None:
    """None if the LLM codec can run here, else the reason (for a clear warning).

    Finds what the engine needs without importing it: numba for the integer engines on
    the CPU; torch for ``--device cuda``; torch and transformers for lockstep-v1.
    Importing them takes seconds, and a pack that is refused (an existing OUT, a bad
    path) or has no text must not wait for it. The import happens when an LLM entry is
    about to be coded."""
    import importlib.util

    needed = {"numba": "llmarc"}
    if options.engine == ENGINE_LOCKSTEP:
        needed = {"torch": "llmarc[lockstep]", "transformers": "llmarc[lockstep]"}
    elif options.device.startswith("cuda"):
        needed["torch"] = "llmarc[cuda]"
    for module, extra in needed.items():
        try:
            found = importlib.util.find_spec(module) is not None
        except (ImportError, ValueError):  # a finder that refuses it, a broken entry
            found = False
        if not found:
            return f"the LLM codec needs {module} (pip install '{extra}')"
    try:
        from llmarc.model.sources import resolve

        resolve(options.model)
    except ModelError as exc:
        return str(exc)
    return None


def check_carry(options: LLMOptions, window: int) -> None:
    """Refuse (ModelError, a user's mistake) carry options that no archive may record
    (spec/llm-codec.md §2.2, §3.4), before any text is coded.  ``carry`` None (auto) is
    never refused: it resolves to what fits (:func:`resolve_carry`)."""
    carry, chain, length = options.carry, options.chain, options.segment_length
    if options.mix and carry == 0:
        raise ModelError("--mix needs context carry (--carry C): it learns along chains")
    if carry:
        if options.engine not in INTEGER_ENGINES:
            raise ModelError(f"--carry needs the int-v1 or int-v2 engine, not "
                             f"{options.engine}")
        if not 1 <= carry <= length:
            raise ModelError(f"--carry {carry} is outside 1..{length} (the segment length)")
        if not _fits(length, carry, window):
            raise ModelError(f"--segment-length {length} plus --carry {carry} exceeds the "
                             f"model's window of {min(window, MAX_POSITIONS)} positions")
    if chain is not None and not 2 <= chain <= MAX_CHAIN:
        raise ModelError(f"--chain {chain} is outside 2..{MAX_CHAIN}")
    if options.mix and not 1 <= options.mix <= MAX_MIX_ORDER:
        raise ModelError(f"--mix {options.mix} is outside 1..{MAX_MIX_ORDER}")


def _fits(length: int, carry: int, window: int) -> bool:
    """Whether rows of L + C positions fit the model's window and §3.2's bound."""
    return length + carry <= min(window, MAX_POSITIONS)


def resolve_carry(options: LLMOptions, window: int, segment_counts: list[int]
                  ) -> tuple[int, int, int]:
    """(carry C, chain G, mix K) for a pack of entries of ``segment_counts`` segments,
    options already checked (:func:`check_carry`).  ``--carry auto`` carries
    min(AUTO_CARRY, L) tokens with an integer engine when :func:`carry_pays` and the
    window holds L + C, else nothing; ``--mix auto`` mixes AUTO_MIX orders whenever
    carry is on; a G not given is :func:`auto_chain`'s."""
    length, carry = options.segment_length, options.carry
    if carry is None:
        carry = min(AUTO_CARRY, length)
        if (options.engine not in INTEGER_ENGINES or not carry_pays(segment_counts)
                or not _fits(length, carry, window)):
            carry = 0
    if not carry:
        return 0, 1, 0
    mix = AUTO_MIX if options.mix is None else options.mix
    return carry, options.chain or auto_chain(segment_counts), mix


def make_coder(loaded: Any, settings: CodingSettings, options: LLMOptions) -> SegmentCoder:
    """The segment coder for these options: in this process, or on a Ray cluster."""
    if options.ray is not None:
        from llmarc.distributed.ray_coder import RayCoder

        return RayCoder(loaded, settings, options)
    return LLMCodec(loaded, settings)


@dataclass
class EncodedEntry:
    """The outcome for one text entry: which codec won, its params and stored bytes."""

    codec_id: int
    params: bytes
    payload: bytes


class TokenCounter:
    """Feeds the LLM codec's token counts to a progress sink's token bar, if it has one."""

    def __init__(self, progress: Any, total: int, description: str) -> None:
        factory = getattr(progress, "token_task", None)
        self._task = factory(total, description) if factory is not None else None
        #: Status lines from the coder (Ray: workers ready, restarted, alive), if shown.
        self.note = getattr(progress, "note", None)

    def __call__(self, tokens: int) -> None:
        if self._task is not None:
            self._task.advance(tokens)

    def close(self) -> None:
        if self._task is not None:
            self._task.close()


#: Text bytes an integer-engine pack reads, tokenizes and codes at a time (a *window*):
#: the packer writes a window's entries before it reads the next, so the process that
#: writes the archive (a Ray driver too) holds one window's text, tokens and payloads
#: (about ten times the text), whatever the corpus's size.  Windows do not change the
#: archive: int-v1/v2 code every entry alone.  lockstep-v1 codes all entries as one
#: window (its numbers depend on its groups, and its recorded B on their count).
WINDOW_BYTES = 16 << 20


def window_bytes(options: LLMOptions) -> int | None:
    """The window for packing with ``options`` (None: every entry at once)."""
    return WINDOW_BYTES if options.engine in INTEGER_ENGINES else None


Item = TypeVar("Item")


def windows(items: Iterable[Item], size: Callable[[Item], int],
            limit: int | None) -> Iterator[list[Item]]:
    """Consecutive runs of ``items`` of at most ``limit`` bytes each (one item at least);
    everything at once for None."""
    if limit is None:
        yield list(items)
        return
    window: list[Item] = []
    total = 0
    for item in items:
        if window and total + size(item) > limit:
            yield window
            window, total = [], 0
        window.append(item)
        total += size(item)
    if window:
        yield window


class TextEncoder:
    """LLM-codes text entries, one window at a time (:meth:`encode`), with one model and
    one segment coder for all windows (a Ray coder keeps its actors from the first
    window to :meth:`close`).  The model loads at the first window."""

    def __init__(self, options: LLMOptions, *, forced: bool,
                 add_model: Callable[[ModelRecord], int], sizes: list[int],
                 progress: Any = None, status: Warn | None = None) -> None:
        self.options, self.forced, self.add_model = options, forced, add_model
        self.progress, self.status = progress, status
        #: Bytes of every text the pack will hand over, in all windows: carry and chain
        #: are chosen from them (:func:`resolve_carry`).
        self.sizes = sizes
        self._loaded: Any = None
        self._tokenizer: Any = None
        self._coder: SegmentCoder | None = None
        self._settings: CodingSettings | None = None
        self._model_index: int | None = None
        self._stats: dict[str, CodingStats] = {}
        self._sessions = contextlib.ExitStack()

    def _load(self) -> None:
        from llmarc.model.loader import load_model
        from llmarc.model.tokenize import LosslessTokenizer

        options = self.options
        loaded = load_model(options.model, device=options.device, dtype=options.dtype,
                            threads=options.threads, status=self.status, engine=options.engine)
        length = options.segment_length
        if not 1 <= length <= loaded.context_window:
            raise ModelError(f"segment length {length} is outside 1..{loaded.context_window}")
        check_carry(options, loaded.context_window)
        self._loaded = loaded
        self._tokenizer = LosslessTokenizer(loaded.tokenizer, loaded.table)

    def encode(self, datas: list[bytes], names: list[str],
               zstd_size: Callable[[bytes], int]) -> list[EncodedEntry | None]:
        """LLM-code one window of entries; return per entry the winner (None: the caller
        uses zstd/store).

        With ``forced`` (``--codec llm``) every representable entry keeps the LLM
        payload; otherwise (``auto``) an entry keeps it only when it is smaller than both
        zstd and the original.  The model record is registered (``add_model``) once, when
        the first entry keeps an LLM payload."""
        from llmarc.model.tokenize import UnrepresentableBytesError

        if not datas:
            return []
        if self._loaded is None:
            self._load()
        loaded, options, tokenizer = self._loaded, self.options, self._tokenizer
        length = options.segment_length
        escaping = options.engine in INTEGER_ENGINES  # their payloads carry escaped bytes
        token_lists: list[list[int] | None] = []
        escape_lists: list[list[tuple[int, int]]] = []
        for data in datas:
            escapes: list[tuple[int, int]] = []
            try:
                if escaping:
                    data, escapes = tokenizer.split_escapes(data)
                token_lists.append(tokenizer.encode(data) if data else None)
            except UnrepresentableBytesError:
                token_lists.append(None)  # a byte the vocabulary lacks: zstd/store instead
            escape_lists.append(escapes)
        todo = [i for i, t in enumerate(token_lists) if t]
        if self._coder is None:
            counts = [-(-len(token_lists[i]) // length) for i in todo]  # type: ignore[arg-type]
            width = options.batch_width or default_batch_width(loaded, length, sum(counts))
            carry, chain, mix = resolve_carry(options, loaded.context_window,
                                              planned_segments(self.sizes, length))
            self._settings = CodingSettings(width, length, engine=options.engine,
                                            carry=carry, chain=chain, mix=mix)
            self._coder = make_coder(loaded, self._settings, options)
            self._sessions.enter_context(self._coder.session())
        total_tokens = sum(len(token_lists[i]) for i in todo)  # type: ignore[arg-type]
        counter = TokenCounter(self.progress, total_tokens,
                               f"llm coding ({loaded.source.display_name})")
        try:
            payloads, stats = self._coder.encode_many(
                [token_lists[i] for i in todo],  # type: ignore[misc]
                progress=counter,
                collect_stats=options.on_encoded is not None,
                escapes=[escape_lists[i] for i in todo] if escaping else None,
            )
        finally:
            counter.close()
        if options.on_encoded is not None:
            self._stats.update({names[i]: own for i, own in zip(todo, stats, strict=True)})
        results: list[EncodedEntry | None] = [None] * len(datas)
        for i, payload in zip(todo, payloads, strict=True):
            if not self.forced and len(payload) >= min(zstd_size(datas[i]), len(datas[i])):
                continue
            if self._model_index is None:
                profile = build_profile(loaded, self._settings)
                self._model_index = self.add_model(ModelRecord(
                    loaded.fingerprint, loaded.source.display_name, canonical_json(profile)))
            results[i] = EncodedEntry(CODEC_LLM, encode_params(self._model_index), payload)
        return results

    def close(self) -> None:
        """End the coder's session (a Ray coder's actors) and report the statistics of
        every window to ``on_encoded``."""
        self._sessions.close()
        if self.options.on_encoded is not None and self._loaded is not None:
            self.options.on_encoded(self._stats)

    def __enter__(self) -> TextEncoder:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self._sessions.close()


def adopted_threads(recorded: int, warn: Warn | None) -> int:
    """The thread count a lockstep-v1 decoder adopts: the recorded one, but at most this
    machine's CPUs (spec/llm-codec.md §6.1).

    A hostile profile may record 1,024 threads (the range's top): so many OpenMP threads
    ran out of memory (a MemoryError traceback) and would crawl on a few cores.  Fewer
    threads may change lockstep-v1's float numbers, as any other environment difference
    does, so the decoder warns and the SHA-256 decides."""
    import os

    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        cpus = os.cpu_count() or 1
    if recorded <= cpus:
        return recorded
    if warn is not None:
        warn(f"the archive was made with {recorded} threads, this machine has {cpus} CPUs: "
             f"decoding with {cpus} (verified by SHA-256)")
    return cpus


class LLMDecoder:
    """Decodes llm members of one archive, loading each needed model once."""

    def __init__(self, models: list[ModelRecord], options: LLMOptions, warn: Warn | None) -> None:
        self.models = models
        self.options = options
        self.warn = warn
        self._current: tuple[int, SegmentCoder] | None = None  # one model at a time
        self._sessions: contextlib.ExitStack | None = None  # inside :meth:`session`

    def _codec(self, model_index: int, status: Warn | None = None) -> SegmentCoder:
        if self._current is not None and self._current[0] == model_index:
            return self._current[1]
        if model_index >= len(self.models):
            raise CorruptArchiveError(
                f"llm entry names model {model_index} but the table has {len(self.models)}"
            )
        from llmarc.model.loader import load_model

        record = self.models[model_index]
        profile = parse_profile(record.profile)
        settings = settings_from_profile(
            profile, self.options.batch_width or DEFAULT_CPU_BATCH_WIDTH
        )
        lockstep = settings.engine == ENGINE_LOCKSTEP
        threads = self.options.threads
        if lockstep:
            threads = adopted_threads(profile["threads"], self.warn)
        self._current = None  # the previous model is released before the next loads
        loaded = load_model(
            self.options.model,
            device=self.options.device,
            dtype=profile["dtype"] if lockstep else None,  # validated by settings_from_profile
            threads=threads,
            status=status,
            engine=settings.engine,
        )
        differences = check_model(loaded, record.fingerprint, record.name, profile)
        if differences and self.warn is not None:
            self.warn(
                "the numerics environment differs from the one that made the archive "
                f"({'; '.join(differences)}); decoding is verified by SHA-256"
            )
        codec = make_coder(loaded, settings, self.options)
        if self._sessions is not None:
            self._sessions.enter_context(codec.session())
        self._current = (model_index, codec)
        return codec

    @contextlib.contextmanager
    def session(self) -> Iterator[None]:
        """Keep each coder's shared resources (a Ray coder's actors) from one
        :meth:`decode` to the next until the block ends: a reader decodes its llm members
        a window at a time (:data:`WINDOW_BYTES` of output), on the same actors."""
        self._sessions = contextlib.ExitStack()
        try:
            if self._current is not None:
                self._sessions.enter_context(self._current[1].session())
            yield
        finally:
            sessions, self._sessions = self._sessions, None
            sessions.close()

    def decode(
        self, items: list[tuple[bytes, bytes, int]], progress: Any = None
    ) -> list[bytes | CorruptArchiveError]:
        """Decode (codec params, payload, original size) triples, input order kept."""
        by_model: dict[int, list[int]] = {}
        for position, (params, _payload, _size) in enumerate(items):
            by_model.setdefault(decode_params(params), []).append(position)
        results: list[bytes | CorruptArchiveError] = [b""] * len(items)
        for model_index, positions in by_model.items():
            codec = self._codec(model_index, getattr(progress, "note", None))
            jobs = [(items[p][1], items[p][2]) for p in positions]
            counter = TokenCounter(progress, codec.count_tokens(jobs), "llm decoding")
            try:
                decoded = codec.decode_many(jobs, progress=counter)
            finally:
                counter.close()
            for position, data in zip(positions, decoded, strict=True):
                results[position] = data
        return results

