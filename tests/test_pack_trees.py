"""Packing real trees (issue 11): nothing dropped silently, special files, names Linux
allows, twins, deep trees, files that change or vanish, signals, stale temporary files,
messages and progress without a terminal."""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import llmarc
from llmarc import cli, packer
from llmarc.container.writer import clean_stale_temps
from llmarc.errors import SourceError, UnsafeArchiveError
from llmarc.packer import PackReport, UnarchivableError

from .conftest import make_tree, snapshot


def _run(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.run(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def odd_tree(tmp_path: Path) -> Path:
    """A tree with one of each thing that cannot be archived, beside normal files."""
    src = make_tree(tmp_path / "src", {"ok.txt": b"fine\n", "sub/also.txt": b"fine too\n"})
    os.mkfifo(src / "fifo")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(src / "sock"))
    sock.close()
    os.symlink("ok.txt", src / "link")
    (src / os.fsdecode(b"bad\xffname")).write_bytes(b"x")
    (src / "tab\there").write_bytes(b"x")
    os.mkdir(src / os.fsdecode(b"dir\xfe"))
    (src / os.fsdecode(b"dir\xfe") / "inner.txt").write_bytes(b"lost with its directory")
    return src


def test_unarchivable_paths_are_an_error_listing_every_one(odd_tree, tmp_path, capsys):
    out = tmp_path / "a.llma"
    code, _, err = _run(capsys, "pack", str(odd_tree), str(out), "--codec", "zstd", "-q")
    assert code == 1 and not out.exists()
    listed = [line for line in err.splitlines() if line.startswith("llmarc: cannot archive")]
    assert len(listed) == 7, err  # fifo, sock, link, 2 names, a directory and its content
    assert "bad\\xffname" in err and "tab\\x09here" in err  # escaped, one line each
    assert "FIFO" in err and "socket" in err and "symbolic link" in err
    assert "inner.txt" in err
    assert err.splitlines()[-1].startswith("llmarc: error: 7 paths cannot be archived")
    assert [p for p in os.listdir(tmp_path) if "llmarc-tmp" in p] == []


def test_skip_unreadable_skips_loudly_counts_and_exits_3(odd_tree, tmp_path, capsys):
    out = tmp_path / "a.llma"
    code, _, err = _run(capsys, "pack", str(odd_tree), str(out), "--codec", "zstd",
                        "--skip-unreadable")
    assert code == cli.EXIT_PARTIAL == 3
    assert err.count("llmarc: warning: skipping") == 7
    assert "; 7 skipped" in err.splitlines()[-1]
    with llmarc.open(out) as ar:
        assert sorted(m.name for m in ar.members()) == ["ok.txt", "sub", "sub/also.txt"]
        assert ar.read("sub/also.txt") == b"fine too\n"


def test_api_raises_with_all_problems(odd_tree, tmp_path):
    with pytest.raises(UnarchivableError) as info:
        llmarc.pack(odd_tree, tmp_path / "a.llma", codec="store")
    assert len(info.value.problems) == 7
    assert isinstance(info.value, SourceError)


ROOT = Path(__file__).resolve().parent.parent
NOBODY = 65534


@dataclass
class Result:
    returncode: int
    stderr: str


def _cli_as(uid: int | None, workdir: Path, args: tuple[str, ...]) -> Result:
    """``llmarc ARGS`` in a forked child of this process, as ``uid`` (None: unchanged),
    its stdout and stderr captured.  Dropping privileges in a fork needs no exec: the
    interpreter need not be reachable by that user (a pyenv Python below root's 0700
    home is not)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 125
        try:
            os.close(read_end)
            os.dup2(write_end, 1)
            os.dup2(write_end, 2)
            sys.stdout = sys.stderr = open(write_end, "w", closefd=False)  # noqa: SIM115
            if uid is not None:
                os.setgroups([])
                os.setgid(uid)
                os.setuid(uid)
            os.chdir(workdir)
            code = cli.run(list(args))
            sys.stderr.flush()
        except BaseException as exc:  # reported to the parent, then exit
            os.write(2, f"child failed: {exc!r}\n".encode())
        finally:
            os._exit(code)
    os.close(write_end)
    with open(read_end, "rb") as pipe:
        output = pipe.read().decode(errors="replace")
    _, status = os.waitpid(pid, 0)
    return Result(os.waitstatus_to_exitcode(status), output)


@pytest.fixture
def unprivileged(tmp_path):
    """Run the CLI as a user without privileges, so permission tests mean something when
    the suite runs as root (as CI does: root reads everything and writes anywhere).

    As root, commands run as uid/gid 65534 in a directory below /tmp that this user can
    reach (pytest's own tmp_path sits in a 0700 directory of root's); the fixture first
    checks that this user really is refused what it must be refused, so the tests never
    pass for want of privileges dropped.  As any other user, the CLI runs as that user.
    Yields ``(workdir, run)``; ``run(*args)`` returns a Result (returncode, stderr)."""
    if os.geteuid() != 0:
        workdir = tmp_path / "work"
        workdir.mkdir()
        yield workdir, lambda *a: _cli_as(None, workdir, a)
        return
    workdir = Path(tempfile.mkdtemp(prefix="llmarc-unprivileged-", dir="/tmp"))
    try:
        os.chmod(workdir, 0o755)
        # Import here, as root, what a pack and its errors import lazily: the child
        # cannot read the interpreter's standard library below root's home.
        warm = make_tree(tmp_path / "warm", {"a": b"1", "locked": b"2"})
        with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
            cli.run(["pack", str(warm), str(tmp_path / "warm.llma"), "--codec", "zstd"])
            cli.run(["pack", str(warm), str(tmp_path / "warm.llma")])
        probe = _cli_as(NOBODY, workdir, ("pack", str(workdir), str(workdir / "x.llma")))
        assert probe.returncode == 1 and "ermission denied" in probe.stderr, probe.stderr
        yield workdir, lambda *a: _cli_as(NOBODY, workdir, a)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def test_unreadable_file_is_an_error(unprivileged):
    workdir, run = unprivileged
    src = make_tree(workdir / "src", {"secret": b"x", "ok": b"y"})
    os.chmod(src / "secret", 0)
    out = workdir / "out"
    out.mkdir()
    if os.geteuid() == 0:
        os.chown(out, NOBODY, NOBODY)
    result = run("pack", str(src), str(out / "a.llma"), "--codec", "store", "-q")
    assert result.returncode == 1, result.stderr
    assert "'" + str(src / "secret") + "'" in result.stderr, result.stderr
    assert "permission denied" in result.stderr.lower(), result.stderr
    assert os.listdir(out) == []  # nothing written, not even a temporary file
    result = run("pack", str(src), str(out / "a.llma"), "--codec", "store",
                 "--skip-unreadable", "-q")
    assert result.returncode == cli.EXIT_PARTIAL, result.stderr
    with llmarc.open(out / "a.llma") as ar:
        assert [m.name for m in ar.members()] == ["ok"]


def test_case_and_normalization_twins_roundtrip(tmp_path):
    nfc, nfd = "caf\u00e9.txt", "cafe\u0301.txt"
    src = make_tree(tmp_path / "src", {"README": b"upper", "readme": b"lower",
                                       nfc: b"composed", nfd: b"decomposed"})
    llmarc.pack(src, tmp_path / "a.llma", codec="zstd")
    with llmarc.open(tmp_path / "a.llma") as ar:
        assert sorted(m.name for m in ar.members()) == sorted(["README", "readme", nfc, nfd])
        ar.extract(tmp_path / "out")
    assert snapshot(tmp_path / "out") == snapshot(src)


def test_twins_refused_loudly_on_a_folding_file_system(tmp_path, monkeypatch):
    nfc, nfd = "caf\u00e9", "cafe\u0301"
    src = make_tree(tmp_path / "src", {nfc: b"1", nfd: b"2", "A/x": b"3", "a": b"4"})
    llmarc.pack(src, tmp_path / "a.llma", codec="store")
    monkeypatch.setattr(llmarc.safety, "dest_folds", lambda fd: True)
    with llmarc.open(tmp_path / "a.llma") as ar, \
            pytest.raises(UnsafeArchiveError) as info:
        ar.extract(tmp_path / "out")
    message = str(info.value)
    assert "'caf\\xe9'" in message and "'cafe\\u0301'" in message  # both, told apart
    assert "'A'" in message and "'a'" in message  # a parent directory and a file
    assert not (tmp_path / "out" / "a").exists()


def test_folding_probe_on_this_file_system(tmp_path):
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        assert llmarc.safety.dest_folds(fd) is False  # Linux ext4/overlay/tmpfs
    finally:
        os.close(fd)
    assert os.listdir(tmp_path) == []


def _remove_deep(path: Path) -> None:
    """Remove a tree of any depth without recursion or long paths: hoist each
    subdirectory's children one level up, then remove it (shutil.rmtree and pytest's
    tmp_path clean-up recurse, and crash on 2,000 levels)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    counter = 0
    try:
        while names := os.listdir(fd):
            for name in names:
                if not stat.S_ISDIR(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
                    os.unlink(name, dir_fd=fd)
                    continue
                sub = os.open(name, os.O_RDONLY | os.O_DIRECTORY, dir_fd=fd)
                try:
                    for child in os.listdir(sub):
                        counter += 1
                        os.rename(child, f".hoisted{counter}", src_dir_fd=sub, dst_dir_fd=fd)
                finally:
                    os.close(sub)
                os.rmdir(name, dir_fd=fd)
    finally:
        os.close(fd)
    os.rmdir(path)


def test_2000_deep_tree(tmp_path):
    depth = 2000
    root = tmp_path / "deep"
    root.mkdir()
    fd = os.open(root, os.O_RDONLY)
    for _ in range(depth):  # through fds: the path is longer than PATH_MAX
        os.mkdir("d", dir_fd=fd)
        new = os.open("d", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = new
    leaf = os.open("leaf.txt", os.O_WRONLY | os.O_CREAT, 0o644, dir_fd=fd)
    os.write(leaf, b"at the bottom\n")
    os.close(leaf)
    os.close(fd)
    try:
        members = llmarc.pack(root, tmp_path / "deep.llma", codec="store")
        assert len(members) == depth + 1
        name = "d/" * depth + "leaf.txt"
        with llmarc.open(tmp_path / "deep.llma") as ar:
            assert ar.read(name) == b"at the bottom\n"
            ar.test()
    finally:
        _remove_deep(root)
    assert not root.exists()


def test_file_appended_during_pack_is_read_again(tmp_path, monkeypatch):
    """Appended once while read (a hook in the read loop): the file is read again, so the
    stored bytes, size and mtime are those of the file as it now is; nothing to report."""
    src = make_tree(tmp_path / "src", {"grows.log": b"a" * 3000, "calm.txt": b"calm\n",
                                       "other.txt": b"other\n"})
    monkeypatch.setattr(packer, "CHUNK", 1000)
    grown: list[str] = []

    def append_once(path: str, done: int) -> None:
        if path.endswith("grows.log") and not grown:
            grown.append(path)
            with open(path, "ab") as f:
                f.write(b"b" * 500)
            st = os.stat(path)
            os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))

    monkeypatch.setattr(packer, "_on_read", append_once)
    for codec, solid in (("store", True), ("zstd", False), ("zstd", True)):
        report = PackReport()
        grown.clear()
        (src / "grows.log").write_bytes(b"a" * 3000)
        out = tmp_path / f"{codec}{solid}.llma"
        llmarc.pack(src, out, codec=codec, solid=solid, report=report)
        assert grown and report.clean
        final = os.stat(src / "grows.log")
        with llmarc.open(out) as ar:
            m = ar.getmember("grows.log")
            assert ar.read("grows.log") == b"a" * 3000 + b"b" * 500
            assert (m.size, m.mtime_ns) == (3500, final.st_mtime_ns)
            ar.test()


