"""The ``llmarc`` command line: a thin typer layer over the API.

Every LlmarcError, OS error or usage mistake becomes exactly one ``llmarc: error: ...``
line on stderr (exit 1, or 2 for usage); Ctrl-C, SIGTERM and SIGHUP exit 128 + the signal
number with one line (a pack in progress removes its temporary file first). ``pack``
exits 3 when the archive was written but some files were skipped (``--skip-unreadable``),
changed while read or vanished.
"""


from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import stat
import sys
import warnings
from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from . import __version__
from . import open as open_archive
from .codecs.llm import DEFAULT_SEGMENT_LENGTH
from .codecs.llm_pipeline import LLMOptions
from .errors import LlmarcError
from .packer import CODEC_CHOICES, PackReport, SkippedEntryWarning, UnarchivableError, pack
from .progress import ByteProgress, LineProgress

#: Exit status of a pack that wrote its archive but skipped files or read changing ones.
EXIT_PARTIAL = 3


app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None,
                  help="llmarc: a lossless archiver whose text codec is a language model.")


ModelOption = Annotated[str | None, typer.Option(
    help="LLM: 'smollm2' (embedded), a Hugging Face model folder, or a .gguf file "
         "(default: $LLMARC_MODEL, else smollm2).")]
DeviceOption = Annotated[str, typer.Option(help="LLM: auto, cpu or cuda[:N].")]


def _open(archive: Path, model: str | None = None, device: str = "auto"):
    return open_archive(archive, model=model, device=device, warn=_warn)


def _progress(quiet: bool) -> ByteProgress | LineProgress | None:
    """Bars on a terminal; without one (cron, CI, a pipe) a line every few seconds."""
    if quiet:
        return None
    console = Console(stderr=True)
    return ByteProgress(console) if console.is_terminal else LineProgress(sys.stderr)


def _warn(message: str) -> None:
    print(f"llmarc: warning: {message}", file=sys.stderr)


@app.command("pack")
def pack_cmd(
    src: Annotated[Path, typer.Argument(help="Directory to archive (its contents).")],
    out: Annotated[Path, typer.Argument(help="Archive to create (.llma).")],
    codec: Annotated[str, typer.Option(help=f"One of: {', '.join(CODEC_CHOICES)}.")] = "auto",
    level: Annotated[int, typer.Option(help="zstd level (1-22).")] = 19,
    solid: Annotated[bool, typer.Option(help="Share one zstd frame among small files.")] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    verify: Annotated[bool, typer.Option(
        help="Decode the finished archive and check every SHA-256 before keeping it.")] = False,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    dtype: Annotated[str | None, typer.Option(
        help="float32|bfloat16|float16 (default: float32 on CPU, bfloat16 on CUDA).")] = None,
    segment_length: Annotated[int, typer.Option(
        help="Maximum tokens per independently coded segment.")] = DEFAULT_SEGMENT_LENGTH,
    batch_width: Annotated[int | None, typer.Option(
        help="Rows stepped together (default: sized from memory and the input).")] = None,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for the model (recorded; extraction uses the same).")] = None,
    skip_unreadable: Annotated[bool, typer.Option(
        help="Skip (with a warning each, exit status 3) what cannot be archived: symlinks, "
             "FIFOs, sockets, devices, unreadable files, names the format cannot store. "
             "Without it such paths are an error and nothing is written.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q",
                                        help="No progress and no summary.")] = False,
) -> int:
    """Archive the contents of SRC into OUT."""
    options = LLMOptions(model=model, device=device, dtype=dtype, threads=threads,
                         segment_length=segment_length, batch_width=batch_width)
    report = PackReport()
    try:
        members = pack(src, out, codec=codec, level=level, progress=_progress(quiet),
                       overwrite=overwrite, solid=solid, warn=_warn, llm=options,
                       verify=verify, skip_failed=skip_unreadable, report=report)
    except UnarchivableError as exc:
        for problem in exc.problems:
            print(f"llmarc: cannot archive {problem}", file=sys.stderr)
        n = len(exc.problems)
        raise UnarchivableError(f"{n} path{'s' if n > 1 else ''} cannot be archived (listed "
                                "above); nothing was written; --skip-unreadable skips them",
                                exc.problems) from None
    if not quiet:
        size = sum(m.size for m in members)
        packed = os.path.getsize(out)
        notes = [f"{len(v)} {k}" for k, v in (("skipped", report.skipped),
                                              ("changed while read", report.changed),
                                              ("vanished", report.vanished)) if v]
        Console(stderr=True).print(
            f"{len(members)} members, {size} bytes -> {packed} bytes"
            + (f" ({8 * packed / size:.3f} bits/byte)" if size else "")
            + (f"; {', '.join(notes)}" if notes else ""), highlight=False)
    return 0 if report.clean else EXIT_PARTIAL


