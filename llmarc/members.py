"""Choosing members the way archive users type them: as ``list`` prints them, as globs,
and with ``--exclude``.

Conventions (tar and unzip agree): ``*``, ``?`` and ``[...]`` are fnmatch patterns,
matched case-sensitively, and ``*`` also matches ``/`` (tar's ``--wildcards`` default,
unzip's default) so ``'src/*.py'`` selects Python files at any depth below ``src``. A
name that is a member exactly is taken literally even if it holds ``*``.

A name is accepted as ``list`` prints it or as a shell completes it: ``./`` prefixes, a
trailing ``/``, repeated slashes and a leading ``/`` are ignored (tar strips them too).

``--exclude`` follows tar's default (unanchored) matching, which 7z's ``-x!`` shares for
names without a path: a pattern excludes a member when it matches the member's name or
any part of it that starts after a ``/`` (``*.o``, ``build``, ``docs/*.tmp``); excluding
a directory excludes everything below it. zip's ``-x`` matches whole paths only, which
the same rule covers with ``*`` crossing ``/``.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from fnmatch import fnmatchcase

GLOB_CHARS = frozenset("*?[")


def normalize(name: str) -> str:
    """``name`` as the archive stores it: no ``.`` or empty components."""
    return "/".join(part for part in name.split("/") if part not in ("", "."))


def is_pattern(name: str) -> bool:
    """Whether ``name`` holds a glob character (``*``, ``?``, ``[``)."""
    return not GLOB_CHARS.isdisjoint(name)


def excluded(name: str, patterns: Sequence[str], *, ancestors: bool = True) -> bool:
    """Whether member ``name`` falls under one of the ``--exclude`` ``patterns``.

    ``ancestors=False`` checks only the name itself (and its trailing parts): a packer
    that never descends into an excluded directory has checked the ancestors already."""
    if not patterns:
        return False
    parts = name.split("/")
    ends = range(1, len(parts) + 1) if ancestors else (len(parts),)
    for pattern in patterns:
        pattern = normalize(pattern)
        for end in ends:
            for start in range(end):
                if fnmatchcase("/".join(parts[start:end]), pattern):
                    return True
    return False


def matching(names: Collection[str], request: str) -> list[str]:
    """The names a request selects: itself if it is a name, else every name its glob
    matches (empty when nothing matches). ``names``: a set or dict for fast lookup."""
    wanted = normalize(request)
    if wanted in names:
        return [wanted]
    if is_pattern(wanted):
        return [n for n in names if fnmatchcase(n, wanted)]
    return []
