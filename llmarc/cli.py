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
import time
import warnings
from pathlib import Path
from typing import Annotated, BinaryIO

import typer
from rich.console import Console

from . import __version__
from . import open as open_archive
from .codecs import zstd as zstd_codec
from .codecs.llm import DEFAULT_ENGINE, DEFAULT_SEGMENT_LENGTH, ENGINES, parse_profile
from .codecs.llm_options import LLMOptions
from .errors import CorruptArchiveError, DamagedMembersError, LlmarcError
from .packer import CODEC_CHOICES, PackReport, SkippedEntryWarning, UnarchivableError, pack
from .progress import ByteProgress, LineProgress
from .terminal import json_visible, visible
from .update import UpdateReport, delete, update

#: Exit status of a pack that wrote its archive but skipped files or read changing ones.
EXIT_PARTIAL = 3

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  rich_markup_mode=None, context_settings={"help_option_names": ["-h", "--help"]},
                  help="llmarc: a lossless archiver whose text codec is a language model.")


class _Command(typer.core.TyperCommand):
    """Usage lines as tar and zip print them (``llmarc pack [OPTIONS] SRC OUT``): typer
    0.29 writes required arguments as ``{src}``, a notation no archiver uses."""

    def collect_usage_pieces(self, ctx) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for param in self.get_params(ctx):
            if param.param_type_name != "argument":
                continue
            name = param.metavar or (param.name or "").upper()
            name += "..." if param.nargs != 1 else ""
            pieces.append(name if param.required else f"[{name}]")
        return pieces


def _print_version(value: bool) -> None:
    if value:
        print(f"llmarc {__version__}")
        raise typer.Exit()


@app.callback()
def _main(version: Annotated[bool, typer.Option(
        "--version", "-V", is_eager=True, callback=_print_version,
        help="Print the version and exit.")] = False) -> None:
    """llmarc: a lossless archiver whose text codec is a language model."""


ModelOption = Annotated[str | None, typer.Option(
    help="LLM: 'smollm2' (embedded), a Hugging Face model folder, or a .gguf file "
         "(default: $LLMARC_MODEL, else smollm2).")]
DeviceOption = Annotated[str, typer.Option(help="LLM: auto, cpu or cuda[:N].")]
ThreadsOption = Annotated[int | None, typer.Option(
    help="LLM: CPU threads (default: the CPUs this process may use). A runtime choice: int-v1/v2 "
         "archives decode the same with any count.", min=1, max=1024)]
WidthOption = Annotated[int | None, typer.Option(
    help="LLM: rows decoded together (default: sized from memory and the input).",
    min=1, max=1024)]
RayOption = Annotated[str | None, typer.Option(
    "--ray", metavar="[ADDRESS]",
    help="LLM: code segments on Ray actors; alone a local runtime, else a cluster "
         "(ray://HOST:PORT, HOST:PORT or auto). Needs: pip install 'llmarc[ray]'.")]


ExcludeOption = Annotated[list[str] | None, typer.Option(
    "--exclude", metavar="PATTERN",
    help="Leave out names matching PATTERN (repeatable; a glob matched against the name "
         "and each part after a '/', as tar's --exclude: '*.o', 'build').")]

#: Seconds between progress lines without a terminal (default 5).
PROGRESS_INTERVAL_ENV = "LLMARC_PROGRESS_INTERVAL"

#: The path that means stdin (an archive to read) or stdout (an archive to write).
STDIO = Path("-")


def _output(out: Path) -> Path | BinaryIO:
    """OUT, or stdout for ``-``: never a terminal (zstd and gzip refuse that too)."""
    if out != STDIO:
        return out
    if sys.stdout.isatty():
        raise typer.BadParameter("refusing to write an archive to a terminal; redirect "
                                 "stdout (llmarc pack SRC - > out.llma)", param_hint="OUT")
    return sys.stdout.buffer


def _input(archive: Path) -> Path | BinaryIO:
    """ARCHIVE, or stdin for ``-`` (spooled by the reader if it is a pipe)."""
    if archive != STDIO:
        return archive
    if sys.stdin.isatty():
        raise typer.BadParameter("refusing to read an archive from a terminal; pipe one "
                                 "in (cat a.llma | llmarc list -)", param_hint="ARCHIVE")
    return sys.stdin.buffer


