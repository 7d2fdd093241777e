"""The base install (no extras) in-process: torch, transformers and click made
unimportable, the CLI must still pack (zstd/store), list, extract and test, show its help,
and give one clear line for an archive with LLM entries. (.ci/base-install does the same
with a real `pip install .` in a fresh venv.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LLM_VECTOR = ROOT / "spec" / "vectors" / "llm" / "good-tiny-bpe.llma"

#: Everything the base install lacks (the llm extra) and click (typer vendors its own).
MISSING = ("torch", "transformers", "tokenizers", "gguf", "accelerate", "sentencepiece",
           "safetensors", "click")

RUNNER = textwrap.dedent("""
    import importlib.abc, sys
    MISSING = set(sys.argv[1].split(","))

    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in MISSING:
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None

    sys.meta_path.insert(0, Block())
    from llmarc.cli import run
    sys.exit(run(sys.argv[2:]))
""")


def llmarc_base(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", RUNNER, ",".join(MISSING),
                           *map(str, args)], capture_output=True, text=True, timeout=300,
                          cwd=ROOT)


def test_help_without_extras() -> None:
    r = llmarc_base("--help")
    assert r.returncode == 0, r.stderr
    assert "pack" in r.stdout and "extract" in r.stdout


def test_zstd_store_roundtrip_without_extras(tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "d").mkdir(parents=True)
    (src / "a.txt").write_bytes(b"hello base install\n" * 200)
    (src / "d" / "b.bin").write_bytes(bytes(range(256)) * 10)
    out = tmp_path / "z.llma"
    r = llmarc_base("pack", "--codec", "zstd", "-q", src, out)
    assert r.returncode == 0, r.stderr
    for args in (("list",), ("list", "--json"), ("info",), ("test", "-q")):
        r = llmarc_base(args[0], out, *args[1:])
        assert r.returncode == 0, r.stderr
    r = llmarc_base("extract", "-q", out, "-C", tmp_path / "x")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "x" / "a.txt").read_bytes() == b"hello base install\n" * 200
    assert (tmp_path / "x" / "d" / "b.bin").read_bytes() == bytes(range(256)) * 10
    # auto: text falls back to zstd with a warning naming the missing extra, no traceback
    r = llmarc_base("pack", "-q", src, tmp_path / "auto.llma")
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr
    assert llmarc_base("test", "-q", tmp_path / "auto.llma").returncode == 0


@pytest.mark.parametrize("command", ["test", "extract"])
def test_llm_archive_without_extras_is_one_line(command: str, tmp_path: Path) -> None:
    args = [command, "-q", LLM_VECTOR]
    if command == "extract":
        args += ["-C", tmp_path / "out"]
    r = llmarc_base(*args)
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("llmarc: error:")
    assert "pip install" in lines[0] and "'llmarc[llm]'" in lines[0]
    # listing needs no model at all
    r = llmarc_base("list", LLM_VECTOR)
    assert r.returncode == 0 and "llm" in r.stdout
