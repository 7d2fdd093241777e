"""Text from archives, made safe to print on a terminal.

Member names, creator strings, model names and error messages quoting them come from a
hostile archive. Printed raw, an ESC or OSC sequence (``\\x1b]0;title\\x07``) restyles or
rewrites the user's terminal, a C1 control (U+009B) acts as CSI on some terminals, a
bidi override (U+202E) reorders what the user reads, a newline forges extra output lines,
and a lone surrogate makes ``print`` raise. Through rich, ``[red]`` is markup and ``[/x]``
raises. So llmarc never hands archive text to rich's markup, and every character that is
not printable (``str.isprintable``: controls, format characters such as bidi overrides,
line/paragraph separators, surrogates, unassigned code points) is shown as an escape.
"""

from __future__ import annotations


def _escape(ch: str) -> str:
    o = ord(ch)
    if o < 0x100:
        return f"\\x{o:02x}"
    if o < 0x10000:
        return f"\\u{o:04x}"
    return f"\\U{o:08x}"


def visible(text: str) -> str:
    """``text`` with every non-printable character written as ``\\xNN``, ``\\uNNNN`` or
    ``\\UNNNNNNNN`` (as Python's ``repr`` does), so what reaches the terminal is plain
    printable text. Printable text, including non-ASCII letters, is unchanged."""
    if text.isprintable():
        return text
    return "".join(ch if ch.isprintable() else _escape(ch) for ch in text)


def _json_escape(ch: str) -> str:
    if ch.isprintable():
        return ch
    o = ord(ch)
    if o < 0x10000:
        return f"\\u{o:04x}"
    o -= 0x10000
    return f"\\u{0xD800 + (o >> 10):04x}\\u{0xDC00 + (o & 0x3FF):04x}"


def json_visible(text: str) -> str:
    """JSON text (as ``json.dumps(..., ensure_ascii=False)`` writes it) with every
    non-printable character except the newlines of indentation written as a ``\\uNNNN``
    escape: still the same JSON value, since such characters can only occur inside
    strings, but nothing in it can act on a terminal. Lines that are printable already
    (nearly all) are checked at C speed and kept as they are."""
    return "\n".join(line if line.isprintable() else "".join(map(_json_escape, line))
                     for line in text.split("\n"))
