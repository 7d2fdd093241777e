"""Progress reporting: one honest account of the work, shown three ways.

The API takes ``None`` (no reporting), a callable (called with a :class:`ProgressInfo`
on every change: ``llmarc.pack(..., progress=print)``) or a sink object with
``start(total, description)``, ``advance(n)`` and ``close()`` (bytes), and optionally
``token_task(total, description)`` (the LLM codec's tokens), ``defer(n)`` and
``note(message)``. :func:`as_sink` turns any of them into a sink.

Why ``defer``: an LLM entry's bytes are read (packing) or produced (extracting) long
before or after the model works on them, so counting them then made the byte bar say
"done" while the model was at 14 %. A sink with ``defer`` is told those bytes up front;
the next token task credits them in proportion to its tokens, so bytes and tokens agree.

Rates and the ETA leave out the model loading (the time from a ``note``, such as
"loading ...", to the next progress): it is neither bytes nor tokens.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from rich import filesize
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, ProgressColumn, Task, TaskID, TextColumn
from rich.text import Text

from .terminal import visible


class ProgressSink(Protocol):
    def start(self, total: int, description: str) -> None: ...
    def advance(self, n: int) -> None: ...
    def close(self) -> None: ...


class TokenTask(Protocol):
    def advance(self, n: int) -> None: ...
    def close(self) -> None: ...


@dataclass(frozen=True)
class ProgressInfo:
    """One progress report, as a progress callback receives it."""

    phase: str  # "packing", "extracting", "testing"
    done_bytes: int  # LLM entries' bytes count as their tokens are coded
    total_bytes: int
    done_tokens: int  # the LLM codec's tokens (0/0 when it is not running)
    total_tokens: int
    elapsed: float  # seconds of work, model loading left out
    bytes_per_second: float | None
    tokens_per_second: float | None
    eta: float | None  # seconds left, None while unknown
    message: str | None = None  # a status note (model loading, Ray workers), if this is one


class NullProgress:
    """Reports nothing."""

    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def defer(self, n: int) -> None:
        pass

    def token_task(self, total: int, description: str) -> NullProgress:
        return self

    def note(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


class Tracker:
    """The counts, rates and ETA behind every display (see the module docstring)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.phase = ""
        self.total = self.done = 0
        self.tokens_total = self.tokens = 0
        self._deferred = 0  # bytes the next token task will credit
        self._carried = self._credited = 0  # bytes the current token task credits
        self._started = self._tokens_started = clock()
        self._paused_at: float | None = None
        self._paused = 0.0  # seconds of model loading in this phase
        self._tokens_paused = 0.0
        self.last_token_rate: float | None = None  # of the last finished token task

    # -- events
    def start(self, total: int, description: str) -> None:
        self.phase, self.total, self.done = description, total, 0
        self._deferred = self._carried = self._credited = 0
        self.tokens_total = self.tokens = 0
        self._started = self.clock()
        self._paused, self._paused_at = 0.0, None

    def advance(self, n: int) -> None:
        self._resume()
        self.done += n

    def defer(self, n: int) -> None:
        self._deferred += n

    def start_tokens(self, total: int) -> None:
        self._resume()
        self.tokens_total, self.tokens = total, 0
        self._carried, self._credited, self._deferred = self._deferred, 0, 0
        self._tokens_started, self._tokens_paused = self.clock(), 0.0

    def advance_tokens(self, n: int) -> int:
        """Count ``n`` tokens; return the bytes they credit."""
        self._resume()
        self.tokens += n
        share = (self._carried * min(self.tokens, self.tokens_total) // self.tokens_total
                 if self.tokens_total else 0)
        credit, self._credited = share - self._credited, share
        self.done += credit
        return credit

    def end_tokens(self) -> int:
        """The token task is over: credit what its tokens did not; return it."""
        credit = self._carried - self._credited
        self.done += credit
        self._carried = self._credited = 0
        self.last_token_rate = self.token_rate()
        self.tokens_total = self.tokens = 0
        return credit

    def pause(self) -> None:
        """A status note (model loading): time until the next progress is not work."""
        if self._paused_at is None:
            self._paused_at = self.clock()

    def _resume(self) -> None:
        if self._paused_at is not None:
            gap = self.clock() - self._paused_at
            self._paused += gap
            self._tokens_paused += gap
            self._paused_at = None

    # -- derived
    def elapsed(self) -> float:
        now = self.clock()
        pending = now - self._paused_at if self._paused_at is not None else 0.0
        return max(now - self._started - self._paused - pending, 0.0)

    def byte_rate(self) -> float | None:
        elapsed = self.elapsed()
        return self.done / elapsed if elapsed > 0 and self.done > 0 else None

    def token_rate(self) -> float | None:
        if not self.tokens_total:
            return None
        now = self.clock()
        pending = now - self._paused_at if self._paused_at is not None else 0.0
        elapsed = now - self._tokens_started - self._tokens_paused - pending
        return self.tokens / elapsed if elapsed > 0 and self.tokens > 0 else None

    def eta(self) -> float | None:
        """Seconds left: from the token rate while the model runs (it dominates), else
        from the byte rate."""
        rate = self.token_rate()
        if rate:
            return (self.tokens_total - self.tokens) / rate
        rate = self.byte_rate()
        return max(self.total - self.done, 0) / rate if rate else None

    def info(self, message: str | None = None) -> ProgressInfo:
        return ProgressInfo(self.phase, self.done, self.total, self.tokens, self.tokens_total,
                            self.elapsed(), self.byte_rate(), self.token_rate(), self.eta(),
                            message)