@app.command("list")
def list_cmd(
    archive: Annotated[Path, typer.Argument(help="Archive to list.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the members of ARCHIVE (reads only its index)."""
    with open_archive(archive) as ar:
        members = ar.members()
    if as_json:
        rows = [{"name": m.name, "type": m.type, "mode": m.mode, "mtime_ns": m.mtime_ns,
                 "size": m.size, "packed_size": m.packed_size, "codec": m.codec,
                 "bits_per_byte": round(m.bits_per_byte, 4), "sha256": m.sha256}
                for m in members]
        print(json.dumps(rows, indent=1, ensure_ascii=False))
        return
    _print_table(members)


def _print_table(members) -> None:
    """The listing as aligned columns, formatted directly: rich's Table measured every
    cell and took 12 s for 10,000 members."""
    header = ("mode", "size", "packed", "codec", "bits/byte", "name")
    rows = []
    for m in members:
        kind = stat.S_IFDIR if m.is_dir() else stat.S_IFREG
        rows.append((stat.filemode(kind | m.mode), str(m.size), str(m.packed_size),
                     m.codec if m.is_file() else "",
                     f"{m.bits_per_byte:.3f}" if m.size else "",
                     m.name + ("/" if m.is_dir() else "")))
    widths = [max([len(header[c])] + [len(r[c]) for r in rows]) for c in range(5)]
    right = (False, True, True, False, True)

    def line(cells) -> str:
        out = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right,
                                                                   strict=False)]
        return " ".join(out) + " " + cells[5]

    bold = sys.stdout.isatty()
    text = line(header)
    lines = [f"\x1b[1m{text}\x1b[0m" if bold else text]
    lines.extend(line(r) for r in rows)
    sys.stdout.write("\n".join(lines) + "\n")


@app.command("extract")
def extract_cmd(
    archive: Annotated[Path, typer.Argument(help="Archive to extract.")],
    members: Annotated[list[str] | None, typer.Argument(help="Members (default: all).")] = None,
    dest: Annotated[Path, typer.Option("-C", "--directory", help="Destination.")] = Path("."),
    overwrite: Annotated[bool, typer.Option(help="Replace existing files.")] = False,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Extract ARCHIVE (or the named MEMBERS) below DEST."""
    with _open(archive, model, device) as ar:
        ar.extract(dest, members or None, overwrite=overwrite, progress=_progress(quiet))


@app.command("test")
def test_cmd(
    archive: Annotated[Path, typer.Argument(help="Archive to test.")],
    model: ModelOption = None,
    device: DeviceOption = "auto",
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
) -> None:
    """Decode every member of ARCHIVE and verify every checksum (writes nothing)."""
    with _open(archive, model, device) as ar:
        n = len(ar.test(progress=_progress(quiet)))
    print(f"{archive}: OK ({n} members)")


@app.command("info")
def info_cmd(archive: Annotated[Path, typer.Argument(help="Archive to describe.")]) -> None:
    """Show archive-level information: version, creator, models, totals."""
    with open_archive(archive) as ar:
        members = ar.members()
        print(f"archive:      {archive}")
        print(f"format:       {ar.version[0]}.{ar.version[1]}")
        print(f"creator:      {ar.creator}")
        files = [m for m in members if m.is_file()]
        size = sum(m.size for m in files)
        packed = os.path.getsize(archive)
        print(f"members:      {len(files)} files, {len(members) - len(files)} directories")
        print(f"size:         {size} bytes -> {packed} bytes"
              + (f" ({8 * packed / size:.3f} bits/byte)" if size else ""))
        codecs: dict[str, int] = {}
        for m in files:
            codecs[m.codec] = codecs.get(m.codec, 0) + 1
        print("codecs:       " + (", ".join(f"{k} x{v}" for k, v in sorted(codecs.items()))
                                  or "none"))
        print(f"models:       {len(ar.models)}")
        for i, model in enumerate(ar.models):
            print(f"  [{i}] {model.name}  fingerprint {model.fingerprint.hex()}")
            print(f"      profile {model.profile}")


@app.command("version", hidden=True)
def version_cmd() -> None:
    """Print the version."""
    print(f"llmarc {__version__}")


def _click_classes(name: str) -> tuple[type[BaseException], ...]:
    """The click exception class ``name`` from typer's vendored click (typer >= 0.26) and
    from click itself when it is installed (older typer depends on it). click is not a
    declared dependency, so neither import may be required."""
    found = [getattr(typer, name, None) if name in ("Abort", "Exit") else None]
    for module in ("typer._click.exceptions", "click.exceptions"):
        with contextlib.suppress(ImportError):
            found.append(getattr(importlib.import_module(module), name, None))
    return tuple(c for c in found if isinstance(c, type))


_ABORT = _click_classes("Abort")
_EXIT = _click_classes("Exit")
_USAGE = _click_classes("UsageError")
_NO_ARGS = _click_classes("NoArgsIsHelpError")
_CLICK = _click_classes("ClickException")


def _error(message: str, code: int) -> int:
    message = " ".join(str(message).split()) or "unknown error"
    print(f"llmarc: error: {message}", file=sys.stderr)
    return code


def main(argv: list[str] | None = None) -> int:
    """Console entry point; returns (and exits with) the process exit code."""
    code = run(argv)
    sys.exit(code)


class Terminated(BaseException):
    """SIGTERM or SIGHUP arrived: unwinds like Ctrl-C, so a pack removes its temporary
    file (``ArchiveWriter.abort``) before the process exits with 128 + the signal number."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


_SIGNALS = tuple(getattr(signal, n) for n in ("SIGTERM", "SIGHUP") if hasattr(signal, n))


def _on_signal(signum: int, frame: object) -> None:
    for sig in _SIGNALS:  # a second signal must not interrupt the clean-up
        signal.signal(sig, signal.SIG_IGN)
    raise Terminated(signum)


def run(argv: list[str] | None = None) -> int:
    """Run one command; SIGTERM and SIGHUP are handled like Ctrl-C while it runs."""
    previous = {}
    try:
        for sig in _SIGNALS:
            previous[sig] = signal.signal(sig, _on_signal)
    except ValueError:  # not the main thread: leave signals alone
        pass
    try:
        return _run(argv)
    except Terminated as exc:
        name = signal.Signals(exc.signum).name
        print(f"llmarc: terminated by {name}", file=sys.stderr)
        return 128 + exc.signum
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _run(argv: list[str] | None = None) -> int:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", SkippedEntryWarning)
            result = app(args=argv, prog_name="llmarc", standalone_mode=False)
        code = result if isinstance(result, int) else 0
        if code == 130:  # typer turns Ctrl-C into exit code 130
            print("llmarc: interrupted", file=sys.stderr)
        return code
    except (KeyboardInterrupt, *_ABORT):  # click turns Ctrl-C into Abort
        print("llmarc: interrupted", file=sys.stderr)
        return 130
    except _EXIT as exc:
        code = int(getattr(exc, "exit_code", 0) or 0)
        if code == 130:  # typer turns Ctrl-C into Exit(130)
            print("llmarc: interrupted", file=sys.stderr)
        return code
    except _NO_ARGS as exc:  # bare "llmarc": the help text, as a usage error
        print(exc.format_message(), file=sys.stderr)
        return 2
    except _USAGE as exc:
        return _error(exc.format_message(), 2)
    except _CLICK as exc:
        return _error(exc.format_message(), 1)
    except LlmarcError as exc:
        return _error(str(exc), 1)
    except OSError as exc:
        where = f": {exc.filename}" if exc.filename else ""
        return _error(f"{exc.strerror or exc}{where}", 1)
    except BrokenPipeError:
        return 1


if __name__ == "__main__":  # pragma: no cover
    main()
