"""A Hugging Face model folder -> :class:`~llmarc.model.derived.DerivedModel` (spec/model.md §2).

``config.json`` is read as JSON and normalized (:mod:`~llmarc.model.architecture`),
weights straight from ``*.safetensors`` (or, for old checkpoints, ``*.bin`` through
torch's loader, which only unpickles tensors), the token table from ``tokenizer.json`` or
``tokenizer.model`` by the spec's rules.  No transformers object is involved, so the
result is the same under any transformers release, or none.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np

from llmarc.errors import ModelError, ModelNotFoundError
from llmarc.model.architecture import Architecture
from llmarc.model.derived import DerivedModel, canonical_shapes
from llmarc.model.safetensors_file import SafetensorsFile
from llmarc.model.sources import ModelSource, file_digest
from llmarc.model.sp_proto import read_pieces
from llmarc.model.start_token import StartTokenRule, resolve_start_token
from llmarc.model.tokenbytes import TokenTable, table_from_pieces, table_from_tokenizer_json

#: Weight files fingerprint v1 hashed (spec/model.md §6).
V1_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise ModelError(f"{what}: cannot read {path.name}: {exc.strerror}") from exc


def _parsed(text: str | bytes, path: Path, what: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise ModelError(f"{what}: {path.name} is not valid JSON ({exc})") from exc


def _json_file(path: Path, what: str) -> Any:
    return _parsed(_read(path, what), path, what)


class _FolderWeights:
    """Name -> float32 values over every ``*.safetensors`` file of a folder (shards
    included), else the ``*.bin`` files through torch."""

    def __init__(self, folder: Path, what: str) -> None:
        self.what = what
        self.files: dict[str, SafetensorsFile] = {}
        self._bin: dict[str, Any] | None = None
        self._bin_paths = sorted(folder.glob("*.bin"))
        for path in sorted(folder.glob("*.safetensors")):
            stored = SafetensorsFile(path)
            for name in stored.tensors:
                if name in self.files:
                    raise ModelError(f"{what}: tensor {name!r} is in two weight files")
                self.files[name] = stored
        if not self.files and not self._bin_paths:
            raise ModelNotFoundError(f"{what}: no weight files (*.safetensors, *.bin)")

    def shape(self, name: str) -> tuple[int, ...] | None:
        if self.files:
            return self.files[name].tensors[name].shape if name in self.files else None
        tensor = self._bin_tensors().get(name)
        return None if tensor is None else tuple(tensor.shape)

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` of a 2-D weight as float32 values: only those rows are widened
        (a step's few tokens, not a 32,000 x 4,096 embedding per step)."""
        if self.files:
            return self.files[name].float32_rows(name, index)
        import torch

        picked = self._bin_tensors()[name][torch.from_numpy(np.asarray(index, dtype=np.int64))]
        return picked.to(torch.float32).numpy()

    def tensor(self, name: str) -> np.ndarray:
        if self.files:
            return self.files[name].float32(name)
        import torch

        return self._bin_tensors()[name].to(torch.float32).numpy().copy()

    def _bin_tensors(self) -> dict[str, Any]:
        if self._bin is None:
            try:
                import torch
            except ImportError as exc:
                raise ModelError(f"{self.what}: *.bin weights need PyTorch; convert them to "
                                 "safetensors, or pip install torch") from exc
            self._bin = {}
            for path in self._bin_paths:
                self._bin.update(torch.load(path, map_location="cpu", weights_only=True,
                                            mmap=True))
        return self._bin


def folder_files_digest(folder: Path) -> str:
    """SHA-256 over the folder's weight files (fingerprint v1's ``weights_digest``):
    for each in byte order of name, the name, 0x00 and the file's raw SHA-256."""
    files = sorted((p for p in folder.iterdir()
                    if p.suffix in V1_WEIGHT_SUFFIXES and p.is_file()),
                   key=lambda p: p.name.encode())
    sha = hashlib.sha256()
    for path in files:
        sha.update(path.name.encode() + b"\0" + bytes.fromhex(file_digest(path)))
    return sha.hexdigest()


def _tokenizer(folder: Path, what: str) -> tuple[TokenTable, dict[str, int], Any]:
    """(table, token text -> id, a factory of the encoder's tokenizer)."""
    json_path, sp_path = folder / "tokenizer.json", folder / "tokenizer.model"
    if json_path.is_file():
        try:
            text = _read(json_path, what).decode("utf-8")
        except UnicodeDecodeError as exc:
            raise ModelError(f"{what}: tokenizer.json is not UTF-8 ({exc})") from exc
        spec = _parsed(text, json_path, what)
        table = table_from_tokenizer_json(spec)
        model = spec.get("model") or {}
        vocab = model.get("vocab")
        ids = dict(vocab) if isinstance(vocab, dict) else {
            entry[0]: i for i, entry in enumerate(vocab or ())}
        ids.update({t["content"]: int(t["id"]) for t in spec.get("added_tokens") or ()})

        def make() -> Any:
            import tokenizers

            return tokenizers.Tokenizer.from_str(text)

        return table, ids, make
    if sp_path.is_file():
        proto = sp_path.read_bytes()
        pieces = read_pieces(proto, f"{what}: tokenizer.model")
        table = table_from_pieces(pieces)
        ids = {p.text: i for i, p in reversed(list(enumerate(pieces)))}

        def make_sp() -> Any:
            import sentencepiece

            return sentencepiece.SentencePieceProcessor(model_proto=proto)

        return table, ids, make_sp
    raise ModelError(f"{what}: no tokenizer.json or tokenizer.model in {folder}")


def read_hf_folder(source: ModelSource) -> DerivedModel:
    """Derive the model of a Hugging Face folder (spec/model.md §2)."""
    folder, what = source.path, source.display_name
    config = _json_file(folder / "config.json", what)
    architecture = Architecture.from_config(config, what)
    weights = _FolderWeights(folder, what)
    for name, shape in canonical_shapes(architecture).items():
        found = weights.shape(name)
        if found != shape:
            raise ModelError(f"{what}: weight {name} is "
                             f"{'missing' if found is None else list(found)}, "
                             f"expected {list(shape)}")
    table, ids, make_tokenizer = _tokenizer(folder, what)
    width = architecture.vocab_size
    if len(table) > width:
        raise ModelError(f"{what}: the tokenizer has {len(table)} tokens but the model "
                         f"predicts only {width}")
    rule = StartTokenRule(
        tokenizer_config=_optional_json(folder / "tokenizer_config.json", what),
        special_tokens_map=_optional_json(folder / "special_tokens_map.json", what),
        config=config, token_ids=ids)
    files_digest = folder_files_digest(folder)
    return DerivedModel(
        source=source, architecture=architecture,
        table=table + [None] * (width - len(table)),
        start_token=resolve_start_token(rule, width, what), weights=weights,
        source_digest=files_digest, make_tokenizer=make_tokenizer, legacy_config=config,
        legacy_weights_digest=lambda: files_digest)


def _optional_json(path: Path, what: str) -> dict[str, Any]:
    if not path.is_file():
        return {}
    value = _json_file(path, what)
    return value if isinstance(value, dict) else {}