def test_file_that_keeps_changing_is_reported(tmp_path, monkeypatch):
    src = make_tree(tmp_path / "src", {"busy.log": b"a" * 100, "calm.txt": b"calm\n"})
    before: list[int] = []

    def append_always(path: str, done: int) -> None:
        if path.endswith("busy.log"):
            before.append(os.stat(path).st_mtime_ns)
            with open(path, "ab") as f:
                f.write(b"more")

    monkeypatch.setattr(packer, "_on_read", append_always)
    for codec in ("store", "zstd"):
        before.clear()
        report, msgs = PackReport(), []
        out = tmp_path / f"{codec}.llma"
        llmarc.pack(src, out, codec=codec, report=report, warn=msgs.append)
        assert [os.path.basename(p) for p in report.changed] == ["busy.log"]
        assert len(before) == 1 + packer.REREADS  # read, then read again twice
        assert any("file changed as we read it" in m for m in msgs)
        with llmarc.open(out) as ar:
            m = ar.getmember("busy.log")
            data = ar.read("busy.log")
            assert m.size == len(data) and data.startswith(b"a" * 100)
            assert m.mtime_ns == before[-1]  # the mtime before the last read
            ar.test()


def test_changed_file_makes_pack_exit_3(tmp_path, monkeypatch, capsys):
    src = make_tree(tmp_path / "src", {"grows.log": b"a" * 100})

    def append(path: str, done: int) -> None:
        with open(path, "ab") as f:
            f.write(b"more")

    monkeypatch.setattr(packer, "_on_read", append)
    code, _, err = _run(capsys, "pack", str(src), str(tmp_path / "a.llma"), "--codec", "zstd")
    assert code == 3
    assert "file changed as we read it" in err and "1 changed while read" in err