def _carry(value: str) -> int | None:
    """--carry's value: None for ``auto``, else a count of tokens (checked later)."""
    if value == "auto":
        return None
    try:
        return int(value)
    except ValueError:
        raise typer.BadParameter(f"must be auto or a number of tokens, not {value!r}",
                                 param_hint="--carry") from None


def _ray(address: str | None) -> str | None:
    """Fail in one line, before any model is loaded, when --ray lacks the Ray extra."""
    if address is not None:
        from .distributed import require_ray

        require_ray()
    return address


def _ray_argv(argv: list[str]) -> list[str]:
    """Give a bare ``--ray`` its default value: typer has no options with optional values."""
    from .distributed import LOCAL, is_address

    out = list(argv)
    for i, word in enumerate(out):
        if word == "--":
            break
        if word == "--ray" and (i + 1 == len(out) or not is_address(out[i + 1])):
            out.insert(i + 1, LOCAL)
    return out


def _open(archive: Path, model: str | None = None, device: str = "auto",
          ray: str | None = None, threads: int | None = None,
          batch_width: int | None = None):
    return open_archive(archive, model=model, device=device, warn=_warn, ray=_ray(ray),
                        threads=threads, batch_width=batch_width)


def _progress(quiet: bool) -> ByteProgress | LineProgress | None:
    """Bars on a terminal; without one (cron, CI, a pipe) a line every few seconds."""
    if quiet:
        return None
    console = Console(stderr=True)
    if console.is_terminal:
        return ByteProgress(console)
    try:  # seconds between lines; tests set it to see lines from a short run
        interval = float(os.environ.get(PROGRESS_INTERVAL_ENV, "5"))
    except ValueError:
        interval = 5.0
    return LineProgress(sys.stderr, interval=interval)


def _warn(message: str) -> None:
    print(f"llmarc: warning: {visible(message)}", file=sys.stderr)


