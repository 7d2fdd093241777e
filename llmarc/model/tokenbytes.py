"""Token id -> exact bytes table, built from a model's tokenizer *data* (spec/model.md §5).

Why a table: the decoder must turn token ids back into the entry's bytes *without* a
tokenizer (tokenizers normalise, strip, add prefix spaces, and differ between versions).
So the encoder and the decoder agree on one context-free table ``table[id] -> bytes``
(``None`` for ids that never stand for bytes: control, special, unknown, added tokens and
holes in the id range). Decoding is plain concatenation; the table is hashed into the
model fingerprint (:func:`table_digest`), so building it must be deterministic, and it is
built from the files' data by the spec's rules, never from a library's object:

* :func:`table_from_tokenizer_json`: a ``tokenizer.json`` object, byte-level BPE (a
  ``ByteLevel`` component: each string mapped back through GPT-2's 256-character byte
  alphabet) or SentencePiece-style (``Metaspace``/``ByteFallback``/``Replace('▁')`` or
  ``byte_fallback``: ``<0xNN>`` pieces are bytes, ``▁`` is a space); added tokens absent;
* :func:`table_from_pieces`: the pieces of a ``tokenizer.model`` (:mod:`sp_proto`);
* :func:`table_from_gguf`: a GGUF file's token list and types.

:func:`build_token_bytes`, :func:`detect_kind` and :func:`byte_fallback_ids` take the
encoder's tokenizer *objects* (``tokenizers.Tokenizer``, a SentencePiece processor, an HF
wrapper) and read the same data out of them: the encoder side only.  Context-dependent
decoder steps (``Strip`` of the first space, ``add_prefix_space``) are deliberately
ignored: the table is per token, and :mod:`llmarc.model.tokenize` repairs the places where
the tokenizer's output does not concatenate to the input.
"""

from __future__ import annotations

import hashlib
import json
import re
import struct
from collections.abc import Collection, Iterable, Sequence
from functools import lru_cache
from typing import Any, Literal

from llmarc.errors import CorruptArchiveError, ModelError
from llmarc.model import sp_proto
from llmarc.model.sp_proto import Piece, read_pieces

TokenTable = list[bytes | None]
TokenizerKind = Literal["byte_level", "sentencepiece", "sentencepiece_hf"]

SP_SPACE = "\u2581"  # "▁", SentencePiece's visible space
BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
_DIGEST_MAGIC = b"llmarc-token-bytes-v1\x00"
_NONE_LEN = 0xFFFFFFFF


@lru_cache(maxsize=1)
def byte_level_decoder() -> dict[str, int]:
    """The inverse of GPT-2's ``bytes_to_unicode``: printable stand-in character -> byte.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes are mapped, in byte
    order, to U+0100 onwards. Reimplemented here (not imported from transformers) because
    the table must not change if a library reorganises its internals.
    """
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    chars = list(keep)
    extra = 0
    for b in range(256):
        if b not in keep:
            keep.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(keep, chars, strict=True)}


def _is_sentencepiece_processor(obj: object) -> bool:
    try:
        import sentencepiece
    except ImportError:  # pragma: no cover - sentencepiece is an llm extra
        return False
    return isinstance(obj, sentencepiece.SentencePieceProcessor)


def hf_backend(tokenizer: object) -> Any | None:
    """The ``tokenizers.Tokenizer`` behind an HF fast tokenizer (or the object itself)."""
    try:
        import tokenizers
    except ImportError:  # pragma: no cover
        return None
    if isinstance(tokenizer, tokenizers.Tokenizer):
        return tokenizer
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if isinstance(backend, tokenizers.Tokenizer):
        return backend
    return None


def sp_processor(tokenizer: object) -> Any | None:
    """The ``SentencePieceProcessor`` of a raw processor or of an HF slow tokenizer."""
    if _is_sentencepiece_processor(tokenizer):
        return tokenizer
    inner = getattr(tokenizer, "sp_model", None)
    if inner is not None and _is_sentencepiece_processor(inner):
        return inner
    return None


def _walk_types(node: Any) -> Iterable[dict[str, Any]]:
    """Every component dict of a (possibly nested ``Sequence``) tokenizer.json section."""
    if isinstance(node, dict):
        yield node
        for key in ("pretokenizers", "decoders", "normalizers", "processors"):
            for child in node.get(key) or ():
                yield from _walk_types(child)


def _hf_json_kind(spec: dict[str, Any]) -> TokenizerKind:
    parts = [*_walk_types(spec.get("pre_tokenizer")), *_walk_types(spec.get("decoder"))]
    if any(p.get("type") == "ByteLevel" for p in parts):
        return "byte_level"
    parts += list(_walk_types(spec.get("normalizer")))
    for p in parts:
        if p.get("type") in ("Metaspace", "ByteFallback"):
            return "sentencepiece_hf"
        if p.get("type") == "Replace" and SP_SPACE in json.dumps(p, ensure_ascii=False):
            return "sentencepiece_hf"
    if (spec.get("model") or {}).get("byte_fallback"):
        return "sentencepiece_hf"
    raise ModelError(
        "unsupported tokenizer: neither byte-level BPE nor SentencePiece-style "
        f"(model {spec.get('model', {}).get('type')!r}); its tokens have no exact bytes"
    )


