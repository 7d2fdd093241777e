"""The pieces of a SentencePiece ``tokenizer.model`` (spec/model.md §2.4), read by llmarc.

A decoder needs only each piece's text and type to build the token table, and must not
depend on the ``sentencepiece`` library (or protobuf) being installed or keeping its
behaviour: ``tokenizer.model`` is a protocol-buffer ``ModelProto`` whose field 1 repeats
``SentencePiece { string piece = 1; float score = 2; Type type = 3; }``, a few lines to
read.  The encoder still tokenizes with the library (that choice changes only ratio).
"""

from __future__ import annotations

from dataclasses import dataclass

from llmarc.model.cursor import Cursor

# SentencePiece.Type
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_VARINT, _FIXED64, _LENGTH, _FIXED32 = 0, 1, 2, 5


@dataclass(frozen=True)
class Piece:
    text: str
    type: int


def _fields(cursor: Cursor, end: int) -> list[tuple[int, int, int | memoryview]]:
    """(field number, wire type, value) of one message; skips nothing it cannot bound."""
    out: list[tuple[int, int, int | memoryview]] = []
    while cursor.position < end:
        key = cursor.varint()
        number, wire = key >> 3, key & 7
        value: int | memoryview
        if wire == _VARINT:
            value = cursor.varint()
        elif wire == _FIXED64:
            value = int.from_bytes(cursor.take(8), "little")
        elif wire == _LENGTH:
            value = cursor.take(cursor.varint())
        elif wire == _FIXED32:
            value = int.from_bytes(cursor.take(4), "little")
        else:
            raise cursor.fail(f"protobuf wire type {wire} is not supported")
        out.append((number, wire, value))
    if cursor.position != end:
        raise cursor.fail("a protobuf field runs past its message")
    return out


def read_pieces(data: bytes, what: str) -> list[Piece]:
    """Every piece of a serialized ``ModelProto``, in id order (id = position)."""
    cursor = Cursor(data, what)
    pieces: list[Piece] = []
    for number, wire, value in _fields(cursor, len(data)):
        if number != 1 or wire != _LENGTH:
            continue
        assert isinstance(value, memoryview)
        inner = Cursor(value, what)
        text, kind = "", NORMAL
        for field, field_wire, field_value in _fields(inner, len(value)):
            if field == 1 and field_wire == _LENGTH:
                try:
                    text = str(field_value, "utf-8")  # type: ignore[arg-type]
                except UnicodeDecodeError as exc:
                    raise inner.fail(f"piece {len(pieces)} is not UTF-8") from exc
            elif field == 3 and field_wire == _VARINT:
                kind = int(field_value)  # type: ignore[arg-type]
        pieces.append(Piece(text, kind))
    if not pieces:
        raise cursor.fail("no pieces: not a SentencePiece model")
    return pieces
