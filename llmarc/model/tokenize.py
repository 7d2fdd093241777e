"""Lossless tokenization of arbitrary bytes (tokenize, verify, repair).

Why not just call the tokenizer: a tokenizer maps *text* to ids and its decode is not the
inverse of its encode on bytes. SentencePiece adds a dummy-prefix space and may normalise
(NFKC, collapsing spaces); HF tokenizers match literal ``<|endoftext|>`` as a special token;
invalid UTF-8 is not text at all. The LLM codec needs ``tokens_to_bytes(table, ids) ==
data`` for *every* byte string, with ids the model finds natural (compression).

Algorithm of :meth:`LosslessTokenizer.encode`:

1. Cut the input into maximal valid-UTF-8 runs and runs of invalid bytes; valid runs are
   further cut into chunks of about ``chunk_size`` bytes, preferably after a newline or
   before a space (never inside a character), which bounds tokenizer memory and time.
2. Tokenize each chunk with byte offsets (SentencePiece proto ``begin``/``end``; HF
   character offsets converted to byte offsets). Special-token matching is disabled
   (``encode_special_tokens``), so literal ``<|endoftext|>`` is tokenized as text.
3. Fast path: if the chunk's tokens' table bytes concatenate to the chunk, take them all.
4. Otherwise walk the tokens in *groups*: a group starts at the current byte position
   and absorbs every following token that starts inside it or at its very start. This
   keeps together what offsets report for one character: byte-level BPE tokens that split
   a multi-byte character (they share/overlap the character's span) and SentencePiece
   byte-fallback pieces (zero-width pieces followed by one spanning the character). A
   group whose table bytes equal its source bytes is accepted as is; any other group
   (dummy prefix, normalisation, unknown piece, special token) and every uncovered gap is
   *repaired*: greedy longest match of the source bytes against the whole table, which
   ends in single-byte tokens where nothing longer fits.
5. Invalid UTF-8 runs are repaired the same way (byte-level vocabularies have tokens for
   partial characters; SentencePiece has ``<0xNN>`` pieces).
6. The result is always verified against the input; a mismatch is a bug and raises.

Repair needs single-byte tokens; if some byte has none (no byte fallback), encoding raises
:class:`UnrepresentableBytesError` and the codec falls back to zstd.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np

from llmarc.errors import LlmarcError
from llmarc.model.tokenbytes import (
    TokenizerKind,
    TokenTable,
    build_token_bytes,
    byte_fallback_ids,
    detect_kind,
    hf_backend,
    single_byte_tokens,
    sp_processor,
    tokens_to_bytes,
)

DEFAULT_CHUNK_SIZE = 1 << 16
_MIN_TEXT_RUN = 8
_PROBE = 64


class UnrepresentableBytesError(LlmarcError):
    """The input contains bytes no token (sequence) of this vocabulary can represent.

    Raised by :meth:`LosslessTokenizer.encode` for vocabularies without byte fallback;
    the LLM codec catches it and stores the entry with zstd instead.
    """


class TokenizationSelfCheckError(UnrepresentableBytesError):
    """The produced ids do not decode to the input: a bug, never expected.

    A subclass of :class:`UnrepresentableBytesError` on purpose, so the codec's zstd
    fallback still stores the entry losslessly while the bug gets reported.
    """


class _Spans:
    """Run the tokenizer on one text chunk and return (ids, byte starts, byte ends)."""

    def __init__(self, tokenizer: object, kind: TokenizerKind) -> None:
        self.kind = kind
        self._sp: Any = None
        self._hf: Any = None
        if kind == "sentencepiece":
            self._sp = sp_processor(tokenizer)
        else:
            import tokenizers

            backend = hf_backend(tokenizer)
            # A private copy: we switch off special-token matching, truncation, padding and
            # the post-processor (ByteLevel's trims offsets) without touching the caller's.
            tk = tokenizers.Tokenizer.from_str(backend.to_str())
            tk.no_truncation()
            tk.no_padding()
            tk.post_processor = None
            tk.encode_special_tokens = True
            self._hf = tk

    def __call__(self, text: str, src: bytes) -> tuple[list[int], list[int], list[int]]:
        if self._sp is not None:
            proto = self._sp.encode(
                text,
                return_type="proto",
                add_bos=False,
                add_eos=False,
                reverse=False,
                enable_sampling=False,
                emit_unk_piece=False,
            )
            pieces = proto.pieces
            return (
                [p.id for p in pieces],
                [p.begin for p in pieces],
                [p.end for p in pieces],
            )
        enc = self._hf.encode(text, add_special_tokens=False)
        ids: list[int] = enc.ids
        if not ids:
            return [], [], []
        offs = np.asarray(enc.offsets, dtype=np.int64)
        if len(src) != len(text):  # non-ASCII: character offsets -> byte offsets
            raw = np.frombuffer(src, dtype=np.uint8)
            char_start = np.flatnonzero((raw & 0xC0) != 0x80)
            char_start = np.append(char_start, len(src))
            offs = char_start[np.clip(offs, 0, len(text))]
        return ids, offs[:, 0].tolist(), offs[:, 1].tolist()


def _segments(data: bytes, chunk_size: int) -> Iterable[tuple[bool, int, int]]:
    """Yield ``(is_text, start, end)``: valid-UTF-8 chunks and runs of invalid bytes."""
    n = len(data)
    mv = memoryview(data)
    pos = 0
    bad_start = -1
    # After an error, probe with a small window: a UnicodeDecodeError copies its whole
    # input, which made binary data cost one chunk-sized copy per invalid byte.
    window = chunk_size
    while pos < n:
        end = min(n, pos + window)
        final = end == n
        try:
            _, consumed = codecs.utf_8_decode(mv[pos:end], "strict", final)
            err_len = 0
        except UnicodeDecodeError as e:
            consumed, err_len = e.start, max(1, e.end - e.start)
        if err_len == 0 and not final and window < chunk_size:
            window = chunk_size  # a clean probe: look at a whole chunk before cutting
            continue
        if err_len:
            window = _PROBE
        if consumed:
            if bad_start >= 0:
                yield False, bad_start, pos
                bad_start = -1
            cut = pos + consumed
            if err_len == 0 and not final and consumed > chunk_size // 2:
                cut = _cut_point(data, pos, pos + consumed)
            yield True, pos, cut
            pos = cut
            continue
        if bad_start < 0:
            bad_start = pos
        pos += max(1, err_len)  # (err_len is >= 1 here; max() guards against a stall)
    if bad_start >= 0:
        yield False, bad_start, n


def _cut_point(data: bytes, start: int, end: int) -> int:
    """A chunk end in ``(start, end]``: after the last newline, else before the last space.

    Both bytes are ASCII, so cutting next to them never splits a UTF-8 character; a space
    stays with the word after it, as both byte-level BPE and SentencePiece attach it.
    """
    half = start + (end - start) // 2
    nl = data.rfind(b"\n", half, end)
    if nl >= 0:
        return nl + 1
    sp = data.rfind(b" ", half + 1, end)
    if sp > start:
        return sp
    return end


class LosslessTokenizer:
    """Tokenize any byte string so that the token table reproduces it exactly.

    ``tokenizer`` is an HF tokenizer (fast, or slow with ``sp_model``), a
    ``tokenizers.Tokenizer`` or a ``sentencepiece.SentencePieceProcessor``. ``table``
    defaults to :func:`build_token_bytes` of it; pass the fingerprinted table (possibly
    padded with ``None`` to the logits dimension) to be sure encoder and decoder agree.

    ``prefer_byte_fallback`` chooses which single-byte token a repair uses when a byte has
    both a normal piece (``"a"``) and a ``<0xNN>`` piece. Default ``False``: SentencePiece
    only ever emits ``<0x61>`` for characters missing from the vocabulary, so LLaMA-style
    models never saw it during training and would assign it a tiny probability, while the
    normal piece is common. Bytes that only have a ``<0xNN>`` piece use it either way.
    """

    def __init__(
        self,
        tokenizer: object,
        table: Sequence[bytes | None] | None = None,
        *,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        prefer_byte_fallback: bool = False,
    ) -> None:
        if chunk_size < 16:
            raise ValueError("chunk_size must be at least 16 bytes")
        self.kind: TokenizerKind = detect_kind(tokenizer)
        self.table: TokenTable = list(build_token_bytes(tokenizer) if table is None else table)
        self.chunk_size = chunk_size
        self._spans = _Spans(tokenizer, self.kind)

        fallback = byte_fallback_ids(tokenizer, self.table)
        if prefer_byte_fallback:
            prefer: Iterable[int] = fallback
        else:
            prefer = (i for i, b in enumerate(self.table) if b is not None and i not in fallback)
        self.single_byte: list[int | None] = single_byte_tokens(self.table, frozenset(prefer))

        # Repair dictionary: exact bytes -> lowest id (single bytes as chosen above), plus
        # every proper prefix so a longest match can stop as soon as no token continues.
        self._ids: dict[bytes, int] = {}
        self._prefixes: set[bytes] = set()
        for i, b in enumerate(self.table):
            if b is None or len(b) < 2:
                continue
            self._ids.setdefault(b, i)
            for k in range(1, len(b)):
                self._prefixes.add(b[:k])
        for v, i in enumerate(self.single_byte):
            if i is not None:
                self._ids[bytes([v])] = i

        present: set[int] = set()
        for b in self.table:
            if b is not None:
                present.update(b)
        #: byte values that occur in no token at all: inputs containing them always raise
        #: UnrepresentableBytesError (SmolLM2 lacks 21 such bytes, e.g. 0x04 and 0xF5-0xFF).
        self.unrepresentable: frozenset[int] = frozenset(range(256)) - present
        self._representable = bytes(sorted(present))
        self.set_escaped(frozenset(v for v, t in enumerate(self.single_byte) if t is None))

    def set_escaped(self, values: frozenset[int]) -> None:
        """Choose the byte values :meth:`split_escapes` cuts out.  By default those with
        no single-byte token: int-v1/v2 payloads carry them as escapes (spec/llm-codec.md
        §3.2), so the rest of the text can still be LLM-coded.  Cutting out more is
        still lossless (tests use it on vocabularies that lack no byte)."""
        self.escaped = values
        self._unescaped = bytes(v for v in range(256) if v not in values)
        self._escape_pattern = re.compile(
            b"[" + b"".join(re.escape(bytes([v])) for v in sorted(values)) + b"]"
        ) if values else None

    def split_escapes(self, data: bytes) -> tuple[bytes, list[tuple[int, int]]]:
        """(data without the bytes that have no single-byte token, [(offset, byte)]).

        What remains can always be tokenized (every byte has a single-byte token)."""
        if self._escape_pattern is None or not data.translate(None, self._unescaped):
            return data, []
        escapes = [(m.start(), data[m.start()]) for m in self._escape_pattern.finditer(data)]
        return self._escape_pattern.sub(b"", data), escapes

    def representable(self, data: bytes) -> bool:
        """Cheap pre-check: False if ``encode(data)`` would surely raise (C-speed scan).

        True means every byte value occurs in some token; with single-byte tokens for all
        of them (any byte-fallback vocabulary) encoding then cannot fail.
        """
        return not data.translate(None, self._representable)

    # ------------------------------------------------------------------ decoding
    def decode(self, ids: Iterable[int]) -> bytes:
        """Concatenate the table bytes of ``ids`` (CorruptArchiveError on a bad id)."""
        return tokens_to_bytes(self.table, ids)

    # ------------------------------------------------------------------ encoding
    def encode(self, data: bytes) -> list[int]:
        """Token ids whose table bytes concatenate to exactly ``data``."""
        data = bytes(data)
        out: list[int] = []
        for is_text, start, end in _segments(data, self.chunk_size):
            # Short valid runs between invalid bytes (binary data) are not worth a
            # tokenizer call each: the greedy repair handles them as well, far faster.
            if is_text and (end - start >= _MIN_TEXT_RUN or (start == 0 and end == len(data))):
                self._encode_text(data[start:end], out)
            else:
                self._repair(data, start, end, out)
        try:
            ok = tokens_to_bytes(self.table, out) == data
        except LlmarcError:
            ok = False
        if not ok:  # pragma: no cover - would be a bug in this module
            raise TokenizationSelfCheckError(
                "lossless tokenization failed its self-check (this is a bug in llmarc)"
            )
        return out

    def _encode_text(self, src: bytes, out: list[int]) -> None:
        text = src.decode("utf-8")
        ids, starts, ends = self._spans(text, src)
        table = self.table
        n_table = len(table)
        pieces = [table[i] if i < n_table else None for i in ids]
        if None not in pieces and b"".join(pieces) == src:  # type: ignore[arg-type]
            out.extend(ids)
            return
        pos = 0
        i = 0
        n = len(ids)
        while i < n:
            s = starts[i]
            if s < pos:  # already covered by an earlier group or repair
                i += 1
                continue
            if s > pos:
                self._repair(src, pos, s, out)
                pos = s
            ge = ends[i]
            j = i + 1
            while j < n and (starts[j] < ge or starts[j] == s):
                if ends[j] > ge:
                    ge = ends[j]
                j += 1
            group = pieces[i:j]
            if ge > s and None not in group and b"".join(group) == src[s:ge]:  # type: ignore[arg-type]
                out.extend(ids[i:j])
            else:
                self._repair(src, s, ge, out)
            pos = max(pos, ge)
            i = j
        self._repair(src, pos, len(src), out)

    def _repair(self, src: bytes, start: int, end: int, out: list[int]) -> None:
        """Greedy longest match of ``src[start:end]`` over the table's byte strings."""
        ids = self._ids
        prefixes = self._prefixes
        pos = start
        while pos < end:
            best = ids.get(src[pos : pos + 1])
            best_len = 1
            k = 2
            while pos + k <= end:
                piece = src[pos : pos + k]
                hit = ids.get(piece)
                if hit is not None:
                    best, best_len = hit, k
                if piece not in prefixes:
                    break
                k += 1
            if best is None:
                raise UnrepresentableBytesError(
                    f"byte 0x{src[pos]:02x} has no token in this vocabulary (no byte fallback)"
                )
            out.append(best)
            pos += best_len