def detect_kind(tokenizer: object) -> TokenizerKind:
    """Classify ``tokenizer`` (HF fast/slow, ``tokenizers.Tokenizer`` or SP processor).

    HF fast tokenizers are classified from their backend JSON: a ``ByteLevel`` component in
    the pre-tokenizer or decoder means byte-level BPE; ``Metaspace``, ``ByteFallback``, a
    ``Replace`` involving ``▁`` or ``model.byte_fallback`` means SentencePiece-style.
    Anything else (WordPiece, plain word-level) raises :class:`ModelError`: such tokenizers
    drop spaces and cannot represent arbitrary bytes.
    """
    backend = hf_backend(tokenizer)
    if backend is not None:
        return _hf_json_kind(json.loads(backend.to_str()))
    if sp_processor(tokenizer) is not None:
        return "sentencepiece"
    raise ModelError(f"unsupported tokenizer object {type(tokenizer).__name__}")


def _sp_piece_bytes(piece: str) -> bytes:
    return piece.replace(SP_SPACE, " ").encode("utf-8")


def _without_empty(table: TokenTable) -> TokenTable:
    """Empty entries become absent: an empty token could be inserted anywhere."""
    return [None if b == b"" else b for b in table]


def table_from_pieces(pieces: Sequence[Piece]) -> TokenTable:
    """The table of a SentencePiece model's pieces (``tokenizer.model``, spec/model.md §5.2):
    control and unknown pieces absent, byte pieces their byte, every other piece its
    text with ``▁`` as a space."""
    table: TokenTable = []
    for i, piece in enumerate(pieces):
        if piece.type in (sp_proto.CONTROL, sp_proto.UNKNOWN):
            table.append(None)
        elif piece.type == sp_proto.BYTE:
            m = BYTE_PIECE.fullmatch(piece.text)
            if m is None:
                raise ModelError(f"byte piece {i} is spelled {piece.text!r}, not <0xNN>")
            table.append(bytes([int(m.group(1), 16)]))
        else:
            table.append(_sp_piece_bytes(piece.text))
    return _without_empty(table)


def _hf_vocab(spec: dict[str, Any]) -> dict[int, str]:
    """id -> token string of the model vocabulary (without added tokens)."""
    model = spec.get("model")
    vocab = model.get("vocab") if isinstance(model, dict) else None
    if isinstance(vocab, dict):
        return {int(i): tok for tok, i in vocab.items()}
    if isinstance(vocab, list):  # Unigram: [[piece, score], ...], id = position
        return {i: entry[0] for i, entry in enumerate(vocab)}
    raise ModelError("tokenizer.json has no readable model vocabulary")


def table_from_tokenizer_json(spec: dict[str, Any]) -> TokenTable:
    """The table of a ``tokenizer.json`` object (spec/model.md §5.1)."""
    kind = _hf_json_kind(spec)
    vocab = _hf_vocab(spec)
    added = {int(t["id"]) for t in spec.get("added_tokens") or ()}
    if any(i < 0 for i in (*vocab, *added)):
        raise ModelError("tokenizer.json has a negative token id")
    table: TokenTable = [None] * (max([*vocab, *added, -1]) + 1)
    if kind == "byte_level":
        dec = byte_level_decoder()
        for i, tok in vocab.items():
            try:
                table[i] = bytes(dec[c] for c in tok)
            except KeyError:  # a character outside the byte alphabet: no exact bytes
                table[i] = None
    else:
        model = spec["model"]
        byte_fallback = bool(model.get("byte_fallback"))
        unk: set[int] = set()
        if isinstance(model.get("unk_id"), int):
            unk.add(model["unk_id"])
        if isinstance(model.get("unk_token"), str):
            unk.update(i for i, t in vocab.items() if t == model["unk_token"])
        for i, tok in vocab.items():
            if i in unk:
                continue
            m = BYTE_PIECE.fullmatch(tok) if byte_fallback else None
            table[i] = bytes([int(m.group(1), 16)]) if m else _sp_piece_bytes(tok)
    for i in added:  # special/added tokens are never literal text for us
        table[i] = None
    return _without_empty(table)


