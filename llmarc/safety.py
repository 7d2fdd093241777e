"""Member-name validation and safe extraction primitives.

Every archive is hostile. Names are checked once, when the archive is opened
(``validate_name`` + ``check_names``); writing goes through directory file descriptors
opened with ``O_NOFOLLOW`` one component at a time, so a symlink planted in the
destination (or created by a racing process) is never followed, and every file is written
to a temporary name, verified, and only then given its final name.
"""

from __future__ import annotations

import bisect
import contextlib
import errno
import hashlib
import os
import re
import secrets
import stat
import unicodedata
from collections.abc import Iterable

from .container.layout import digest_matches
from .errors import ChecksumMismatchError, DestinationExistsError, UnsafeArchiveError

MAX_NAME_BYTES = 4096
MAX_COMPONENT_BYTES = 255

_DRIVE = re.compile(r"^[A-Za-z]:")
_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


#: One character a name may not hold (§8): C0 and C1 controls, DEL, a backslash, and a
#: lone surrogate (which a str from Python's decoders can carry). Searched by the regex
#: engine in C: a loop over the characters in Python took seconds for the 256 MiB of
#: names a compact table may hold.
_BAD_CHAR = re.compile(r"[\x00-\x1f\x7f-\x9f\\\ud800-\udfff]")


def validate_name(name: str) -> tuple[str, ...]:
    """Check one member name; return its components. Raises UnsafeArchiveError.

    Linear in the name's length, with no per-character Python work: C-level searches,
    one split, and the name escaped for a message only when it is refused."""
    if not name:
        raise UnsafeArchiveError("member with an empty name")
    if len(name) > MAX_NAME_BYTES // 4 and (
            len(name) > MAX_NAME_BYTES
            or len(name.encode("utf-8", "surrogatepass")) > MAX_NAME_BYTES):
        raise UnsafeArchiveError(f"member name is longer than {MAX_NAME_BYTES} bytes")
    bad = _BAD_CHAR.search(name)
    if bad is not None:
        kind = ("a backslash" if bad.group() == "\\"
                else "a lone surrogate" if "\ud800" <= bad.group() <= "\udfff"
                else "a control character")
        raise UnsafeArchiveError(f"member name {_shown(name)!r} contains {kind}")
    if name.startswith("/"):
        raise UnsafeArchiveError(f"member name {_shown(name)!r} is an absolute path")
    if _DRIVE.match(name):
        raise UnsafeArchiveError(f"member name {_shown(name)!r} starts with a drive letter")
    parts = tuple(name.split("/"))
    for part in parts:
        if part in ("", ".", ".."):
            kind = {"": "an empty", ".": "a '.'", "..": "a '..'"}[part]
            raise UnsafeArchiveError(f"member name {_shown(name)!r} has {kind} component")
        if len(part) > MAX_COMPONENT_BYTES // 4 and len(part.encode("utf-8")) > \
                MAX_COMPONENT_BYTES:
            raise UnsafeArchiveError(
                f"member name {_shown(name)!r} has a component longer than "
                f"{MAX_COMPONENT_BYTES} bytes")
    return parts


def _shown(name: str) -> str:
    """A refused name as a message shows it: every non-printable character escaped."""
    return name.encode("unicode_escape").decode("ascii")


def fold(name: str) -> str:
    """The key under which two names collide on a case-insensitive, normalizing file system."""
    return unicodedata.normalize("NFC", unicodedata.normalize("NFC", name).casefold())


def check_names(entries: Iterable[tuple[str, bool]]) -> None:
    """Validate all (name, is_dir) pairs together: no duplicates and no entry inside a
    path that another entry makes a regular file. Case and NFC/NFD twins (``README``
    beside ``readme``) are legal on Linux and allowed here; extraction refuses them only
    onto a file system that folds them (``folding_twins``)."""
    seen: set[str] = set()
    items: list[tuple[str, bool]] = []
    for name, is_dir in entries:
        validate_name(name)
        if name in seen:
            raise UnsafeArchiveError(f"member {name!r} appears twice")
        seen.add(name)
        items.append((name, is_dir))
    below = member_below_file(items)
    if below is not None:
        raise UnsafeArchiveError(
            f"member {below[0]!r} lies inside {below[1]!r}, which is a regular file")


