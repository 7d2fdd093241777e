"""The base install (no extras) in-process: torch, transformers and the other extras'
modules made unimportable, the CLI must still pack (zstd/store and the LLM codec), list,
extract and test, and show its help; without numba (a broken install) an archive with LLM
entries gives one clear line.  (.ci/base-install does the same with a real
`pip install .` in a fresh venv.)"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
LLM_VECTOR = ROOT / "spec" / "vectors" / "llm" / "good-tiny-bpe.llma"

#: Everything the base install lacks (the cuda, lockstep and test extras) and click (typer
#: vendors its own).
MISSING = ("torch", "transformers", "gguf", "accelerate", "safetensors", "click")
FIXTURE = ROOT / "fixtures" / "tiny-llama-bpe"

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


def llmarc_base(*args: str | Path, missing: tuple[str, ...] = MISSING
                ) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", RUNNER, ",".join(missing),
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


def test_the_llm_codec_without_torch_or_transformers(tmp_path: Path) -> None:
    """Pack with the LLM codec, test and extract, and decode a frozen vector: the base
    install's CPU engine, byte for byte."""
    src = tmp_path / "src"
    src.mkdir()
    text = (ROOT / "fixtures" / "tiny-training.txt").read_bytes()[:2000]
    (src / "a.txt").write_bytes(text)
    out = tmp_path / "t.llma"
    r = llmarc_base("pack", "--codec", "llm", "--model", FIXTURE, "-q", src, out)
    assert r.returncode == 0, r.stderr
    assert llmarc_base("test", "-q", out, "--model", FIXTURE).returncode == 0
    r = llmarc_base("extract", "-q", out, "--model", FIXTURE, "-C", tmp_path / "x")
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "x" / "a.txt").read_bytes() == text
    r = llmarc_base("test", "-q", LLM_VECTOR, "--model", FIXTURE)
    assert r.returncode == 0, r.stderr


@pytest.mark.parametrize("command", ["test", "extract"])
def test_llm_archive_without_numba_is_one_line(command: str, tmp_path: Path) -> None:
    args = [command, "-q", LLM_VECTOR, "--model", FIXTURE]
    if command == "extract":
        args += ["-C", tmp_path / "out"]
    r = llmarc_base(*args, missing=(*MISSING, "numba"))
    assert r.returncode == 1
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("llmarc: error:")
    assert "pip install" in lines[0] and "numba" in lines[0]
    # listing needs no model at all
    r = llmarc_base("list", LLM_VECTOR, missing=(*MISSING, "numba"))
    assert r.returncode == 0 and "llm" in r.stdout
