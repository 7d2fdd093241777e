"""llmarc: a lossless archiver whose text codec is a language model.

The API is shaped like :mod:`zipfile` / :mod:`tarfile`::

    import llmarc
    llmarc.pack("src/", "out.llma", codec="auto", level=19)
    with llmarc.open("out.llma") as ar:
        for m in ar.members():
            print(m.name, m.size, m.codec, m.bits_per_byte)
        data = ar.read("docs/readme.txt")
        ar.extract("dest/", overwrite=False)
        ar.test()
"""

from __future__ import annotations

import os

from ._version import __version__
from .container.reader import ArchiveReader, MemberInfo
from .errors import (
    ChecksumMismatchError,
    CorruptArchiveError,
    DestinationExistsError,
    LlmarcError,
    MemberNotFoundError,
    ModelError,
    ModelMismatchError,
    ModelNotFoundError,
    SourceError,
    UnsafeArchiveError,
    UnsupportedFeatureError,
)
from .packer import SkippedEntryWarning, pack


def open(path: str | os.PathLike[str]) -> ArchiveReader:
    """Open an archive for reading (validates header, footer and index)."""
    return ArchiveReader(path)


__all__ = [
    "ArchiveReader",
    "ChecksumMismatchError",
    "CorruptArchiveError",
    "DestinationExistsError",
    "LlmarcError",
    "MemberInfo",
    "MemberNotFoundError",
    "ModelError",
    "ModelMismatchError",
    "ModelNotFoundError",
    "SkippedEntryWarning",
    "SourceError",
    "UnsafeArchiveError",
    "UnsupportedFeatureError",
    "__version__",
    "open",
    "pack",
]