def table_from_gguf(model: str, tokens: Sequence[str], types: Sequence[int]) -> TokenTable:
    """The table of a GGUF file's token list (spec/model.md §5.3).

    GGUF's token types number as SentencePiece's (1 normal ... 6 byte).
    ``gpt2`` (byte-level BPE): normal tokens through the byte alphabet, every other type
    absent (they are what a tokenizer.json lists as added tokens).  ``llama``
    (SentencePiece): as :func:`table_from_pieces`, with the GGUF type numbers."""
    if len(types) != len(tokens):
        raise ModelError(f"GGUF has {len(tokens)} tokens but {len(types)} token types")
    if model == "gpt2":
        dec = byte_level_decoder()
        table: TokenTable = []
        for token, kind in zip(tokens, types, strict=True):
            try:
                table.append(bytes(dec[c] for c in token) if kind == sp_proto.NORMAL else None)
            except KeyError:
                table.append(None)
        return _without_empty(table)
    if model == "llama":
        return table_from_pieces([Piece(t, k) for t, k in zip(tokens, types, strict=True)])
    raise ModelError(f"GGUF tokenizer model {model!r} is not supported (gpt2 or llama): "
                     "its tokens have no exact bytes")


def build_token_bytes(tokenizer: object) -> TokenTable:
    """The table of a tokenizer object (``tokenizers.Tokenizer``, an HF fast tokenizer, or
    a SentencePiece processor), by the same rules as the files it was read from."""
    backend = hf_backend(tokenizer)
    if backend is not None:
        return table_from_tokenizer_json(json.loads(backend.to_str()))
    sp = sp_processor(tokenizer)
    if sp is not None:
        return table_from_pieces(read_pieces(sp.serialized_model_proto(), "SentencePiece"))
    raise ModelError(f"unsupported tokenizer object {type(tokenizer).__name__}")


def byte_fallback_ids(tokenizer: object, table: Sequence[bytes | None]) -> frozenset[int]:
    """Ids of ``<0xNN>`` byte-fallback pieces (empty for byte-level BPE)."""
    sp = sp_processor(tokenizer)
    if sp is not None:
        return frozenset(i for i in range(sp.get_piece_size()) if sp.is_byte(i))
    backend = hf_backend(tokenizer)
    if backend is None or detect_kind(tokenizer) != "sentencepiece_hf":
        return frozenset()
    vocab = backend.get_vocab(with_added_tokens=False)
    return frozenset(
        i
        for tok, i in vocab.items()
        if BYTE_PIECE.fullmatch(tok)
        and i < len(table)
        and table[i] is not None
        and len(table[i]) == 1  # type: ignore[arg-type]
    )


def single_byte_tokens(
    table: Sequence[bytes | None], prefer: Collection[int] = ()
) -> list[int | None]:
    """For each byte value 0..255, a token id whose bytes are exactly that byte, or ``None``.

    Deterministic: among the candidates, the lowest id in ``prefer`` wins (pass the
    byte-fallback ids from :func:`byte_fallback_ids` to prefer ``<0xNN>`` pieces), else the
    lowest id overall.
    """
    best: list[int | None] = [None] * 256
    preferred: list[bool] = [False] * 256
    prefer_set = frozenset(prefer)
    for i, b in enumerate(table):
        if b is None or len(b) != 1:
            continue
        v = b[0]
        p = i in prefer_set
        if best[v] is None or (p and not preferred[v]):
            best[v] = i
            preferred[v] = p
    return best


def table_digest(table: Sequence[bytes | None]) -> bytes:
    """SHA-256 of the table's canonical serialisation (fed to the model fingerprint).

    Serialisation: the ASCII magic ``b"llmarc-token-bytes-v1\\0"``, the entry count as u32
    little-endian, then for each id in order a u32 little-endian length followed by that
    many bytes, or the length ``0xFFFFFFFF`` and nothing for ``None``. Trailing ``None``
    padding is part of the hash (the logits dimension matters to the decoder too).
    """
    h = hashlib.sha256(_DIGEST_MAGIC)
    h.update(struct.pack("<I", len(table)))
    for b in table:
        if b is None:
            h.update(struct.pack("<I", _NONE_LEN))
        else:
            h.update(struct.pack("<I", len(b)))
            h.update(b)
    return h.digest()


def tokens_to_bytes(table: Sequence[bytes | None], ids: Iterable[int]) -> bytes:
    """Decode token ids with the table alone (what the archive reader does).

    An id outside the table or one without bytes can only come from a damaged archive
    (or the wrong model), so it raises :class:`CorruptArchiveError`.
    """
    seq = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    n = len(table)
    try:
        parts = [table[i] if 0 <= i < n else None for i in seq]
        return b"".join(parts)  # type: ignore[arg-type]
    except TypeError:
        pass
    for pos, i in enumerate(seq):
        if not isinstance(i, int) or not 0 <= i < n:
            raise CorruptArchiveError(
                f"token id {i!r} at position {pos} is out of range 0..{n - 1}"
            )
        if table[i] is None:
            raise CorruptArchiveError(f"token id {i} at position {pos} stands for no bytes")
    raise CorruptArchiveError("token ids could not be decoded")  # pragma: no cover
