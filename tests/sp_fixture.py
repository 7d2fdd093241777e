"""Tiny SentencePiece models trained offline in milliseconds, for tokenizer tests.

Why train instead of shipping a LLaMA ``tokenizer.model``: no network, no large files,
and we control the options that matter (byte fallback, normalisation, model type).
"""

from __future__ import annotations

import io
from functools import cache
from pathlib import Path

CORPUS = Path("/work/shared/corpus/alice29.txt")
_FALLBACK_TEXT = (
    "Alice was beginning to get very tired of sitting by her sister on the bank, and of "
    "having nothing to do: once or twice she had peeped into the book her sister was "
    "reading, but it had no pictures or conversations in it, 'and what is the use of a "
    "book,' thought Alice 'without pictures or conversations?'\n"
) * 20


def corpus_text() -> str:
    """Training/evaluation text (Alice in Wonderland if the shared corpus is present)."""
    if CORPUS.exists():
        return CORPUS.read_bytes().decode("latin-1")
    return _FALLBACK_TEXT


@cache
def train_sp(
    model_type: str = "bpe",
    *,
    vocab_size: int = 400,
    byte_fallback: bool = True,
    llama_like: bool = True,
) -> bytes:
    """Serialized SentencePiece model.

    ``llama_like`` mirrors LLaMA's trainer spec (identity normalisation, spaces kept,
    dummy prefix, byte fallback); ``False`` keeps SentencePiece's defaults (NFKC,
    collapsing whitespace), the hardest case for lossless tokenization.
    """
    import sentencepiece as spm

    lines = [line for line in corpus_text().splitlines() if line.strip()]
    out = io.BytesIO()
    options: dict[str, object] = {}
    if llama_like:
        options = {"normalization_rule_name": "identity", "remove_extra_whitespaces": False}
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=out,
        vocab_size=vocab_size,
        model_type=model_type,
        byte_fallback=byte_fallback,
        character_coverage=1.0,
        num_threads=1,
        minloglevel=2,
        **options,
    )
    return out.getvalue()


def sp_processor(model_type: str = "bpe", **kwargs: object):  # type: ignore[no-untyped-def]
    """A ``SentencePieceProcessor`` on :func:`train_sp`'s model."""
    import sentencepiece as spm

    return spm.SentencePieceProcessor(model_proto=train_sp(model_type, **kwargs))  # type: ignore[arg-type]


def write_sp_dir(path: Path, model_type: str = "bpe", **kwargs: object) -> Path:
    """A folder holding only ``tokenizer.model``, loadable by transformers."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "tokenizer.model").write_bytes(train_sp(model_type, **kwargs))  # type: ignore[arg-type]
    return path
