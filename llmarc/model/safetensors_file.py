"""The safetensors container (spec/model.md §2.2), read by llmarc without torch.

The format is an 8-byte header length, a JSON header (name -> dtype, shape, byte range)
and the raw little-endian data; the ``safetensors`` package would hand tensors to torch
or NumPy, but the values an archive depends on must not pass through a library's
conversions, and reading is a few lines.  Float16 and bfloat16 values widen to float32
exactly.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmarc.errors import ModelError
from llmarc.model.cursor import Cursor, map_file, release_pages
from llmarc.model.dequantize import widen_bf16

MAX_HEADER = 100 << 20
_DTYPES = {"F32": (np.dtype("<f4"), 4), "F16": (np.dtype("<f2"), 2), "BF16": (None, 2)}


@dataclass(frozen=True)
class StoredTensor:
    """Where one tensor's bytes lie in a safetensors file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int
    end: int


class SafetensorsFile:
    """A safetensors file mapped read-only: ``tensors`` (name -> :class:`StoredTensor`)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._map: Any = map_file(path)
        cursor = Cursor(self._map, f"safetensors file {path}")
        size = cursor.u64()
        if size > min(MAX_HEADER, cursor.remaining):
            raise cursor.fail(f"header of {size} bytes")
        try:
            header = json.loads(bytes(cursor.take(size)))
        except ValueError as exc:
            raise cursor.fail("the header is not JSON") from exc
        if not isinstance(header, dict):
            raise cursor.fail("the header is not a JSON object")
        self.data_start = cursor.position
        data_size = len(self._map) - self.data_start
        self.tensors: dict[str, StoredTensor] = {}
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            try:
                dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
                shape = tuple(int(d) for d in shape)
            except (KeyError, TypeError, ValueError) as exc:
                raise cursor.fail(f"tensor {name!r} has a malformed entry") from exc
            count = int(np.prod(shape, dtype=np.int64)) if shape else 1
            if dtype in _DTYPES and not 0 <= begin <= end <= data_size:
                raise cursor.fail(f"tensor {name!r} lies outside the file")
            if dtype in _DTYPES and end - begin != count * _DTYPES[dtype][1]:
                raise cursor.fail(f"tensor {name!r}: {end - begin} bytes for {shape}")
            self.tensors[name] = StoredTensor(dtype, shape, begin, end)


    def float32_rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` of 2-D tensor ``name`` as float32 values (the embedding's rows
        for the tokens of a step, without the whole table in memory)."""
        stored = self.tensors[name]
        if stored.dtype not in _DTYPES or len(stored.shape) != 2:
            return self.float32(name)[index]
        raw = np.frombuffer(self._map, dtype=np.uint8, count=stored.end - stored.begin,
                            offset=self.data_start + stored.begin)
        picked = raw.reshape(stored.shape[0], -1)[np.asarray(index, dtype=np.int64)]
        if stored.dtype == "BF16":
            return widen_bf16(picked.reshape(-1)).reshape(len(picked), stored.shape[1])
        values = picked.reshape(-1).view(_DTYPES[stored.dtype][0]).astype("<f4")
        return values.reshape(len(picked), stored.shape[1])

    def float32(self, name: str) -> np.ndarray:
        """Tensor ``name`` as float32 values (exact for F32, F16 and BF16)."""
        stored = self.tensors[name]
        if stored.dtype not in _DTYPES:
            raise ModelError(f"{self.path}: tensor {name!r} has dtype {stored.dtype} "
                             "(supported: F32, F16, BF16)")
        raw = np.frombuffer(self._map, dtype=np.uint8, count=stored.end - stored.begin,
                            offset=self.data_start + stored.begin)
        if stored.dtype == "BF16":
            values = widen_bf16(raw)
        else:
            values = raw.view(_DTYPES[stored.dtype][0]).astype("<f4")
        release_pages(self._map, self.data_start + stored.begin, stored.end - stored.begin)
        return np.ascontiguousarray(values.reshape(stored.shape))