class _Sink:
    """A sink over a Tracker; subclasses show it (``_changed``, ``_noted``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.tracker = Tracker(clock)

    def start(self, total: int, description: str) -> None:
        self.tracker.start(total, description)
        self._changed()

    def advance(self, n: int) -> None:
        self.tracker.advance(n)
        self._changed()

    def defer(self, n: int) -> None:
        self.tracker.defer(n)

    def token_task(self, total: int, description: str) -> _Tokens:
        self.tracker.start_tokens(total)
        self._tokens_started(description)
        self._changed()
        return _Tokens(self)

    def note(self, message: str) -> None:
        self.tracker.pause()
        self._noted(message)

    def close(self) -> None:
        pass

    # -- for subclasses
    def _changed(self) -> None:
        pass

    def _tokens_started(self, description: str) -> None:
        pass

    def _tokens_ended(self) -> None:
        pass

    def _noted(self, message: str) -> None:
        pass


class _Tokens:
    """The token task of a sink: its advances also credit the deferred bytes."""

    def __init__(self, owner: _Sink) -> None:
        self._owner = owner
        self._open = True

    def advance(self, n: int) -> None:
        self._owner.tracker.advance_tokens(n)
        self._owner._changed()

    def close(self) -> None:
        if self._open:
            self._open = False
            self._owner.tracker.end_tokens()
            self._owner._tokens_ended()
            self._owner._changed()


class CallbackProgress(_Sink):
    """Calls ``callback(ProgressInfo)`` on every change and note (the API's progress)."""

    def __init__(self, callback: Callable[[ProgressInfo], object],
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self._callback = callback

    def _changed(self) -> None:
        self._callback(self.tracker.info())

    def _noted(self, message: str) -> None:
        self._callback(self.tracker.info(message))


def as_sink(progress: Any) -> Any:
    """None, a sink (returned as it is), or a callable (wrapped in CallbackProgress)."""
    if progress is None or hasattr(progress, "advance"):
        return progress
    if callable(progress):
        return CallbackProgress(progress)
    raise TypeError(f"progress must be None, a callable or a progress sink, not "
                    f"{type(progress).__name__}")


# ---------------------------------------------------------------- text


def _tokens(n: float) -> str:
    """A token count in at most 6 characters: 64,030, 312k, 1.23M."""
    n = int(n)
    if n < 100_000:
        return f"{n:,}"
    if n < 1_000_000:
        return f"{n // 1000}k"
    return f"{n / 1e6:.2f}M" if n < 10_000_000 else f"{n / 1e6:.0f}M"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-:--:--"
    seconds = int(seconds + 0.5)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def _rate(value: float | None, unit: str) -> str:
    if value is None:
        return "? B/s" if unit == "bytes" else "? tok/s"
    return f"{filesize.decimal(int(value))}/s" if unit == "bytes" else \
        f"{_tokens(value)} tok/s"


# ---------------------------------------------------------------- terminal


class _AmountColumn(ProgressColumn):
    """``done/total`` in bytes (kB, MB) or tokens, by the task's ``unit`` field."""

    def render(self, task: Task) -> Text:
        if task.fields.get("unit", "bytes") == "bytes":
            done, total = int(task.completed), int(task.total or 0)
            text = f"{filesize.decimal(done)}/{filesize.decimal(total)}"
        else:
            text = f"{_tokens(task.completed)}/{_tokens(task.total or 0)} tok"
        return Text(text, style="progress.download")


class _RateColumn(ProgressColumn):
    """Bytes/s or tokens/s from the tracker (model loading left out)."""

    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self._tracker = tracker

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "bytes")
        if unit == "bytes":
            value = self._tracker.byte_rate()
        elif task.finished or not self._tracker.tokens_total:
            value = self._tracker.last_token_rate
        else:
            value = self._tracker.token_rate()
        return Text(_rate(value, unit), style="progress.data.speed")


class _EtaColumn(ProgressColumn):
    """The time left, on the byte bar (the whole operation)."""

    def __init__(self, tracker: Tracker) -> None:
        super().__init__()
        self._tracker = tracker

    def render(self, task: Task) -> Text:
        if task.fields.get("unit", "bytes") != "bytes":
            return Text("")
        if task.finished:
            return Text(f"in {_duration(self._tracker.elapsed())}", style="progress.elapsed")
        return Text(f"ETA {_duration(self._tracker.eta())}", style="progress.remaining")


class ByteProgress(_Sink):
    """Progress bars on a terminal: one line per bar, at most 80 columns (a fixed-width
    bar, compact numbers): the operation's bytes with rate and ETA, and while the
    model runs its tokens with tokens/s."""

    def __init__(self, console: Console | None = None) -> None:
        super().__init__()
        self._console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task: TaskID | None = None
        self._token_task: TaskID | None = None

    def _ensure(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(
                TextColumn("{task.description}", style="bold"), BarColumn(bar_width=16),
                _AmountColumn(), _RateColumn(self.tracker), _EtaColumn(self.tracker),
                console=self._console, transient=False, expand=False)
            self._progress.start()
        return self._progress

    def start(self, total: int, description: str) -> None:
        self.close()
        self._task = self._ensure().add_task(_literal(description), total=total,
                                             unit="bytes")
        super().start(total, description)

    def _tokens_started(self, description: str) -> None:
        # the description may name the model; the bar keeps to "llm coding"/"llm decoding"
        label = _literal(description.split(" (")[0][:16])
        self._token_task = self._ensure().add_task(label, total=self.tracker.tokens_total,
                                                   unit="tokens")

    def _changed(self) -> None:
        progress = self._progress
        if progress is None:
            return
        if self._task is not None:
            progress.update(self._task, completed=self.tracker.done)
        if self._token_task is not None and self.tracker.tokens_total:
            progress.update(self._token_task, completed=self.tracker.tokens)

    def _tokens_ended(self) -> None:
        if self._progress is not None and self._token_task is not None:
            self._progress.stop_task(self._token_task)
        self._token_task = None

    def _noted(self, message: str) -> None:
        """A one-line status message (model loading, conversion) above the bars."""
        # a model path may hold "[...]" (rich markup) or control characters
        self._console.print(f"llmarc: {visible(message)}", highlight=False, markup=False)

    def close(self) -> None:
        if self._progress is not None:
            self._changed()
            self._progress.stop()
            self._progress = None
            self._task = self._token_task = None


# ---------------------------------------------------------------- no terminal


class LineProgress(_Sink):
    """Progress without a terminal (cron, CI, ``2> log``): one plain line on ``stream``
    every ``interval`` seconds, so a long run is visibly alive; nothing for short runs.

    ``llmarc: packing 120 kB/319 kB (37%), 2.1 kB/s, ETA 0:01:35; llm 7,644/64,030 tok,
    260 tok/s``: bytes count LLM entries as their tokens are coded, and rates and ETA
    leave the model loading out."""

    def __init__(self, stream, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(clock)
        self._stream = stream
        self._interval = interval
        self._clock = clock
        self._last = clock()

    def start(self, total: int, description: str) -> None:
        super().start(total, description)
        self._last = self._clock()

    def _changed(self) -> None:
        now = self._clock()
        if now - self._last < self._interval:
            return
        self._last = now
        t = self.tracker
        pct = f" ({100 * t.done // t.total}%)" if t.total else ""
        text = (f"llmarc: {t.phase} {filesize.decimal(t.done)}/{filesize.decimal(t.total)}"
                f"{pct}, {_rate(t.byte_rate(), 'bytes')}, ETA {_duration(t.eta())}")
        if t.tokens_total:
            text += (f"; llm {t.tokens:,}/{t.tokens_total:,} tok, "
                     f"{_rate(t.token_rate(), 'tokens')}")
        self._print(text)

    def _noted(self, message: str) -> None:
        self._print(f"llmarc: {visible(message)}")

    def _print(self, text: str) -> None:
        try:
            self._stream.write(text + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not end the work
            pass


def _literal(description: str) -> str:
    """A bar's description as literal text: its column is rendered as rich markup, and
    it may name a model path holding "[...]" or control characters."""
    return escape(visible(description))