def test_vanished_file_is_a_warning_and_the_pack_goes_on(tmp_path, monkeypatch):
    src = make_tree(tmp_path / "src", {"a.txt": b"a" * 50, "b.txt": b"b" * 50,
                                       "c.bin": bytes(range(256)) * 4})
    real_scan = packer.scan

    def scan_then_delete(*args, **kwargs):
        entries = real_scan(*args, **kwargs)
        os.unlink(src / "b.txt")
        os.unlink(src / "c.bin")
        return entries

    monkeypatch.setattr(packer, "scan", scan_then_delete)
    for solid in (True, False):
        report = PackReport()
        msgs: list[str] = []
        out = tmp_path / f"{solid}.llma"
        members = llmarc.pack(src, out, codec="zstd", solid=solid, warn=msgs.append,
                              report=report)
        assert [m.name for m in members] == ["a.txt"]
        assert sorted(os.path.basename(p) for p in report.vanished) == ["b.txt", "c.bin"]
        assert sum("vanished" in m for m in msgs) == 2
        with llmarc.open(out) as ar:
            ar.test()
        (src / "b.txt").write_bytes(b"b" * 50)
        (src / "c.bin").write_bytes(bytes(range(256)) * 4)


_SLOW_PACK = """
import sys
from llmarc import cli, packer
def slow(path, done):
    import time
    time.sleep(0.05)
packer._on_read = slow
sys.exit(cli.run(sys.argv[1:]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP])
def test_sigterm_and_sighup_clean_up_and_exit_128_plus_n(tmp_path, sig):
    src = make_tree(tmp_path / "src", {f"f{i}.txt": b"x" * 1000 for i in range(200)})
    out = tmp_path / "out" / "a.llma"
    out.parent.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", _SLOW_PACK, "pack", str(src), str(out),
                             "--codec", "zstd"], stderr=subprocess.PIPE, text=True,
                            cwd=Path(__file__).resolve().parent.parent)
    deadline = time.monotonic() + 60
    while not [p for p in os.listdir(out.parent) if p.endswith(".llmarc-tmp")]:
        assert proc.poll() is None and time.monotonic() < deadline, proc.stderr.read()
        time.sleep(0.05)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig
    assert err.strip().splitlines()[-1] == f"llmarc: terminated by {signal.Signals(sig).name}"
    assert os.listdir(out.parent) == []


def test_stale_temp_of_a_killed_pack_is_removed_next_time(tmp_path, capsys):
    src = make_tree(tmp_path / "src", {"a": b"1"})
    out = tmp_path / "a.llma"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    stale = tmp_path / f".a.llma.pack{dead}.abcd1234.llmarc-tmp"
    stale.write_bytes(b"partial")
    alive = tmp_path / f".a.llma.pack{os.getpid()}.abcd1234.llmarc-tmp"
    alive.write_bytes(b"in progress")
    older = tmp_path / ".a.llma.q1w2e3r4.llmarc-tmp"
    older.write_bytes(b"old style")
    code, _, err = _run(capsys, "pack", str(src), str(out), "--codec", "store", "-q")
    assert code == 0
    assert not stale.exists() and alive.exists() and older.exists()
    assert f"removed '{stale}'" in err
    assert "still running" in err and "remove it if no llmarc is running" in err
    assert clean_stale_temps(str(out))  # the other two are still reported


def test_messages_name_paths_and_real_flags(tmp_path, capsys):
    src = make_tree(tmp_path / "src", {"a": b"1"})
    code, _, err = _run(capsys, "pack", str(src), str(tmp_path / "nodir" / "a.llma"))
    assert code == 1 and "nodir" in err and "does not exist" in err
    assert "llmarc-tmp" not in err
    code, _, err = _run(capsys, "pack", str(src), str(tmp_path))
    assert code == 1 and "is a directory" in err and "overwrite" not in err
    (tmp_path / "x.llma").write_bytes(b"")
    code, _, err = _run(capsys, "pack", str(src), str(tmp_path / "x.llma"))
    assert code == 1 and "--overwrite" in err


def test_read_only_destination_is_a_one_line_error(unprivileged):
    """A directory the user cannot write to (as root this runs as uid 65534: root writes
    anywhere)."""
    workdir, run = unprivileged
    src = make_tree(workdir / "src", {"a": b"1"})
    ro = workdir / "ro"
    ro.mkdir(mode=0o555)
    result = run("pack", str(src), str(ro / "a.llma"))
    assert result.returncode == 1, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmarc: error:"), result.stderr
    assert str(ro) in lines[0] and "llmarc-tmp" not in lines[0]
    assert "permission denied" in lines[0].lower()
    assert os.listdir(ro) == []


def test_full_disk_names_the_archive(tmp_path, monkeypatch):
    src = make_tree(tmp_path / "src", {"a": b"1" * 5000})
    from llmarc.container import writer as writer_mod

    def full(self, data):
        raise self._named(OSError(28, "No space left on device"))

    monkeypatch.setattr(writer_mod.ArchiveWriter, "_write", full)
    with pytest.raises(OSError, match=r"a\.llma.*No space left on device"):
        llmarc.pack(src, tmp_path / "a.llma", codec="store")
    assert sorted(os.listdir(tmp_path)) == ["src"]


def test_line_progress_without_a_terminal():
    from io import StringIO

    from llmarc.progress import LineProgress
    now = [0.0]
    stream = StringIO()
    p = LineProgress(stream, interval=5, clock=lambda: now[0])
    p.start(1000, "packing")
    p.advance(100)
    assert stream.getvalue() == ""  # nothing for short runs
    now[0] = 6.0
    p.advance(400)
    tokens = p.token_task(50, "llm")
    now[0] = 12.0
    tokens.advance(10)
    lines = stream.getvalue().splitlines()
    assert lines[0] == "llmarc: packing 500 bytes/1.0 kB (50%), 83 bytes/s, ETA 0:00:06"
    # while the model runs the ETA comes from the token rate (10 tokens in 6 s)
    assert lines[1] == ("llmarc: packing 500 bytes/1.0 kB (50%), 41 bytes/s, ETA 0:00:24; "
                        "llm 10/50 tok, 1 tok/s")


def test_quiet_pack_prints_nothing(tmp_path, capsys):
    src = make_tree(tmp_path / "src", {"a": b"1" * 100})
    code, out, err = _run(capsys, "pack", str(src), str(tmp_path / "a.llma"), "--codec",
                          "zstd", "-q")
    assert code == 0 and out == "" and err == ""


def test_setuid_bits_are_dropped_with_a_warning(tmp_path):
    src = make_tree(tmp_path / "src", {"tool": b"#!/bin/sh\n", "plain": b"x"})
    os.chmod(src / "tool", 0o4755)
    msgs: list[str] = []
    members = llmarc.pack(src, tmp_path / "a.llma", codec="store", warn=msgs.append)
    assert {m.name: m.mode for m in members}["tool"] == 0o755
    assert [m for m in msgs if "setuid" in m] == [
        f"setuid, setgid and sticky bits are not archived: 1 path loses them, first "
        f"'{src / 'tool'}'"]