def member_below_file(items: list[tuple[str, bool]]) -> tuple[str, str] | None:
    """(member, file) for some member lying below a regular-file member, else None.

    Names must be distinct. The names below ``f`` are those starting with ``f/``, a
    contiguous run of the sorted names that starts where ``f/`` would be inserted: one
    sort and one binary search per file, comparisons in C, no copy of the names (only
    a list of references; a sort key of every name doubled the memory of 256 MiB of
    names). Checking each name's every prefix against a set instead costs
    O(depth^2) per name: 600-deep names made every command hang on a 2.5 MB index."""
    names = sorted(name for name, _is_dir in items)
    for name, is_dir in items:
        if is_dir:
            continue
        prefix = name + "/"
        at = bisect.bisect_left(names, prefix)
        if at < len(names) and names[at].startswith(prefix):
            return names[at], name
    return None


def _escaped(name: str) -> str:
    """Quoted, with non-ASCII escaped, so NFC and NFD twins print differently."""
    return "'" + name.encode("ascii", "backslashreplace").decode("ascii") + "'"


def folding_twins(names: Iterable[str]) -> list[tuple[str, str]]:
    """Pairs of distinct names (or implied parent paths) that are one path on a file
    system folding case and Unicode normalization.

    Linear in the total name length: two tries, one of exact paths and one of folded
    paths, keyed by (parent node, component), so each distinct path costs one fold of
    its last component (folding is per component: ``/`` is unchanged by case folding
    and composes with nothing under NFC). Folding every prefix as a whole string took
    14 s for 2,000 names 600 components deep."""
    names = list(names)
    exact: dict[tuple[int, str], int] = {}  # (exact parent, component) -> exact node
    folded: dict[tuple[int, str], tuple[int, int, int]] = {}  # -> (node, name, end)
    fold_of = [0]  # exact node -> folded node (0: the root in both)
    pairs: dict[tuple[str, str], None] = {}
    cache: dict[str, str] = {}  # component -> folded (ASCII folds to lower())
    for which, name in enumerate(names):
        node, end = 0, -1
        for comp in name.split("/"):
            end += len(comp) + 1  # name[:end] is the path up to this component
            child = exact.get((node, comp))
            if child is None:
                child = exact[(node, comp)] = len(fold_of)
                folded_comp = cache.get(comp)
                if folded_comp is None:
                    folded_comp = cache[comp] = comp.lower() if comp.isascii() else fold(comp)
                key = (fold_of[node], folded_comp)
                seen = folded.get(key)
                if seen is None:
                    folded[key] = seen = (len(folded) + 1, which, end)
                else:
                    pairs[(names[seen[1]][:seen[2]], name[:end])] = None
                fold_of.append(seen[0])
            node = child
    return list(pairs)


def check_folding(root_fd: int, names: list[str]) -> None:
    """Refuse (naming both) twins that the destination's file system would merge."""
    pairs = folding_twins(names)
    if pairs and dest_folds(root_fd):
        shown = "; ".join(f"{_escaped(a)} and {_escaped(b)}" for a, b in pairs[:5])
        more = f" (and {len(pairs) - 5} more pairs)" if len(pairs) > 5 else ""
        raise UnsafeArchiveError(
            f"the destination's file system does not tell apart {shown}{more}: extracting "
            "them would merge them; extract them separately or onto a case-sensitive file "
            "system")


def dest_folds(root_fd: int) -> bool:
    """Whether the file system at ``root_fd`` folds case or Unicode normalization
    (probed with a temporary file, since it can differ per mount)."""
    probe = f".llmarc-probe-{secrets.token_hex(4)}-\u00e9a"
    fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600,
                 dir_fd=root_fd)
    os.close(fd)
    try:
        for twin in (probe.upper(), unicodedata.normalize("NFD", probe)):
            try:
                os.stat(twin, dir_fd=root_fd, follow_symlinks=False)
                return True
            except FileNotFoundError:
                continue
        return False
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(probe, dir_fd=root_fd)