@app.command("pack", cls=_Command)
def pack_cmd(
    src: Annotated[Path, typer.Argument(
        metavar="SRC", help="Directory to archive (its contents), or one file.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Archive to create (.llma).")],
    codec: Annotated[str, typer.Option(help=f"One of: {', '.join(CODEC_CHOICES)}.")] = "auto",
    level: Annotated[int, typer.Option(help="zstd level.", min=zstd_codec.MIN_LEVEL,
                                       max=zstd_codec.MAX_LEVEL)] = 19,
    solid: Annotated[bool, typer.Option(
        help="Share one zstd frame (LLM-coded text: one LLM payload) among small files.",
    )] = True,
    overwrite: Annotated[bool, typer.Option(help="Replace OUT if it exists.")] = False,
    verify: Annotated[bool, typer.Option(
        help="Decode the finished archive and check every SHA-256 before keeping it.")] = False,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    engine: Annotated[str, typer.Option(
        help="LLM engine: int-v2 (integer-exact: the archive opens on any machine), "
             "int-v1 (its 16-bit-attention predecessor, slower) or lockstep-v1 (float, "
             "bound to this machine's numerics).")] = DEFAULT_ENGINE,
    dtype: Annotated[str | None, typer.Option(
        help="lockstep-v1 only: float32|bfloat16|float16 (default: float32 on CPU, "
             "bfloat16 on CUDA).")] = None,
    segment_length: Annotated[int, typer.Option(
        help="Maximum tokens per independently coded segment: the LLM codec's "
             "ratio/speed knob (longer gives each token more context, e.g. alice29.txt "
             "1.19 -> 1.13 bits/byte from 1024 to 4096, for more attention work per "
             "token and a larger decoder cache; at most the model's window).")
    ] = DEFAULT_SEGMENT_LENGTH,
    carry: Annotated[str, typer.Option(
        metavar="auto|C",
        help="int-v1/v2: feed each segment the last CARRY tokens of the one before it as "
             "uncoded context (0: none), so fewer tokens are predicted cold, e.g. 256: "
             "alice29.txt -2.2 % (chain 2) to -3.9 % (chain 8), enwik8's first MB -3.9 %; "
             "costs CARRY more positions a segment and, with --chain, fewer rows an "
             "extraction steps together. auto: 256 (with --mix 3) when the input has "
             "enough segments that extraction keeps at least 16 rows a round (about "
             "120 KB of text and more), else none.")] = "auto",
    chain: Annotated[int | None, typer.Option(
        help="With carry: segments per chain; a chain's first segment starts cold, "
             "and extraction decodes the chains of a file side by side (default: the "
             "longest, 2 to 8, that still gives extraction 32 rows to step together).")
    ] = None,
    mix: Annotated[int | None, typer.Option(
        help="With carry: mix token n-gram counts of orders 0..MIX, learnt from the "
             "text already coded, into the model's predictions (0: none; default: 3 "
             "whenever carry is on), so repeated names and phrases get cheaper: "
             "alice29.txt -0.8 %, held-out English -1.3 % on top of --carry 256.")] = None,
    batch_width: Annotated[int | None, typer.Option(
        help="lockstep-v1: rows stepped together, recorded (default: sized from memory "
             "and the input). int-v1/v2 encode whole segments at once.")] = None,
    threads: Annotated[int | None, typer.Option(
        help="CPU threads for the model (default: the CPUs this process may use). lockstep-v1 "
             "records it and extraction must use the same.")] = None,
    skip_unreadable: Annotated[bool, typer.Option(
        help="Skip (with a warning each, exit status 3) what cannot be archived: symlinks, "
             "FIFOs, sockets, devices, unreadable files, names the format cannot store. "
             "Without it such paths are an error and nothing is written.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q",
                                        help="No progress and no summary.")] = False,
    exclude: ExcludeOption = None,
    ray: RayOption = None,
) -> int:
    """Archive the contents of SRC into OUT."""
    if codec not in CODEC_CHOICES:
        raise typer.BadParameter(f"must be one of {', '.join(CODEC_CHOICES)}, not {codec!r}",
                                 param_hint="--codec")
    if engine not in ENGINES:
        raise typer.BadParameter(f"must be one of {', '.join(ENGINES)}, not {engine!r}",
                                 param_hint="--engine")
    carried = _carry(carry)
    if chain is not None and carried == 0:
        raise typer.BadParameter("chains only exist with context carry: drop --carry 0",
                                 param_hint="--chain")
    if mix and carried == 0:
        raise typer.BadParameter("mixing learns along chains of context carry: drop "
                                 "--carry 0", param_hint="--mix")
    options = LLMOptions(model=model, device=device, engine=engine, dtype=dtype,
                         threads=threads, segment_length=segment_length, carry=carried,
                         chain=chain, mix=mix, batch_width=batch_width, ray=_ray(ray))
    report = PackReport()
    try:
        members = pack(src, _output(out), codec=codec, level=level,
                       progress=_progress(quiet), overwrite=overwrite, solid=solid,
                       warn=_warn, llm=options, verify=verify, skip_failed=skip_unreadable,
                       report=report, exclude=exclude or ())
    except UnarchivableError as exc:
        for problem in exc.problems:
            print(f"llmarc: cannot archive {visible(str(problem))}", file=sys.stderr)
        n = len(exc.problems)
        raise UnarchivableError(f"{n} path{'s' if n > 1 else ''} cannot be archived (listed "
                                "above); nothing was written; --skip-unreadable skips them",
                                exc.problems) from None
    if not quiet:
        size = sum(m.size for m in members)
        packed = report.archive_size
        notes = [f"{len(v)} {k}" for k, v in (("skipped", report.skipped),
                                              ("changed while read", report.changed),
                                              ("vanished", report.vanished)) if v]
        Console(stderr=True).print(
            f"{len(members)} members, {size} bytes -> {packed} bytes"
            + (f" ({8 * packed / size:.3f} bits/byte)" if size else "")
            + (f"; {', '.join(notes)}" if notes else ""), highlight=False)
    return 0 if report.clean else EXIT_PARTIAL


ArchiveArgument = Annotated[Path, typer.Argument(
    metavar="ARCHIVE", help="The archive (.llma); '-' reads it from stdin.")]
