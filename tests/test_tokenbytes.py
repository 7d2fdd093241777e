"""The token id -> bytes table: kinds, exact bytes, determinism, canonical digest."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmarc.errors import CorruptArchiveError, ModelError
from llmarc.model.tokenbytes import (
    build_token_bytes,
    byte_fallback_ids,
    byte_level_decoder,
    detect_kind,
    single_byte_tokens,
    table_digest,
    tokens_to_bytes,
)
from tests.sp_fixture import sp_processor, write_sp_dir

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sp_dir(tmp_path_factory.mktemp("sp"))


def test_sp_table_properties() -> None:
    sp = sp_processor("bpe")
    table = build_token_bytes(sp)
    assert detect_kind(sp) == "sentencepiece"
    assert len(table) == sp.get_piece_size()
    for i in range(sp.get_piece_size()):
        piece = sp.id_to_piece(i)
        if sp.is_control(i) or sp.is_unknown(i):
            assert table[i] is None, piece
        elif sp.is_byte(i):
            assert table[i] == bytes([int(piece[3:5], 16)])
        else:
            assert table[i] == piece.replace("▁", " ").encode()
    assert table[sp.piece_to_id("▁")] == b" "
    for special in ("<s>", "</s>", "<unk>"):
        assert table[sp.piece_to_id(special)] is None
    # every byte value has a byte-fallback piece, and preferring them picks exactly those
    fallback = byte_fallback_ids(sp, table)
    assert len(fallback) == 256
    chosen = single_byte_tokens(table, fallback)
    assert all(i in fallback for i in chosen)
    assert [table[i] for i in chosen] == [bytes([v]) for v in range(256)]  # type: ignore[index]
    natural = single_byte_tokens(table)  # lowest id; byte pieces come first in SP
    assert natural == chosen


@pytest.mark.parametrize("loader", ["llama", "auto"])
def test_hf_from_sentencepiece_matches_sentencepiece(sp_dir: Path, loader: str) -> None:
    """The HF fast conversion of a SentencePiece model gets the very same table."""
    cls = transformers.LlamaTokenizer if loader == "llama" else transformers.AutoTokenizer
    hf = cls.from_pretrained(str(sp_dir))
    assert detect_kind(hf) == "sentencepiece_hf"
    sp_table = build_token_bytes(sp_processor("bpe"))
    hf_table = build_token_bytes(hf)
    assert hf_table == sp_table
    assert table_digest(hf_table) == table_digest(sp_table)
    assert len(byte_fallback_ids(hf, hf_table)) == 256


def test_sp_without_byte_fallback_has_holes() -> None:
    sp = sp_processor("bpe", byte_fallback=False)
    table = build_token_bytes(sp)
    assert table[sp.unk_id()] is None
    assert single_byte_tokens(table)[0xFF] is None


def test_byte_level_alphabet_is_gpt2s() -> None:
    dec = byte_level_decoder()
    assert len(dec) == 256 and sorted(dec.values()) == list(range(256))
    assert dec["Ġ"] == 0x20 and dec["Ċ"] == 0x0A and dec["A"] == 0x41 and dec["Ā"] == 0x00


def test_byte_level_table_from_a_built_tokenizer() -> None:
    """A GPT-2 style tokenizer built in memory (no SmolLM2 load needed)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers

    alphabet = sorted(byte_level_decoder())
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab["Ġthe"] = len(vocab)
    vocab["æĹ"] = len(vocab)  # a partial UTF-8 character (first two bytes of 日)
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|endoftext|>"])
    table = build_token_bytes(tk)
    assert detect_kind(tk) == "byte_level"
    assert len(table) == len(vocab) + 1
    assert table[vocab["Ġthe"]] == b" the"
    assert table[vocab["æĹ"]] == "日".encode()[:2]
    assert table[-1] is None  # the special token
    assert [table[i] for i in single_byte_tokens(table)] == [bytes([v]) for v in range(256)]


def test_unsupported_tokenizers_raise() -> None:
    tokenizers = pytest.importorskip("tokenizers")
    wp = tokenizers.Tokenizer(tokenizers.models.WordPiece({"[UNK]": 0, "a": 1}, unk_token="[UNK]"))
    with pytest.raises(ModelError):
        build_token_bytes(wp)
    with pytest.raises(ModelError):
        build_token_bytes(object())


def test_table_digest_is_canonical() -> None:
    t: list[bytes | None] = [b"a", None, b"", b"bc"]
    assert table_digest(t) == table_digest(list(t))
    assert table_digest(t) != table_digest([b"a", b"", None, b"bc"])
    assert table_digest(t) != table_digest([*t, None])  # padding is hashed
    assert table_digest([b"ab", b"c"]) != table_digest([b"a", b"bc"])
    assert len(table_digest([])) == 32
    sp = sp_processor("bpe")
    assert table_digest(build_token_bytes(sp)) == table_digest(build_token_bytes(sp))


def test_tokens_to_bytes_validates() -> None:
    t: list[bytes | None] = [b"a", None, b"bc"]
    assert tokens_to_bytes(t, [0, 2, 0]) == b"abca"
    assert tokens_to_bytes(t, []) == b""
    for bad in ([1], [3], [-1], [0, 7]):
        with pytest.raises(CorruptArchiveError):
            tokens_to_bytes(t, bad)
    np = pytest.importorskip("numpy")
    assert tokens_to_bytes(t, np.array([2, 0], dtype=np.int64)) == b"bca"