# ---------------------------------------------------------------- extraction primitives


def open_root(dest: str | os.PathLike[str]) -> int:
    """Create (if needed) and open the destination directory; return its fd."""
    os.makedirs(dest, exist_ok=True)
    return os.open(dest, os.O_RDONLY | os.O_DIRECTORY | getattr(os, "O_CLOEXEC", 0))


def _open_dir_at(parent_fd: int, comp: str, shown: str) -> int:
    try:
        return os.open(comp, _O_DIR, dir_fd=parent_fd)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR, errno.EMLINK):
            st = os.stat(comp, dir_fd=parent_fd, follow_symlinks=False)
            if stat.S_ISLNK(st.st_mode):
                raise UnsafeArchiveError(
                    f"refusing to write through the symbolic link {shown!r}") from None
            raise DestinationExistsError(
                f"{shown!r} exists and is not a directory") from None
        raise


def open_dirs(root_fd: int, parts: tuple[str, ...], create: bool = True) -> int:
    """Open the directory ``parts`` below ``root_fd`` without following any symlink,
    creating missing directories with default permissions (archived directories get their
    final mode later). Returns an fd the caller must close."""
    fd = os.dup(root_fd)
    try:
        for i, comp in enumerate(parts):
            shown = "/".join(parts[:i + 1])
            if create:
                with contextlib.suppress(FileExistsError):
                    os.mkdir(comp, 0o777, dir_fd=fd)  # umask applies
            new = _open_dir_at(fd, comp, shown)
            os.close(fd)
            fd = new
        return fd
    except BaseException:
        os.close(fd)
        raise


