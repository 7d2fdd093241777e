"""The one canonical JSON form of llmarc, and a parser that treats the text as hostile.

Archives carry JSON (the numerics profile of each model record, spec/format.md §4.1).
``json.loads`` alone accepts ``NaN``, ``Infinity`` and ``1e400`` (which becomes inf),
recurses once per nesting level (thousands of ``[`` raise RecursionError), and turns a
4,301-digit integer into a ValueError; any of those would escape as a traceback from
every command that opens the archive. :func:`parse_profile_json` bounds the size and the
depth *before* parsing, rejects non-finite numbers and out-of-range integers while
parsing, requires an object, and (by default) the canonical form, raising only
CorruptArchiveError.
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, NoReturn

from ..errors import CorruptArchiveError

#: Largest JSON text accepted (the profile limit of spec/format.md §9).
MAX_JSON_BYTES = 65536
#: Deepest nesting of arrays/objects accepted (the top-level object counts as 1).
MAX_JSON_DEPTH = 32
#: Integers must fit a signed 64-bit value.
_INT_MIN, _INT_MAX = -(2**63), 2**63 - 1

_STRING = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)


def canonical_json(value: Any) -> str:
    """The one canonical JSON text of ``value`` (spec/format.md §4.1): keys sorted by code
    point, separators ``,`` and ``:`` without spaces, every non-ASCII character written as
    a ``\\uXXXX`` escape (lowercase hex; surrogate pairs above U+FFFF), no NaN/Infinity.

    This is byte for byte the form the model fingerprint hashes (spec/llm-codec.md §2.1),
    so the archive has one canonical form, not two."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False)


def _nesting_depth(text: str) -> int:
    """The deepest nesting of ``[``/``{`` outside strings, in one linear pass."""
    depth = deepest = 0
    for ch in _STRING.sub("", text):
        if ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
        elif ch in "]}":
            depth -= 1
    return deepest


def _scalar_strings(value: Any) -> bool:
    """True if every string (key or value) in ``value`` is Unicode text without lone
    surrogates (a ``\\ud800`` escape parses, but cannot be printed or encoded)."""
    todo = [value]
    while todo:  # iterative: the depth is bounded already, but no recursion is needed
        item = todo.pop()
        if isinstance(item, dict):
            todo.extend(item.keys())
            todo.extend(item.values())
        elif isinstance(item, list):
            todo.extend(item)
        elif isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                return False
    return True


def parse_profile_json(text: str | bytes, *, what: str = "numerics profile",
                       canonical: bool = True) -> dict[str, Any]:
    """Parse hostile JSON text that must be an object; raise CorruptArchiveError otherwise.

    Rejected: more than MAX_JSON_BYTES bytes, invalid UTF-8, nesting deeper than
    MAX_JSON_DEPTH, invalid JSON, ``NaN``/``Infinity``/``-Infinity``, a number that is not
    finite as a binary64 (``1e400``), an integer outside the signed 64-bit range, a
    duplicate key, a string with a lone surrogate, a top level that is not an object, and
    (with ``canonical``) any text
    that is not exactly ``canonical_json`` of what it parses to. ``what`` names the text
    in the error message."""
    if isinstance(text, bytes | bytearray):
        if len(text) > MAX_JSON_BYTES:
            raise CorruptArchiveError(f"{what} is over the limit of {MAX_JSON_BYTES} bytes")
        try:
            text = bytes(text).decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptArchiveError(f"{what} is not valid UTF-8") from None
    elif len(text) > MAX_JSON_BYTES or len(text.encode("utf-8", "surrogatepass")) > MAX_JSON_BYTES:
        raise CorruptArchiveError(f"{what} is over the limit of {MAX_JSON_BYTES} bytes")
    if _nesting_depth(text) > MAX_JSON_DEPTH:
        raise CorruptArchiveError(f"{what} is nested deeper than {MAX_JSON_DEPTH} levels")

    def bad(reason: str) -> NoReturn:
        raise CorruptArchiveError(f"{what} {reason}")

    def constant(name: str) -> NoReturn:
        bad(f"contains {name}, which is not a JSON number")

    def number(literal: str) -> float:
        value = float(literal)
        if not math.isfinite(value):
            bad("contains a number outside the binary64 range")
        return value

    def integer(literal: str) -> int:
        if len(literal.lstrip("-")) > 19:  # checked before int(): no quadratic conversion
            bad("contains an integer outside the signed 64-bit range")
        value = int(literal)
        if not _INT_MIN <= value <= _INT_MAX:
            bad("contains an integer outside the signed 64-bit range")
        return value

    def pairs(items: list[tuple[str, Any]]) -> dict[str, Any]:
        obj = dict(items)
        if len(obj) != len(items):
            bad("has a duplicate key")
        return obj

    try:
        obj = json.loads(text, parse_constant=constant, parse_float=number,
                         parse_int=integer, object_pairs_hook=pairs)
    except CorruptArchiveError:
        raise
    except (ValueError, RecursionError):  # JSONDecodeError is a ValueError
        bad("is not valid JSON")
    if not isinstance(obj, dict):
        bad("is not a JSON object")
    if not _scalar_strings(obj):
        bad("contains a lone surrogate escape (not Unicode text)")
    if canonical and canonical_json(obj) != text:
        bad("is not in canonical JSON form")
    return obj