KeepGoingOption = Annotated[bool, typer.Option(
    "--keep-going",  # no -k: tar's -k is --keep-old-files
    help="Go on past damaged members: restore (or verify) every intact one, list every "
         "damaged one, exit 1.")]


@app.command("list", cls=_Command)
def list_cmd(
    archive: ArchiveArgument,
    long: Annotated[bool, typer.Option("--long", "-l",
                                       help="Exact byte counts and SHA-256.")] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """List the members of ARCHIVE and check the CRC-32 of its stored bytes (no
    decoding, no model): a damaged archive is listed, then exits 1."""
    with open_archive(_input(archive)) as ar:
        members = ar.members()
        if as_json:
            rows = [{"name": m.name, "type": m.type, "mode": m.mode, "mtime_ns": m.mtime_ns,
                     "size": m.size, "packed_size": m.packed_size, "codec": m.codec,
                     "bits_per_byte": round(m.bits_per_byte, 4), "sha256": m.sha256}
                    for m in members]
            print(json_visible(json.dumps(rows, indent=1, ensure_ascii=False)))
        else:
            _print_table(members, ar.archive_size, long)
        _fail_if_damaged(ar.damaged(), "damaged")


def _fail_if_damaged(failures, what: str, rest: str = "") -> None:
    """One stderr line per damaged member, then the error (exit 1): tar and unzip name
    every bad member, not just the first."""
    if not failures:
        return
    for member, exc in failures:
        text = str(exc)
        if repr(member.name) not in text:
            text = f"member {member.name!r}: {text}"
        print(f"llmarc: {visible(text)}", file=sys.stderr)
    n = len(failures)
    raise CorruptArchiveError(f"{n} member{'s' if n > 1 else ''} {what} (listed above)"
                              + (f"; {rest}" if rest else ""))


def _files(members) -> str:
    n = sum(1 for m in members if m.is_file())
    return f"{n} other file{'s' if n != 1 else ''}"


def _human(n: int) -> str:
    """A size as ``ls -lh`` and ``du -h`` write it: 999, 1.2K, 12K, 3.4M (powers of 1024)."""
    value = float(n)
    for unit in "KMGTPE":
        if value < 1024:
            break
        value /= 1024
        if value < 1024 or unit == "E":
            return f"{value:.1f}{unit}" if value < 9.95 else f"{value:.0f}{unit}"
    return str(n)


def _print_table(members, archive_size: int, long: bool = False) -> None:
    """The listing as aligned columns (mode, size, packed, codec, bits/byte, mtime,
    [sha256,] name) and a total line whose packed size is the whole archive's (index
    included), formatted directly: rich's Table measured every cell and took 12 s for
    10,000 members.  Rows hold only the short aligned cells and each line is written as
    it is made: the names (up to 256 MiB of them in a valid archive) are never copied
    into a table or one joined string."""
    size_text = str if long else _human
    header = ("mode", "size", "packed", "codec", "bits/byte", "mtime") + (
        ("sha256",) if long else ())
    rows = []
    for m in members:
        kind = stat.S_IFDIR if m.is_dir() else stat.S_IFREG
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(m.mtime_ns // 1_000_000_000))
        sizes = (size_text(m.size), size_text(m.packed_size)) if m.is_file() else ("", "")
        rows.append((stat.filemode(kind | m.mode), *sizes, m.codec if m.is_file() else "",
                     f"{m.bits_per_byte:.3f}" if m.size else "", when)
                    # a format-1.1 solid member carries a CRC-32 of its data, no SHA-256
                    + (((m.sha256 or "-") if m.is_file() else "",) if long else ()))
    files = [m for m in members if m.is_file()]
    size = sum(m.size for m in files)
    dirs = len(members) - len(files)
    total = ("", size_text(size), size_text(archive_size), "",
             f"{8 * archive_size / size:.3f}" if size else "", "") + (("",) if long else ())
    summary = (f"{len(files)} file{'s' if len(files) != 1 else ''}, {dirs} director"
               f"{'ies' if dirs != 1 else 'y'}")
    columns = len(header)
    widths = [max([len(header[c]), len(total[c])] + [len(r[c]) for r in rows])
              for c in range(columns)]
    right = (False, True, True, False, True, False, False)

    def line(cells, name: str) -> str:
        out = [c.rjust(w) if r else c.ljust(w) for c, w, r in zip(cells, widths, right,
                                                                   strict=False)]
        return " ".join(out) + " " + name + "\n"

    text = line(header, "name")
    write = sys.stdout.write
    write(f"\x1b[1m{text[:-1]}\x1b[0m\n" if sys.stdout.isatty() else text)
    for m, cells in zip(members, rows, strict=True):
        write(line(cells, visible(m.name) + ("/" if m.is_dir() else "")))
    write(line(total, summary))


@app.command("extract", cls=_Command)
def extract_cmd(
    archive: ArchiveArgument,
    members: Annotated[list[str] | None, typer.Argument(
        metavar="MEMBER", help="Members as list prints them, or glob patterns ('src/*.py'; "
                               "'*' matches '/' too). Default: all.")] = None,
    dest: Annotated[Path, typer.Option("-C", "--directory", help="Destination.")] = Path("."),
    overwrite: Annotated[bool, typer.Option(help="Replace existing files.")] = False,
    skip_existing: Annotated[bool, typer.Option(
        "--skip-existing", help="Resume: keep files already in DEST with the member's size "
                                "and checksum (others are still refused without "
                                "--overwrite).")] = False,
    to_stdout: Annotated[bool, typer.Option(
        "--to-stdout", "-O", help="Write the files' bytes to stdout, in stored order "
                                  "(tar -xO, unzip -p); nothing is created.")] = False,
    keep_going: KeepGoingOption = False,
    exclude: ExcludeOption = None,
    keep_modes: Annotated[bool, typer.Option(
        "--keep-modes", "--preserve-permissions",
        help="Apply the stored permission bits as they are. Default: like tar's 'data' "
             "filter, group and other write are cleared.")] = False,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    batch_width: WidthOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    ray: RayOption = None,
) -> None:
    """Extract ARCHIVE (or the named MEMBERs) below DEST."""
    if to_stdout and sys.stdout.isatty():
        raise typer.BadParameter("refusing to write member data to a terminal; redirect "
                                 "stdout", param_hint="--to-stdout")
    with _open(_input(archive), model, device, ray, threads, batch_width) as ar:
        if to_stdout:
            ar.extract_to_stream(sys.stdout.buffer, members or None, exclude=exclude or (),
                                 progress=_progress(quiet))
            return
        try:
            ar.extract(dest, members or None, overwrite=overwrite, progress=_progress(quiet),
                       keep_modes=keep_modes, exclude=exclude or (),
                       skip_existing=skip_existing, keep_going=keep_going)
        except DamagedMembersError as exc:
            _fail_if_damaged(exc.failures, "could not be extracted",
                             f"{_files(exc.done)} extracted")


@app.command("test", cls=_Command)
def test_cmd(
    archive: ArchiveArgument,
    keep_going: KeepGoingOption = False,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    threads: ThreadsOption = None,
    batch_width: WidthOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")] = False,
    ray: RayOption = None,
) -> None:
    """Decode every member of ARCHIVE and verify every checksum (writes nothing)."""
    with _open(_input(archive), model, device, ray, threads, batch_width) as ar:
        try:
            n = len(ar.test(progress=_progress(quiet), keep_going=keep_going))
        except DamagedMembersError as exc:
            _fail_if_damaged(exc.failures, "failed the test",
                             f"{_files(exc.done)} intact")
    print(f"{archive}: OK ({n} members)")


@app.command("info", cls=_Command)
def info_cmd(archive: ArchiveArgument) -> None:
    """Show archive-level information: version, creator, models, totals."""
    with open_archive(_input(archive)) as ar:
        members = ar.members()
        print(f"archive:      {visible(str(archive))}")
        print(f"format:       {ar.version[0]}.{ar.version[1]}")
        print(f"creator:      {visible(ar.creator)}")
        files = [m for m in members if m.is_file()]
        size = sum(m.size for m in files)
        packed = ar.archive_size
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
            print(f"  [{i}] {visible(model.name)}  fingerprint {model.fingerprint.hex()}")
            print(f"      engine  {visible(str(_engine_of(model.profile)))}")
            print(f"      profile {visible(model.profile)}")


@app.command("update", cls=_Command)
def update_cmd(
    archive: Annotated[Path, typer.Argument(metavar="ARCHIVE", help="The archive to change.")],
    src: Annotated[list[Path], typer.Argument(
        metavar="SRC", help="Directories (their contents) or files, named as pack names "
                            "them: new ones are added, changed ones replaced.")],
    delete_missing: Annotated[bool, typer.Option(
        "--delete-missing", help="Also remove members that are not in SRC (zip -FS).")] = False,
    codec: Annotated[str, typer.Option(help=f"One of: {', '.join(CODEC_CHOICES)}.")] = "auto",
    level: Annotated[int, typer.Option(help="zstd level.", min=zstd_codec.MIN_LEVEL,
                                       max=zstd_codec.MAX_LEVEL)] = 19,
    exclude: ExcludeOption = None,
    model: ModelOption = None,
    device: DeviceOption = "auto",
    engine: Annotated[str, typer.Option(help="LLM engine for new entries.")] = DEFAULT_ENGINE,
    threads: ThreadsOption = None,
    skip_unreadable: Annotated[bool, typer.Option(
        help="Skip what cannot be archived (exit status 3) instead of failing.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q",
                                        help="No progress and no summary.")] = False,
) -> int:
    """Add new files of SRC to ARCHIVE and replace changed ones (size or mtime, as zip -u
    and 7z u decide); unchanged members are copied as stored, LLM entries never recoded.
    The archive is rewritten beside itself and replaced only when complete."""
    if codec not in CODEC_CHOICES:
        raise typer.BadParameter(f"must be one of {', '.join(CODEC_CHOICES)}, not {codec!r}",
                                 param_hint="--codec")
    if engine not in ENGINES:
        raise typer.BadParameter(f"must be one of {', '.join(ENGINES)}, not {engine!r}",
                                 param_hint="--engine")
    report = UpdateReport()
    members = update(archive, src, delete_missing=delete_missing, codec=codec, level=level,
                     exclude=exclude or (), progress=_progress(quiet), warn=_warn,
                     llm=LLMOptions(model=model, device=device, engine=engine,
                                    threads=threads),
                     skip_failed=skip_unreadable, report=report)
    if not quiet:
        print(f"{len(members)} members: {len(report.copied)} copied as stored, "
              f"{len(report.coded)} files coded, {len(report.deleted)} removed; "
              f"{report.archive_size} bytes", file=sys.stderr)
    return 0 if report.clean else EXIT_PARTIAL


@app.command("delete", cls=_Command)
def delete_cmd(
    archive: Annotated[Path, typer.Argument(metavar="ARCHIVE", help="The archive to change.")],
    members: Annotated[list[str], typer.Argument(
        metavar="MEMBER", help="Members as list prints them, or glob patterns; a directory "
                               "takes its contents.")],
    exclude: ExcludeOption = None,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="No summary.")] = False,
) -> None:
    """Remove MEMBERs from ARCHIVE (zip -d, 7z d, tar --delete), rewriting it beside
    itself; nothing is recoded except a solid block that loses members (what remains of
    an LLM block is decoded and stored as a solid zstd block)."""
    gone = delete(archive, members, exclude=exclude or (), warn=_warn)
    if not quiet:
        print(f"{len(gone)} member{'s' if len(gone) != 1 else ''} removed", file=sys.stderr)


def _engine_of(profile: str) -> object:
    """The engine named by a (hostile) profile, or why it cannot be read."""
    try:
        return parse_profile(profile).get("engine")
    except LlmarcError as exc:
        return f"unreadable profile ({exc})"


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
    message = visible(" ".join(str(message).split())) or "unknown error"
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
            args = _ray_argv(sys.argv[1:] if argv is None else argv)
            result = app(args=args, prog_name="llmarc", standalone_mode=False)
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
        where = f"{visible(os.fsdecode(exc.filename))}: " if exc.filename else ""
        return _error(f"{where}{exc.strerror or exc}", 1)  # "PATH: reason", as tar says
    except BrokenPipeError:
        return 1


if __name__ == "__main__":  # pragma: no cover
    main()
