"""The exception tree of llmarc.

Every failure a user can cause (a bad archive, a bad path, a missing model) is one of
these classes, so the CLI can print one ``llmarc: error: ...`` line instead of a
traceback, and API callers can catch exactly what they mean to handle.

    LlmarcError
    ├── CorruptArchiveError        bytes that break the format or a checksum
    │   ├── ChecksumMismatchError  decoded data whose SHA-256/CRC does not match
    │   └── DamagedMembersError    keep_going: these members failed, the others were done
    ├── UnsafeArchiveError         a member that would escape or damage DEST
    ├── UnsupportedFeatureError    valid, but needs a newer reader (version, codec, flag)
    ├── ModelError                 anything about the model of the LLM codec
    │   ├── ModelNotFoundError     no such model on this machine
    │   └── ModelMismatchError     the archive was made with another model
    ├── MemberNotFoundError        a name asked for is not in the archive (also KeyError)
    ├── DestinationExistsError     extraction would overwrite without --overwrite
    └── SourceError                the source tree cannot be packed as asked
"""

from __future__ import annotations


class LlmarcError(Exception):
    """Base class of every error llmarc raises on purpose."""


class CorruptArchiveError(LlmarcError):
    """The archive's bytes are not a valid archive (truncated, flipped, inconsistent)."""


class ChecksumMismatchError(CorruptArchiveError):
    """A checksum over stored or decoded bytes does not match the recorded one."""


class DamagedMembersError(CorruptArchiveError):
    """``extract``/``test`` with ``keep_going``: some members could not be restored.

    ``failures`` pairs each such member (a MemberInfo) with its error; ``done`` lists the
    members that were restored (or verified) all the same, as tar and unzip go on past
    a damaged member and report it."""

    def __init__(self, message: str, failures: list, done: list) -> None:
        super().__init__(message)
        self.failures = failures
        self.done = done


class UnsafeArchiveError(LlmarcError):
    """A member's name or type would write outside the destination or damage it."""


class UnsupportedFeatureError(LlmarcError):
    """The archive is well formed but uses a version, codec or flag this reader lacks."""


class ModelError(LlmarcError):
    """A problem with the language model used by the LLM codec."""


class ModelNotFoundError(ModelError):
    """The requested model is not available locally (no network fetch is ever tried)."""


class ModelMismatchError(ModelError):
    """The archive's LLM entries were made with a model other than the one given."""


class MemberNotFoundError(LlmarcError, KeyError):
    """A member name asked for is not in the archive."""

    def __str__(self) -> str:  # KeyError quotes its argument; we want the plain message
        return str(self.args[0]) if self.args else "member not found"


class DestinationExistsError(LlmarcError):
    """Extraction would replace an existing path and overwriting was not allowed."""


class SourceError(LlmarcError):
    """The source of ``pack`` cannot be archived as asked (missing, not a directory,
    names that would collide in the archive, an invalid option)."""
