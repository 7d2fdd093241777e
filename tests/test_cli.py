"""The command line: exit codes, one-line errors, no tracebacks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmarc.cli import run

from .conftest import make_tree, raw_archive


def cli(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmarc.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def one_error_line(r: subprocess.CompletedProcess) -> None:
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("llmarc: error: "), r.stderr


def test_cli_roundtrip(tmp_path):
    src = make_tree(tmp_path / "src", {"a.txt": b"hello " * 100, "d/b.bin": bytes(256)})
    out = tmp_path / "o.llma"
    r = cli("pack", src, out, "--codec", "zstd", "--level", "3", "--quiet")
    assert r.returncode == 0 and r.stderr == "", r.stderr
    r = cli("list", out, "--json")
    rows = json.loads(r.stdout)
    assert {row["name"] for row in rows} == {"a.txt", "d", "d/b.bin"}
    assert {"name", "type", "size", "packed_size", "codec", "sha256"} <= set(rows[0])
    r = cli("list", out)
    assert r.returncode == 0 and "zstd" in r.stdout and "bits/byte" in r.stdout
    assert "drwx" in r.stdout and "-rw-" in r.stdout  # modes as ls shows them
    assert cli("test", out, "-q").returncode == 0
    r = cli("info", out)
    assert r.returncode == 0 and "format:       3.0" in r.stdout
    assert cli("extract", out, "-C", tmp_path / "x", "-q").returncode == 0
    assert (tmp_path / "x/a.txt").read_bytes() == b"hello " * 100
    r = cli("extract", out, "-C", tmp_path / "y", "d/b.bin", "-q")
    assert r.returncode == 0 and os.listdir(tmp_path / "y") == ["d"]
    r = cli("extract", out, "-C", tmp_path / "x", "-q")
    assert r.returncode == 1
    one_error_line(r)
    assert cli("extract", out, "-C", tmp_path / "x", "--overwrite", "-q").returncode == 0


def test_cli_progress_goes_to_stderr(tmp_path):
    src = make_tree(tmp_path / "src", {"a.txt": b"hello " * 100})
    r = cli("pack", src, tmp_path / "o.llma")
    assert r.returncode == 0 and r.stdout == "" and "members" in r.stderr


@pytest.mark.parametrize("args,code", [
    (["list", "missing.llma"], 1),
    (["pack", "missing-dir", "o.llma"], 1),
    (["pack", ".", "o.llma", "--codec", "lzma"], 2),
    (["pack", "."], 2),
    (["frobnicate"], 2),
    (["list", "garbage.llma"], 1),
    (["extract", "hostile.llma", "-C", "d"], 1),
    (["extract", "good.llma", "nope", "-C", "d"], 1),
    (["pack", ".", "o.llma", "--level", "99"], 2),
])
def test_cli_errors_are_one_line(tmp_path, args, code):
    (tmp_path / "file.txt").write_text("x")
    (tmp_path / "garbage.llma").write_bytes(b"not an archive at all" * 10)
    (tmp_path / "hostile.llma").write_bytes(raw_archive([("../evil", b"x")]))
    (tmp_path / "good.llma").write_bytes(raw_archive([("a", b"x")]))
    r = cli(*args, cwd=tmp_path)
    assert r.returncode == code
    one_error_line(r)
    assert not (tmp_path.parent / "evil").exists()


def test_cli_ctrl_c_exits_130(tmp_path, monkeypatch, capsys):
    import llmarc.cli as climod

    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(climod, "pack", interrupted)
    assert run(["pack", str(tmp_path), str(tmp_path / "o.llma"), "-q"]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "llmarc: interrupted"
    assert not Path(tmp_path / "o.llma").exists()


def test_progress_descriptions_are_literal_text() -> None:
    """A model display name with markup or escapes is shown as written, not interpreted."""
    import io

    from rich.console import Console

    from llmarc.progress import ByteProgress

    out = io.StringIO()
    bars = ByteProgress(Console(file=out, force_terminal=True, width=200, color_system=None))
    bars.start(10, "pack [red]x[/red] \x1b[2J")
    task = bars.token_task(5, "llm [/bold] x")  # the bar's label: up to " (model name)"
    task.advance(5)
    task.close()
    bars.advance(10)
    bars.close()
    text = out.getvalue()
    assert "[red]x[/red]" in text and "llm [/bold] x" in text and "\x1b[2J" not in text
