"""The command line as tar, zip and 7z users expect it (issue 23), driven as a user
drives it: ``llmarc`` in a subprocess, pipes for ``-``, a pty for the progress display."""

from __future__ import annotations

import hashlib
import json
import os
import resource
import signal
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from llmarc.container.layout import HEADER_SIZE

from .conftest import make_tree, raw_archive

ROOT = Path(__file__).resolve().parent.parent


def llmarc(*args, cwd=None, stdin=None, env=None, text=True, **kw,
           ) -> subprocess.CompletedProcess:
    """Run the real CLI (``python -m llmarc.cli``) with captured output."""
    return subprocess.run([sys.executable, "-m", "llmarc.cli", *map(str, args)], cwd=cwd,
                          input=stdin, capture_output=True, text=text, timeout=120,
                          env=env, **kw)


def error_lines(r: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in r.stderr, r.stderr
    return [ln for ln in r.stderr.splitlines() if ln.startswith("llmarc: error: ")]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """A small tree shaped like the issue's: licenses, a man page, Python sources."""
    return make_tree(tmp_path / "src", {
        "licenses/MIT": b"Permission is hereby granted, free of charge\n" * 4,
        "man/ls.txt": b"ls - list directory contents\n" * 20,
        "pysrc/a.py": b"print('a')\n", "pysrc/sub/b.py": b"print('b')\n",
        "pysrc/c.txt": b"not python\n", "blob.bin": bytes(range(256)) * 4,
    })


@pytest.fixture
def archive(tmp_path: Path, tree: Path) -> Path:
    out = tmp_path / "t.llma"
    r = llmarc("pack", tree, out, "--codec", "zstd", "-q")
    assert r.returncode == 0, r.stderr
    return out


def files_below(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()}


# ---------------------------------------------------------------- 1: usage and messages


@pytest.mark.parametrize("args,flag", [
    (["pack", "SRC", "o.llma", "--codec", "lzma"], "--codec"),
    (["pack", "SRC", "o.llma", "--level", "99"], "--level"),
    (["pack", "SRC", "o.llma", "--frobnicate"], "--frobnicate"),
    (["extract", "a.llma", "--no-such-flag"], "--no-such-flag"),
])
def test_usage_errors_exit_2_naming_the_flag(tmp_path, args, flag):
    (tmp_path / "SRC").mkdir()
    r = llmarc(*args, cwd=tmp_path)
    assert r.returncode == 2, r.stderr
    lines = error_lines(r)
    assert len(lines) == 1 and flag in lines[0], r.stderr
    assert not (tmp_path / "o.llma").exists()


def test_version_and_short_help():
    from llmarc import __version__

    r = llmarc("--version")
    assert r.returncode == 0 and r.stdout.strip() == f"llmarc {__version__}"
    for command, usage in (("pack", "llmarc pack [OPTIONS] SRC OUT"),
                           ("extract", "llmarc extract [OPTIONS] ARCHIVE [MEMBER...]"),
                           ("list", "llmarc list [OPTIONS] ARCHIVE")):
        r = llmarc(command, "-h")
        assert r.returncode == 0, r.stderr
        assert r.stdout.splitlines()[0] == f"Usage: {usage}"
        assert "{" not in r.stdout.splitlines()[0]


def test_messages_name_the_path_and_the_real_flag(tmp_path, archive):
    dest = tmp_path / "x"
    assert llmarc("extract", archive, "-C", dest, "-q").returncode == 0
    r = llmarc("extract", archive, "-C", dest, "-q")
    assert r.returncode == 1
    (line,) = error_lines(r)
    assert "--overwrite" in line and "'blob.bin'" in line
    (tmp_path / "somedir").mkdir()
    r = llmarc("info", "somedir", cwd=tmp_path)
    assert r.returncode == 1 and error_lines(r) == [
        "llmarc: error: somedir: is a directory, not an archive"]
    r = llmarc("list", "missing.llma", cwd=tmp_path)
    assert error_lines(r) == ["llmarc: error: missing.llma: No such file or directory"]


def _small_file_limit() -> None:
    """In the child: files may not grow past 300 bytes (write(2) then fails with EFBIG,
    the way a full disk fails with ENOSPC)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))


def test_a_full_disk_on_extract_names_the_file(tmp_path, archive):
    r = llmarc("extract", archive, "-C", tmp_path / "x", "-q", "man/ls.txt",
               preexec_fn=_small_file_limit)
    assert r.returncode == 1
    (line,) = error_lines(r)
    assert "cannot write 'man/ls.txt'" in line, line
    assert files_below(tmp_path / "x") == set()  # no half-written file, no temporary


def test_ray_start_up_prints_no_banner_of_its_own():
    """Ray 2.5x logs a token-authentication notice when a local runtime starts; the
    driver's stderr is llmarc's and carries none of it."""
    pytest.importorskip("ray")
    code = ("from llmarc.distributed.ray_coder import connect\n"
            "connect('local').shutdown()\nprint('started')\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       timeout=300, env=dict(os.environ, RAY_USAGE_STATS_ENABLED="0"))
    assert r.returncode == 0 and r.stdout == "started\n", r.stderr
    assert "Token authentication" not in r.stderr and "ray" not in r.stderr.lower(), r.stderr


# ---------------------------------------------------------------- 2: refusals come first


def test_refusals_come_before_torch_is_imported(tmp_path, tree):
    """An existing OUT, a missing source and a bad flag are refused without importing
    torch (a stand-in torch on PYTHONPATH records any import)."""
    fake = tmp_path / "fake"
    (fake / "torch").mkdir(parents=True)
    marker = tmp_path / "torch-imported"
    (fake / "torch" / "__init__.py").write_text(
        f"open({str(marker)!r}, 'w').close()\nraise ImportError('stand-in torch')\n")
    env = dict(os.environ, PYTHONPATH=f"{fake}{os.pathsep}{ROOT}")
    (tmp_path / "exists.llma").write_bytes(b"keep me")
    for args, code in ((("pack", tree, tmp_path / "exists.llma"), 1),
                       (("pack", tmp_path / "missing", tmp_path / "o.llma"), 1),
                       (("pack", tree, tmp_path / "o.llma", "--level", "0"), 2)):
        r = llmarc(*args, env=env)
        assert r.returncode == code, r.stderr
        assert len(error_lines(r)) == 1
        assert not marker.exists(), f"torch was imported for {args}"
    assert (tmp_path / "exists.llma").read_bytes() == b"keep me"
    assert "already exists (use --overwrite" in llmarc(
        "pack", tree, tmp_path / "exists.llma", env=env).stderr
    llm = tmp_path / "llm.llma"  # an LLM archive, extracted onto an existing file
    assert llmarc("pack", tree / "man", llm, "--codec", "llm", "-q").returncode == 0
    make_tree(tmp_path / "dest", {"ls.txt": b"mine"})
    r = llmarc("extract", llm, "-C", tmp_path / "dest", env=env)
    assert r.returncode == 1 and "'ls.txt' already exists" in error_lines(r)[0]
    assert not marker.exists(), "torch was imported to refuse an existing file"


def test_the_llm_codec_on_the_cpu_never_imports_torch_or_transformers(tmp_path, tree):
    """Pack, list, test and extract an LLM archive with stand-ins for torch and
    transformers that record any import: the CPU engine needs neither (issue 25)."""
    fake = tmp_path / "fake"
    markers = {}
    for module in ("torch", "transformers"):
        (fake / module).mkdir(parents=True)
        markers[module] = tmp_path / f"{module}-imported"
        (fake / module / "__init__.py").write_text(
            f"open({str(markers[module])!r}, 'w').close()\nraise ImportError('stand-in')\n")
    env = dict(os.environ, PYTHONPATH=f"{fake}{os.pathsep}{ROOT}")
    llm = tmp_path / "llm.llma"
    for args in (("pack", tree / "man", llm, "--codec", "llm", "-q"), ("list", llm),
                 ("test", "-q", llm), ("extract", "-q", llm, "-C", tmp_path / "out")):
        r = llmarc(*args, env=env)
        assert r.returncode == 0, r.stderr
    assert not [m for m, path in markers.items() if path.exists()]
    for path in (tree / "man").rglob("*"):
        if path.is_file():
            assert (tmp_path / "out" / path.relative_to(tree / "man")).read_bytes() == \
                path.read_bytes()


# ---------------------------------------------------------------- 3: names, globs, excludes


def test_members_as_list_prints_them_and_globs(tmp_path, archive):
    listed = llmarc("list", archive).stdout
    assert " licenses/\n" in listed
    dest = tmp_path / "x"
    r = llmarc("extract", archive, "-C", dest, "-q", "licenses/", "./man/ls.txt",
               "pysrc/*.py")
    assert r.returncode == 0, r.stderr
    assert files_below(dest) == {"licenses/MIT", "man/ls.txt", "pysrc/a.py",
                                 "pysrc/sub/b.py"}  # '*' matches '/' as in tar and unzip
    r = llmarc("extract", archive, "-C", tmp_path / "y", "-q", "nope/*.c")
    assert r.returncode == 1 and "no member named 'nope/*.c'" in error_lines(r)[0]


def test_exclude_on_pack_and_extract(tmp_path, tree, archive):
    out = tmp_path / "ex.llma"
    r = llmarc("pack", tree, out, "--codec", "zstd", "-q", "--exclude", "*.bin",
               "--exclude", "sub")
    assert r.returncode == 0, r.stderr
    names = {row["name"] for row in json.loads(llmarc("list", out, "--json").stdout)}
    assert names == {"licenses", "licenses/MIT", "man", "man/ls.txt", "pysrc",
                     "pysrc/a.py", "pysrc/c.txt"}
    dest = tmp_path / "x"
    r = llmarc("extract", archive, "-C", dest, "-q", "--exclude", "pysrc/*.py",
               "--exclude", "licenses")
    assert r.returncode == 0, r.stderr
    assert files_below(dest) == {"blob.bin", "man/ls.txt", "pysrc/c.txt"}


def test_a_single_file_as_pack_input(tmp_path, tree):
    out = tmp_path / "one.llma"
    r = llmarc("pack", tree / "man" / "ls.txt", out, "--codec", "zstd", "-q")
    assert r.returncode == 0, r.stderr
    rows = json.loads(llmarc("list", out, "--json").stdout)
    assert [row["name"] for row in rows] == ["ls.txt"]
    assert llmarc("extract", out, "-C", tmp_path / "x", "-q").returncode == 0
    assert (tmp_path / "x/ls.txt").read_bytes() == (tree / "man/ls.txt").read_bytes()


# ---------------------------------------------------------------- 4: '-' and -O


def test_stdout_and_stdin_archives_through_pipes(tmp_path, tree):
    packed = subprocess.run([sys.executable, "-m", "llmarc.cli", "pack", str(tree), "-",
                             "--codec", "zstd", "-q"], capture_output=True, timeout=120)
    assert packed.returncode == 0, packed.stderr
    assert not (Path.cwd() / "-").exists()
    data = packed.stdout
    r = llmarc("list", "-", stdin=data, text=False)
    assert r.returncode == 0 and b" man/ls.txt\n" in r.stdout, r.stderr
    r = llmarc("extract", "-", "-C", tmp_path / "x", "-q", stdin=data, text=False)
    assert r.returncode == 0, r.stderr
    assert files_below(tmp_path / "x") == files_below(tree)
    r = llmarc("extract", "-", "-O", "man/ls.txt", "licenses/MIT", stdin=data, text=False)
    assert r.returncode == 0, r.stderr
    expected = {(tree / "man/ls.txt").read_bytes(), (tree / "licenses/MIT").read_bytes()}
    assert len(r.stdout) == sum(map(len, expected))
    assert all(part in r.stdout for part in expected)
    r = llmarc("test", "-", "-q", stdin=data, text=False)
    assert r.returncode == 0 and r.stdout == b"-: OK (10 members)\n", r.stderr


# ---------------------------------------------------------------- 5: damage and resume


@pytest.fixture
def damaged(tmp_path: Path) -> Path:
    """Three stored files in a directory; the middle one has a flipped byte."""
    files = [("d/a.txt", b"A" * 100), ("d/b.txt", b"B" * 100), ("d/c.txt", b"C" * 100)]
    data = bytearray(raw_archive(files, dirs=("d",)))
    data[HEADER_SIZE + 100 + 7] ^= 0x40
    path = tmp_path / "damaged.llma"
    path.write_bytes(bytes(data))
    return path


def test_keep_going_restores_every_intact_member(tmp_path, damaged):
    dest = tmp_path / "x"
    r = llmarc("extract", damaged, "-C", dest, "-q")
    assert r.returncode == 1 and len(error_lines(r)) == 1
    assert files_below(dest) <= {"d/a.txt"}  # stops at the damage, nothing half-written
    assert stat.S_IMODE((dest / "d").stat().st_mode) == 0o755  # modes fixed all the same
    r = llmarc("extract", damaged, "-C", tmp_path / "y", "-q", "--keep-going")
    assert r.returncode == 1
    assert files_below(tmp_path / "y") == {"d/a.txt", "d/c.txt"}
    assert (tmp_path / "y/d/c.txt").read_bytes() == b"C" * 100
    assert "member 'd/b.txt'" in r.stderr and "'d/a.txt'" not in r.stderr
    assert error_lines(r) == ["llmarc: error: 1 member could not be extracted (listed "
                              "above); 2 other files extracted"]
    r = llmarc("test", damaged, "-q", "--keep-going")
    assert r.returncode == 1 and "member 'd/b.txt'" in r.stderr and r.stdout == ""
    assert error_lines(r)[-1].endswith("; 2 other files intact")


def test_list_of_a_damaged_archive_exits_1(damaged):
    r = llmarc("list", damaged)
    assert r.returncode == 1
    assert " d/c.txt\n" in r.stdout  # still listed
    assert "member 'd/b.txt'" in r.stderr and len(error_lines(r)) == 1


def test_skip_existing_resumes_an_extract(tmp_path, archive, tree):
    dest = tmp_path / "x"
    assert llmarc("extract", archive, "-C", dest, "-q", "man/").returncode == 0
    before = (dest / "man/ls.txt").stat().st_ino
    r = llmarc("extract", archive, "-C", dest, "-q", "--skip-existing")
    assert r.returncode == 0, r.stderr
    assert files_below(dest) == files_below(tree)
    assert (dest / "man/ls.txt").stat().st_ino == before  # kept, not rewritten
    (dest / "blob.bin").write_bytes(b"changed")
    r = llmarc("extract", archive, "-C", dest, "-q", "--skip-existing")
    assert r.returncode == 1 and "'blob.bin' already exists" in error_lines(r)[0]
    assert (dest / "blob.bin").read_bytes() == b"changed"


# ---------------------------------------------------------------- 6: list


def test_list_columns_total_and_long(tmp_path, archive, tree):
    lines = llmarc("list", archive).stdout.splitlines()
    assert lines[0].split() == ["mode", "size", "packed", "codec", "bits/byte", "mtime",
                                "name"]
    row = next(ln for ln in lines if ln.endswith(" blob.bin")).split()
    assert row[:2] == ["-rw-r--r--", "1.0K"] and row[3] == "zstd"  # ls -lh sizes
    assert lines[-1].split()[-4:] == ["6", "files,", "4", "directories"]
    solo = tmp_path / "nosolid.llma"
    assert llmarc("pack", tree, solo, "--codec", "zstd", "--no-solid", "-q").returncode == 0
    long = llmarc("list", "-l", solo).stdout.splitlines()
    total = long[-1].split()
    assert total[:2] == [str(sum(p.stat().st_size for p in tree.rglob("*") if p.is_file())),
                         str(solo.stat().st_size)]  # exact bytes; packed: the whole archive
    row = next(ln for ln in long if ln.endswith(" man/ls.txt")).split()
    data = (tree / "man/ls.txt").read_bytes()
    assert row[1] == str(len(data))
    assert hashlib.sha256(data).hexdigest() in row


# ---------------------------------------------------------------- 7: progress


@pytest.fixture
def text_tree(tmp_path: Path) -> Path:
    """Text for the (tiny) LLM codec beside a binary file for zstd."""
    return make_tree(tmp_path / "text", {
        "fox.txt": b"The quick brown fox jumps over the lazy dog.\n" * 120,
        "blob.bin": bytes(range(256)) * 8,
    })


def _strip_ansi(data: bytes) -> list[str]:
    import re

    text = re.sub(rb"\x1b\[[0-9;?]*[A-Za-z]", b"", data).decode("utf-8", "replace")
    return [line for line in re.split(r"[\r\n]", text) if line.strip()]


def _run_in_pty(args: list[str], columns: int = 80) -> tuple[int, bytes]:
    """Run the CLI on a pseudo-terminal of ``columns`` columns; (exit status, output)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    pid, fd = pty.fork()
    if pid == 0:  # pragma: no cover - the child
        os.environ.update(COLUMNS=str(columns), LINES="24")
        os.execv(sys.executable, [sys.executable, "-m", "llmarc.cli", *args])
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", 24, columns, 0, 0))
    out = b""
    while select.select([fd], [], [], 120)[0]:
        try:
            data = os.read(fd, 65536)
        except OSError:  # EIO: the child closed the terminal
            break
        if not data:
            break
        out += data
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    return os.waitstatus_to_exitcode(status), out


def test_progress_bars_fit_80_columns_one_line_each(tmp_path, text_tree):
    code, out = _run_in_pty(["pack", str(text_tree), str(tmp_path / "p.llma"), "--codec",
                             "llm"])
    assert code == 0, out
    lines = _strip_ansi(out)
    assert all(len(line) <= 80 for line in lines), [ln for ln in lines if len(ln) > 80]
    bars = [ln for ln in lines if ln.startswith(("packing ", "llm coding "))]
    assert any(ln.startswith("llm coding ") for ln in bars), lines
    for line in bars:  # a bar never wraps: its numbers and rate are on its own line
        assert "/s" in line and ("B/" in line or " tok" in line), line
    final = [ln for ln in bars if ln.startswith("packing ")][-1]
    assert "7.4 kB/7.4 kB" in final and " in 0:" in final  # done, with the time it took
    assert any("(int-v2 on cpu)" in ln for ln in lines)  # the load line names the engine
    code, out = _run_in_pty(["extract", str(tmp_path / "p.llma"), "-C", str(tmp_path / "x")])
    assert code == 0, out
    lines = _strip_ansi(out)
    assert all(len(line) <= 80 for line in lines), lines
    assert any(ln.startswith("llm decoding ") and "tok/s" in ln for ln in lines), lines


def test_progress_lines_without_a_terminal_agree_and_have_an_eta(tmp_path, text_tree):
    env = dict(os.environ, LLMARC_PROGRESS_INTERVAL="0")
    r = llmarc("pack", text_tree, tmp_path / "p.llma", env=env)
    assert r.returncode == 0, r.stderr
    import re

    rows = re.findall(r"^llmarc: packing .*\((\d+)%\).*ETA [-\d:]+; llm ([\d,]+)/([\d,]+) tok",
                      r.stderr, re.M)
    assert rows, r.stderr
    for percent, done, total in rows:
        if done != total:  # the model is still coding: the bytes are not all done
            assert int(percent) < 100, r.stderr
    assert any(int(p) < 100 and d != "0" for p, d, _t in rows)  # progress while coding


def test_progress_callback_in_the_api(tmp_path, text_tree):
    import llmarc

    seen: list[llmarc.ProgressInfo] = []
    llmarc.pack(text_tree, tmp_path / "p.llma", codec="llm", progress=seen.append)
    coding = [p for p in seen if p.total_tokens and p.message is None]
    assert coding and coding[-1].done_tokens == coding[-1].total_tokens
    for p in coding:
        if p.done_tokens < p.total_tokens:
            assert p.done_bytes < p.total_bytes, p
    assert seen[-1].done_bytes == seen[-1].total_bytes == 120 * 45 + 2048
    assert any(p.message and p.message.startswith("loading ") for p in seen)
    extracted: list[llmarc.ProgressInfo] = []
    with llmarc.open(tmp_path / "p.llma") as archive:
        archive.extract(tmp_path / "x", progress=extracted.append)
    assert extracted[-1].done_bytes == extracted[-1].total_bytes == 120 * 45 + 2048
    assert any(p.total_tokens for p in extracted)


def test_an_interrupted_extract_leaves_no_partial_file_and_fixes_modes(
        tmp_path, archive, monkeypatch):
    """Ctrl-C in the middle of a member: its temporary file is removed, the files done
    stay, and every directory gets its mode (they are created owner-only)."""
    import llmarc as api
    from llmarc.container.reader import ArchiveReader

    real = ArchiveReader._hashed
    calls = []

    def interrupted(chunks, e, progress=None):
        calls.append(e.name)
        for i, chunk in enumerate(real(chunks, e, progress)):
            if len(calls) == 3 and i == 0:
                yield chunk[:10]
                raise KeyboardInterrupt
            yield chunk

    monkeypatch.setattr(ArchiveReader, "_hashed", staticmethod(interrupted))
    dest = tmp_path / "x"
    with api.open(archive) as ar, pytest.raises(KeyboardInterrupt):
        ar.extract(dest)
    written = {p.relative_to(dest).as_posix() for p in dest.rglob("*") if p.is_file()}
    assert len(written) == 2 and calls[2] not in written  # no temporary, no partial file
    for d in ("licenses", "man", "pysrc", "pysrc/sub"):
        assert stat.S_IMODE((dest / d).stat().st_mode) == 0o755, d
    r = llmarc("extract", archive, "-C", dest, "-q", "--skip-existing")  # the rerun
    assert r.returncode == 0, r.stderr
    assert len({p for p in dest.rglob("*") if p.is_file()}) == 6


# ---------------------------------------------------------------- 8: update and delete


def _stored(path: Path, name: str) -> bytes:
    """The stored bytes (the payload) of member ``name``."""
    from llmarc.container.reader import ArchiveReader

    with ArchiveReader(path) as r:
        e = r._entries[r._by_name[name]]
        return b"".join(r._stored(e.stored_offset, e.stored_size))


def test_update_codes_only_what_changed_and_copies_llm_entries(tmp_path, text_tree):
    out = tmp_path / "u.llma"  # --no-solid: each file its own member (no LLM block)
    assert llmarc("pack", text_tree, out, "--codec", "llm", "--no-solid", "-q").returncode == 0
    before = {row["name"]: row for row in json.loads(llmarc("list", out, "--json").stdout)}
    (tmp_path / "before.llma").write_bytes(out.read_bytes())
    (text_tree / "blob.bin").write_bytes(bytes(range(255, -1, -1)) * 8)  # changed
    os.utime(text_tree / "blob.bin", ns=(1, 1))
    (text_tree / "more.bin").write_bytes(os.urandom(300))  # new
    r = llmarc("update", out, text_tree, "--codec", "zstd")
    assert r.returncode == 0, r.stderr
    assert "loading" not in r.stderr  # no model: the LLM entry was copied, not recoded
    assert "3 members: 1 copied as stored, 2 files coded, 0 removed" in r.stderr
    after = {row["name"]: row for row in json.loads(llmarc("list", out, "--json").stdout)}
    assert after["fox.txt"] == before["fox.txt"]  # same codec, packed size, sha256
    assert before["fox.txt"]["codec"] == "llm"
    assert _stored(out, "fox.txt") == _stored(tmp_path / "before.llma", "fox.txt")
    assert after["blob.bin"]["codec"] == "zstd" and "more.bin" in after
    r = llmarc("extract", out, "-C", tmp_path / "x", "-q")
    assert r.returncode == 0, r.stderr
    for name in ("fox.txt", "blob.bin", "more.bin"):
        assert (tmp_path / "x" / name).read_bytes() == (text_tree / name).read_bytes()


def test_update_adds_single_files_from_elsewhere(tmp_path, archive, tree):
    extra = make_tree(tmp_path / "extra", {"NOTES": b"notes\n", "more/x.txt": b"x\n"})
    r = llmarc("update", archive, tree, extra / "NOTES", extra / "more", "-q")
    assert r.returncode == 0, r.stderr
    names = {row["name"] for row in json.loads(llmarc("list", archive, "--json").stdout)}
    assert {"NOTES", "x.txt", "man/ls.txt"} <= names
    other = make_tree(tmp_path / "other", {"NOTES": b"other notes\n"})
    raw = archive.read_bytes()
    r = llmarc("update", archive, extra / "NOTES", other / "NOTES", "-q")
    assert r.returncode == 1 and "'NOTES' comes from both" in error_lines(r)[0]
    assert archive.read_bytes() == raw


def test_a_failed_update_leaves_the_archive_as_it_was(tmp_path, archive, tree):
    raw = archive.read_bytes()
    os.mkfifo(tree / "pipe")
    r = llmarc("update", archive, tree)
    assert r.returncode == 1 and "the archive was not changed" in error_lines(r)[0]
    assert archive.read_bytes() == raw
    assert sorted(os.listdir(archive.parent)) == sorted(["src", archive.name])


def test_delete_members_and_part_of_a_solid_block(tmp_path, archive, tree):
    r = llmarc("delete", archive, "pysrc/*.py", "licenses/")
    assert r.returncode == 0 and "4 members removed" in r.stderr, r.stderr
    names = {row["name"] for row in json.loads(llmarc("list", archive, "--json").stdout)}
    assert names == {"blob.bin", "man", "man/ls.txt", "pysrc", "pysrc/sub", "pysrc/c.txt"}
    assert llmarc("test", archive, "-q").returncode == 0
    assert llmarc("extract", archive, "-C", tmp_path / "x", "-q").returncode == 0
    assert (tmp_path / "x/pysrc/c.txt").read_bytes() == (tree / "pysrc/c.txt").read_bytes()
    r = llmarc("delete", archive, "nothing-*")
    assert r.returncode == 1 and "no member named 'nothing-*'" in error_lines(r)[0]
