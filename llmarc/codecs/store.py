"""Codec 0, store: the payload is the original bytes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from ..errors import CorruptArchiveError


def encode(chunks: Iterable[bytes]) -> Iterator[bytes]:
    yield from chunks


def decode(chunks: Iterable[bytes], size: int) -> Iterator[bytes]:
    """Yield the original bytes; the payload must be exactly ``size`` bytes."""
    n = 0
    for chunk in chunks:
        n += len(chunk)
        if n > size:
            raise CorruptArchiveError("stored payload is longer than the declared size")
        yield chunk
    if n != size:
        raise CorruptArchiveError("stored payload is shorter than the declared size")
