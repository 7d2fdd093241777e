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
from collections.abc import Callable
from typing import BinaryIO

from ._version import __version__
from .codecs.llm_options import LLMOptions
from .container.reader import ArchiveReader, MemberInfo
from .errors import (
    ChecksumMismatchError,
    CorruptArchiveError,
    DamagedMembersError,
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
from .progress import ProgressInfo
from .update import delete, update


def open(path: str | os.PathLike[str] | BinaryIO, *, model: str | os.PathLike[str] | None = None,
         device: str = "auto", warn: Callable[[str], None] | None = None,
         ray: str | None = None, threads: int | None = None,
         batch_width: int | None = None) -> ArchiveReader:
    """Open an archive for reading (validates header, footer and index).

    ``path`` may be a binary stream (``sys.stdin.buffer``); one that is not a regular
    file, such as a pipe, is first copied to an unnamed temporary file.

    ``model`` and ``device`` matter only when an LLM-coded member is read: the model
    (default: the embedded SmolLM2) must have the fingerprint recorded in the archive;
    the segment length and precision are adopted from the archive (lockstep-v1 archives
    also impose batch width, dtype and threads).  ``threads`` and ``batch_width`` are
    this process's choice for int-v1/v2 archives (None: the defaults).
    ``warn`` receives warnings such as a differing numerics environment.  ``ray``
    decodes LLM segments on Ray actors: "local" starts a runtime here, else a cluster
    address (``ray://host:port`` or ``auto``); the result is the same bytes."""
    options = LLMOptions(model=None if model is None else os.fspath(model), device=device,
                         ray=ray, threads=threads, batch_width=batch_width)
    return ArchiveReader(path, llm=options, warn=warn)


__all__ = [
    "ArchiveReader",
    "ChecksumMismatchError",
    "CorruptArchiveError",
    "DamagedMembersError",
    "DestinationExistsError",
    "LLMOptions",
    "LlmarcError",
    "MemberInfo",
    "MemberNotFoundError",
    "ModelError",
    "ModelMismatchError",
    "ModelNotFoundError",
    "ProgressInfo",
    "SkippedEntryWarning",
    "SourceError",
    "UnsafeArchiveError",
    "UnsupportedFeatureError",
    "__version__",
    "delete",
    "open",
    "pack",
    "update",
]