class ParentDirs:
    """``open_dirs`` that keeps the last directory open.

    Members arrive grouped by directory, so consecutive lookups of one parent reuse its
    descriptor instead of walking every component again: 2,000 files 600 directories
    deep took 23 s to extract when each file re-opened its 600 parents (twice). The kept
    descriptor is still the directory that was opened without following symlinks."""

    def __init__(self, root_fd: int, create: bool = True) -> None:
        self.root_fd = root_fd
        self.create = create
        self._parts: tuple[str, ...] | None = None
        self._missing: tuple[str, ...] | None = None  # last directory found missing
        self._fd = -1

    def open(self, parts: tuple[str, ...]) -> int:
        """The fd of directory ``parts`` below the root; owned by this object (do not
        close it)."""
        if parts != self._parts:
            if parts == self._missing:  # nothing is created while create=False
                raise FileNotFoundError(errno.ENOENT, "no such directory", "/".join(parts))
            try:
                fd = open_dirs(self.root_fd, parts, self.create)
            except FileNotFoundError:
                self._missing = parts
                raise
            self.close()
            self._parts, self._fd = parts, fd
        return self._fd

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
        self._parts, self._fd = None, -1

    def __enter__(self) -> ParentDirs:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def lexists_at(root_fd: int, parts: tuple[str, ...],
               parents: ParentDirs | None = None) -> os.stat_result | None:
    """lstat of ``parts`` below ``root_fd``, walking parents without following symlinks;
    None if it (or a parent) does not exist. A symlinked parent counts as existing."""
    try:
        fd = (parents.open(parts[:-1]) if parents is not None
              else open_dirs(root_fd, parts[:-1], create=False))
    except FileNotFoundError:
        return None
    except (UnsafeArchiveError, DestinationExistsError):
        return os.stat(parts[0], dir_fd=root_fd, follow_symlinks=False)
    try:
        return os.stat(parts[-1], dir_fd=fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    finally:
        if parents is None:
            os.close(fd)


def make_dir(parent_fd: int, leaf: str, shown: str) -> None:
    """Create directory ``leaf`` (an existing real directory is fine)."""
    try:
        os.mkdir(leaf, 0o700, dir_fd=parent_fd)
    except FileExistsError:
        os.close(_open_dir_at(parent_fd, leaf, shown))


def finish_dir(parent_fd: int, leaf: str, shown: str, mode: int, mtime_ns: int) -> None:
    fd = _open_dir_at(parent_fd, leaf, shown)
    try:
        os.fchmod(fd, mode & 0o777)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
    finally:
        os.close(fd)


#: Bytes of the final name kept in a temporary name: 1 + 200 + 1 + 8 + 11 = 221 <= 255.
TMP_STEM_BYTES = 200


def temporary_name(leaf: str) -> str:
    """A fresh temporary name next to ``leaf``, at most 221 bytes long.

    Cut by UTF-8 bytes, never by characters: 200 characters of a non-ASCII name can be
    800 bytes, over the 255-byte limit of common file systems, so a valid archive with a
    long non-ASCII component could not be extracted. A character split by the cut is
    dropped whole."""
    stem = leaf.encode("utf-8")[:TMP_STEM_BYTES].decode("utf-8", "ignore")
    return f".{stem}.{secrets.token_hex(4)}.llmarc-tmp"


def extracted_mode(mode: int, keep: bool = False) -> int:
    """The permission bits an extracted member gets (spec/format.md §11).

    By default the stored bits with group and other write cleared (``mode & 0o755``), as
    tar's ``data`` filter (PEP 706) does, so an archive cannot plant world- or
    group-writable files and directories; read-only and execute bits stay as packed.
    ``keep`` applies the stored bits as they are (like ``tar --preserve-permissions``).
    Format 1.0 stores only the nine permission bits, so setuid, setgid and sticky never
    come from an archive either way."""
    return mode & (0o777 if keep else 0o755)


def write_file(parent_fd: int, leaf: str, shown: str, chunks: Iterable[bytes],
               sha256: bytes | None,
               mode: int, mtime_ns: int, overwrite: bool) -> None:
    """Write ``chunks`` to a temporary file next to ``leaf``, check its SHA-256, set mode
    and mtime, then give it its final name (never replacing a directory, and never
    replacing anything at all unless ``overwrite``)."""
    try:
        st = os.stat(leaf, dir_fd=parent_fd, follow_symlinks=False)
    except FileNotFoundError:
        st = None
    if st is not None:
        if stat.S_ISDIR(st.st_mode):
            raise DestinationExistsError(f"{shown!r} exists and is a directory")
        if not overwrite:
            raise DestinationExistsError(f"{shown!r} already exists (use --overwrite to replace "
                                         "it)")
    tmp = temporary_name(leaf)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                 | getattr(os, "O_CLOEXEC", 0), 0o600, dir_fd=parent_fd)
    placed = False
    try:
        h = hashlib.sha256()
        try:
            with os.fdopen(fd, "wb", closefd=False) as f:
                for chunk in chunks:
                    h.update(chunk)
                    f.write(chunk)
        except OSError as exc:  # a full disk: say which file could not be written
            if exc.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                raise
            raise OSError(exc.errno, f"cannot write {shown!r}: {exc.strerror}") from None
        # None: ``chunks`` checks itself
        if sha256 is not None and not digest_matches(h.digest(), sha256):
            raise ChecksumMismatchError(f"member {shown!r}: SHA-256 of the decoded data "
                                        "does not match the archive")
        os.fchmod(fd, mode & 0o777)
        os.utime(fd, ns=(mtime_ns, mtime_ns))
        if overwrite and st is not None:
            # replacing a file: make the new bytes durable first, so a power cut cannot
            # leave neither the old file nor the new one (a new name risks nothing)
            os.fsync(fd)
        os.close(fd)
        fd = -1
        if overwrite:
            os.rename(tmp, leaf, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
        else:
            try:  # link(2) never replaces an existing name: no clobbering even under races
                os.link(tmp, leaf, src_dir_fd=parent_fd, dst_dir_fd=parent_fd,
                        follow_symlinks=False)
            except FileExistsError:
                raise DestinationExistsError(f"{shown!r} already exists") from None
            except OSError:
                os.rename(tmp, leaf, src_dir_fd=parent_fd, dst_dir_fd=parent_fd)
                placed = True
        placed = placed or overwrite
    finally:
        if fd >= 0:
            os.close(fd)
        if not placed:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp, dir_fd=parent_fd)
