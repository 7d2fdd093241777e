"""The GGUF container (spec/model.md §3): metadata and tensor directory, read by llmarc.

Why not the ``gguf`` package's reader: the spec must define every byte an archive's
meaning depends on, the reader must be bounded against damaged files, and the
package's views of shapes and quantized data have changed between its releases.  The
container is small (a header, typed key/value pairs, a tensor directory, aligned data),
so it is read here in about a hundred lines and described in the spec byte for byte.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llmarc.model.cursor import Cursor, map_file, release_pages

MAGIC = b"GGUF"
VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4

# Metadata value types: (struct format, size) for scalars.
_SCALARS: dict[int, tuple[str, int]] = {
    0: ("B", 1), 1: ("b", 1), 2: ("H", 2), 3: ("h", 2), 4: ("I", 4), 5: ("i", 4),
    6: ("f", 4), 7: ("B", 1), 10: ("Q", 8), 11: ("q", 8), 12: ("d", 8),
}
_BOOL, _STRING, _ARRAY = 7, 8, 9
_FLOAT32 = 6


@dataclass(frozen=True)
class TensorInfo:
    """One entry of the tensor directory; ``dims`` in GGUF order (``dims[0]`` is the
    row length, the fastest-varying index), ``offset`` absolute in the file."""

    name: str
    dims: tuple[int, ...]
    ggml_type: int
    offset: int

    @property
    def shape(self) -> tuple[int, ...]:
        """The NumPy (row-major) shape: the GGUF dims reversed."""
        return tuple(reversed(self.dims))

    @property
    def elements(self) -> int:
        count = 1
        for dim in self.dims:
            count *= dim
        return count


@dataclass(frozen=True)
class Float32Value:
    """A FLOAT32 metadata value, kept apart from FLOAT64 ones: the spec widens it
    exactly to binary64 (e.g. 1e-5 stored as float32 is 9.999999747378752e-06)."""

    value: float


class GGUFFile:
    """A GGUF file mapped read-only: ``metadata`` (key -> value) and ``tensors``."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._map: Any = map_file(path)
        cursor = Cursor(self._map, f"GGUF file {path}")
        if bytes(cursor.take(4)) != MAGIC:
            raise cursor.fail("not a GGUF file (no 'GGUF' magic)")
        version = cursor.u32()
        if version not in VERSIONS:
            raise cursor.fail(f"GGUF version {version} is not supported (2 or 3)")
        tensor_count, kv_count = cursor.u64(), cursor.u64()
        # Every key/value pair takes at least 12 bytes, every tensor entry at least 24.
        if kv_count * 12 + tensor_count * 24 > cursor.remaining:
            raise cursor.fail(f"claims {kv_count} keys and {tensor_count} tensors")
        self.metadata: dict[str, Any] = {}
        for _ in range(kv_count):
            key = _string(cursor)
            if key in self.metadata:
                raise cursor.fail(f"metadata key {key!r} appears twice")
            self.metadata[key] = _value(cursor, cursor.u32())
        directory = []
        for _ in range(tensor_count):
            name = _string(cursor)
            n_dims = cursor.u32()
            if not 1 <= n_dims <= MAX_DIMS:
                raise cursor.fail(f"tensor {name!r} has {n_dims} dimensions")
            dims = tuple(cursor.u64() for _ in range(n_dims))
            directory.append((name, dims, cursor.u32(), cursor.u64()))
        alignment = self.metadata.get("general.alignment", DEFAULT_ALIGNMENT)
        if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
            raise cursor.fail(f"general.alignment {alignment!r} is not a power of two")
        data_start = -(-cursor.position // alignment) * alignment
        self.tensors: dict[str, TensorInfo] = {}
        for name, dims, ggml_type, offset in directory:
            if name in self.tensors:
                raise cursor.fail(f"tensor {name!r} appears twice")
            if offset % alignment:
                raise cursor.fail(f"tensor {name!r} is not aligned to {alignment}")
            self.tensors[name] = TensorInfo(name, dims, ggml_type, data_start + offset)

    def release(self, info: TensorInfo, size: int) -> None:
        """The pages of a tensor read by :meth:`raw` out of resident memory."""
        release_pages(self._map, info.offset, size)

    def raw(self, info: TensorInfo, size: int) -> memoryview:
        """The ``size`` stored bytes of ``info``, checked to lie inside the file."""
        cursor = Cursor(self._map, f"GGUF file {self.path}", info.offset)
        if info.offset > len(self._map):
            raise cursor.fail(f"tensor {info.name!r} starts past the end of the file")
        return cursor.take(size)


def _string(cursor: Cursor) -> str:
    size = cursor.u64()
    try:
        return str(cursor.take(size), "utf-8")
    except UnicodeDecodeError as exc:
        raise cursor.fail("a string is not UTF-8") from exc


def _value(cursor: Cursor, value_type: int) -> Any:
    if value_type == _STRING:
        return _string(cursor)
    if value_type == _ARRAY:
        element_type, count = cursor.u32(), cursor.u64()
        smallest = 8 if element_type == _STRING else _SCALARS.get(element_type, ("", 1))[1]
        if count * smallest > cursor.remaining:
            raise cursor.fail(f"an array claims {count} elements")
        if element_type in _SCALARS and element_type not in (_BOOL, _FLOAT32):
            fmt, size = _SCALARS[element_type]
            return list(struct.unpack(f"<{count}{fmt}", cursor.take(count * size)))
        return [_value(cursor, element_type) for _ in range(count)]
    if value_type not in _SCALARS:
        raise cursor.fail(f"unknown metadata value type {value_type}")
    value = cursor.unpack(_SCALARS[value_type][0])[0]
    if value_type == _BOOL:
        if value > 1:
            raise cursor.fail(f"a bool holds {value}")
        return bool(value)
    if value_type == _FLOAT32:
        return Float32Value(value)
    return value
