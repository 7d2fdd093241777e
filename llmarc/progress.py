"""Progress reporting: rich progress bars on stderr, or nothing.

The API takes any object with ``start(total, description)``, ``advance(n)`` and
``close()`` (bytes), and optionally ``token_task(total, description)`` for the LLM codec's
token bar; ``None`` means no progress reporting.  One rich display can show both bars: the
bytes of the whole operation and, while the model runs, tokens with tokens/s and ETA.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

from rich import filesize
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    Progress,
    ProgressColumn,
    Task,
    TaskID,
    TextColumn,
    TimeRemainingColumn,
)
from rich.text import Text

from .terminal import visible


class ProgressSink(Protocol):
    def start(self, total: int, description: str) -> None: ...
    def advance(self, n: int) -> None: ...
    def close(self) -> None: ...


class TokenTask(Protocol):
    def advance(self, n: int) -> None: ...
    def close(self) -> None: ...


class NullProgress:
    """Reports nothing."""

    def start(self, total: int, description: str) -> None:
        pass

    def advance(self, n: int) -> None:
        pass

    def token_task(self, total: int, description: str) -> NullProgress:
        return self

    def note(self, message: str) -> None:
        pass

    def close(self) -> None:
        pass


def _amount(value: float, unit: str) -> str:
    return filesize.decimal(int(value)) if unit == "bytes" else f"{int(value):,} tok"


class _AmountColumn(ProgressColumn):
    """``done/total`` in bytes (kB, MB) or tokens, by the task's ``unit`` field."""

    def render(self, task: Task) -> Text:
        unit = task.fields.get("unit", "bytes")
        total = _amount(task.total or 0, unit)
        return Text(f"{_amount(task.completed, unit)}/{total}", style="progress.download")


class _RateColumn(ProgressColumn):
    """Bytes/s or tokens/s."""

    def render(self, task: Task) -> Text:
        speed = task.finished_speed or task.speed
        if speed is None:
            return Text("?", style="progress.data.speed")
        unit = task.fields.get("unit", "bytes")
        text = f"{filesize.decimal(int(speed))}/s" if unit == "bytes" else f"{speed:,.0f} tok/s"
        return Text(text, style="progress.data.speed")


class _RichTokenTask:
    def __init__(self, owner: ByteProgress, task: TaskID) -> None:
        self._owner, self._task = owner, task

    def advance(self, n: int) -> None:
        if self._owner._progress is not None:
            self._owner._progress.advance(self._task, n)

    def close(self) -> None:
        if self._owner._progress is not None:
            self._owner._progress.stop_task(self._task)


class ByteProgress:
    """Rich progress bars on stderr: bytes done, rate and time remaining (and tokens)."""

    def __init__(self, console: Console | None = None) -> None:
        self._console = console or Console(stderr=True)
        self._progress: Progress | None = None
        self._task: TaskID | None = None

    def _ensure(self) -> Progress:
        if self._progress is None:
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), _AmountColumn(),
                _RateColumn(), TimeRemainingColumn(), console=self._console, transient=False)
            self._progress.start()
        return self._progress

    def start(self, total: int, description: str) -> None:
        self.close()
        self._task = self._ensure().add_task(_literal(description), total=total, unit="bytes")

    def advance(self, n: int) -> None:
        if self._progress is not None and self._task is not None:
            self._progress.advance(self._task, n)

    def token_task(self, total: int, description: str) -> TokenTask:
        """A second bar counting tokens (the LLM codec), closed by the caller."""
        progress = self._ensure()
        return _RichTokenTask(self, progress.add_task(_literal(description), total=total,
                                                      unit="tokens"))

    def note(self, message: str) -> None:
        """A one-line status message (model loading, conversion) above the bars."""
        # a model path may hold "[...]" (rich markup) or control characters
        self._console.print(f"llmarc: {visible(message)}", highlight=False, markup=False)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
            self._task = None


class LineProgress:
    """Progress without a terminal (cron, CI, ``2> log``): one plain line on ``stream``
    every ``interval`` seconds, so a long pack is visibly alive; nothing for short runs.

    Lines look like ``llmarc: packing 12.3 MB/45.6 MB (27%), 3.4 MB/s`` (plus tokens
    and tokens/s while the LLM codec runs)."""

    def __init__(self, stream, interval: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._interval = interval
        self._clock = clock
        self._description = ""
        self._total = self._done = 0
        self._tokens_total = self._tokens = 0
        self._started = self._last = clock()

    def start(self, total: int, description: str) -> None:
        self._description, self._total, self._done = description, total, 0
        self._started = self._last = self._clock()

    def advance(self, n: int) -> None:
        self._done += n
        self._tick()

    def token_task(self, total: int, description: str) -> _LineTokens:
        self._tokens_total, self._tokens = total, 0
        return _LineTokens(self)

    def note(self, message: str) -> None:
        self._print(f"llmarc: {message}")

    def close(self) -> None:
        pass

    def _tick(self) -> None:
        now = self._clock()
        if now - self._last < self._interval:
            return
        self._last = now
        elapsed = max(now - self._started, 1e-9)
        pct = f" ({100 * self._done // self._total}%)" if self._total else ""
        text = (f"llmarc: {self._description} {filesize.decimal(self._done)}/"
                f"{filesize.decimal(self._total)}{pct}, "
                f"{filesize.decimal(int(self._done / elapsed))}/s")
        if self._tokens_total:
            text += (f"; {self._tokens:,}/{self._tokens_total:,} tokens, "
                     f"{self._tokens / elapsed:,.0f} tok/s")
        self._print(text)

    def _print(self, text: str) -> None:
        try:
            self._stream.write(text + "\n")
            self._stream.flush()
        except (OSError, ValueError):  # a closed or broken stderr must not end the work
            pass


class _LineTokens:
    def __init__(self, owner: LineProgress) -> None:
        self._owner = owner

    def advance(self, n: int) -> None:
        self._owner._tokens += n
        self._owner._tick()

    def close(self) -> None:
        self._owner._tokens_total = 0


def _literal(description: str) -> str:
    """A bar's description as literal text: its column is rendered as rich markup, and
    it may name a model path holding "[...]" or control characters."""
    return escape(visible(description))
