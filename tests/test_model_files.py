"""Model files -> the derived model (spec/model.md), by llmarc's own readers.

Each reader is checked against an independent implementation of the same format (the
``gguf`` package's writer and dequantizer, the ``safetensors`` and ``sentencepiece``
libraries, transformers' own GGUF loader where it is installed), and against damaged
files, which must be one ModelError, never a traceback."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import llmarc
from llmarc.errors import ModelError, ModelMismatchError
from llmarc.model.architecture import Architecture, legacy_forms
from llmarc.model.dequantize import dequantize
from llmarc.model.gguf_file import GGUFFile
from llmarc.model.gguf_model import read_gguf
from llmarc.model.hf_folder import read_hf_folder
from llmarc.model.safetensors_file import SafetensorsFile
from llmarc.model.sources import resolve
from llmarc.model.sp_proto import read_pieces
from llmarc.model.start_token import StartTokenRule, resolve_start_token
from llmarc.model.tokenbytes import table_digest
from tests.gguf_fixture import FIXTURES, write_gguf

gguf = pytest.importorskip("gguf")  # the test extra installs it: writes and dequantizes


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("gguf")


@pytest.mark.parametrize("fixture", ["tiny-llama-bpe", "tiny-llama-sp"])
def test_an_f32_gguf_derives_the_folder_weights_table_and_start(fixture: str,
                                                                 gguf_dir: Path) -> None:
    """The same model as a folder and as an F32 GGUF (q/k rows permuted as llama.cpp's
    converter does): identical weights bit for bit, token table and start token."""
    folder = read_hf_folder(resolve(FIXTURES / fixture))
    file = read_gguf(resolve(write_gguf(gguf_dir / f"{fixture}.gguf", fixture)))
    assert list(file.shapes) == list(folder.shapes)
    for name in folder.shapes:
        assert np.array_equal(file.tensor(name), folder.tensor(name)), name
    assert table_digest(file.table) == table_digest(folder.table)
    assert file.start_token == folder.start_token
    # GGUF stores the epsilon as float32: the derived value is that float32, widened.
    assert file.architecture.rms_norm_eps == float(np.float32(1e-6))
    assert replace(file.architecture, rms_norm_eps=1e-6) == folder.architecture


@pytest.mark.parametrize("qtype", ["F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_each_stored_type_dequantizes_as_the_gguf_package_does(qtype: str,
                                                                gguf_dir: Path) -> None:
    path = write_gguf(gguf_dir / f"bpe-{qtype}.gguf", "tiny-llama-bpe", qtype)
    container = GGUFFile(path)
    info = container.tensors["blk.0.ffn_down.weight"]
    assert info.ggml_type == gguf.GGMLQuantizationType[qtype].value
    reader = gguf.GGUFReader(path)
    raw = next(t for t in reader.tensors if t.name == info.name).data
    theirs = gguf.quants.dequantize(raw, gguf.GGMLQuantizationType[qtype])
    ours = dequantize(container.raw(info, raw.nbytes), info.ggml_type, info.shape)
    assert ours.dtype == np.float32 and ours.shape == info.shape
    assert np.array_equal(ours.view(np.uint32), theirs.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("qtype", ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"])
def test_embedding_rows_are_the_tensors_rows(qtype: str, gguf_dir: Path) -> None:
    """The engine reads the embedding's rows per step (``DerivedModel.rows``) instead of
    holding the table: every stored type gives the same values as the whole tensor,
    for repeated and unordered tokens."""
    path = write_gguf(gguf_dir / f"rows-{qtype}.gguf", "tiny-llama-bpe", qtype)
    derived = read_gguf(resolve(path))
    index = np.array([5, 0, 299, 5, 17])
    whole = derived.tensor("model.embed_tokens.weight")
    got = derived.rows("model.embed_tokens.weight", index)
    assert got.dtype == np.float32 and np.array_equal(got.view(np.uint32),
                                                      whole[index].view(np.uint32))


def test_embedding_rows_of_a_bin_checkpoint(tmp_path: Path) -> None:
    """A folder of ``*.bin`` weights (read through torch's ``weights_only`` loader) gives
    the same embedding rows as its safetensors twin, and as its whole tensor."""
    torch = pytest.importorskip("torch")
    from safetensors.torch import load_file

    folder = tmp_path / "bin-model"
    shutil.copytree(FIXTURES / "tiny-llama-bpe", folder)
    weights = folder / "model.safetensors"
    torch.save(load_file(str(weights)), folder / "pytorch_model.bin")
    weights.unlink()
    derived = read_hf_folder(resolve(folder))
    twin = read_hf_folder(resolve(FIXTURES / "tiny-llama-bpe"))
    index = np.array([3, 299, 3, 0])
    name = "model.embed_tokens.weight"
    got = derived.rows(name, index)
    assert got.dtype == np.float32
    assert np.array_equal(got, twin.rows(name, index))
    assert np.array_equal(got, derived.tensor(name)[index])


def test_a_quantized_gguf_roundtrips_through_the_cli(gguf_dir: Path, tmp_path: Path) -> None:
    """A Q4_1 GGUF with a SentencePiece ('llama') tokenizer, as LLaMA GGUFs have: its
    encoder tokenizer is rebuilt from the metadata, and extraction is byte-exact."""
    path = write_gguf(gguf_dir / "sp-q41.gguf", "tiny-llama-sp", "Q4_1")
    src = tmp_path / "src"
    src.mkdir()
    text = (FIXTURES / "tiny-training.txt").read_bytes()[:600] + "Ünïcødé ✓\n".encode()
    (src / "a.txt").write_bytes(text)
    out = tmp_path / "a.llma"
    llmarc.pack(src, out, codec="llm", llm=llmarc.LLMOptions(model=str(path), device="cpu"))
    with llmarc.open(out, model=str(path), device="cpu") as archive:
        assert archive.read("a.txt") == text
        assert next(iter(archive.members())).codec == "llm"


def test_transformers_reads_the_same_weights_from_gguf(gguf_dir: Path) -> None:
    """An independent reading of the GGUF layout (transformers' loader, which llmarc 0.1
    used): the same float32 values for every weight, including the un-permuted q/k."""
    transformers = pytest.importorskip("transformers")
    path = write_gguf(gguf_dir / "bpe-q8.gguf", "tiny-llama-bpe", "Q8_0")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name).state_dict()
    ours = read_gguf(resolve(path))
    for name in ours.shapes:
        assert np.array_equal(ours.tensor(name), theirs[name].numpy()), name


@pytest.mark.parametrize("cut", [0, 3, 11, 40, 300, 2000, -100])
def test_damaged_gguf_files_are_one_model_error(cut: int, gguf_dir: Path,
                                                tmp_path: Path) -> None:
    data = write_gguf(gguf_dir / "bpe.gguf").read_bytes()
    damaged = tmp_path / "damaged.gguf"
    damaged.write_bytes(data[:cut])
    with pytest.raises(ModelError, match=r"damaged\.gguf"):
        read_gguf(resolve(damaged))


def test_a_gguf_claiming_huge_counts_is_refused_before_allocating(tmp_path: Path) -> None:
    path = tmp_path / "huge.gguf"
    path.write_bytes(b"GGUF" + (3).to_bytes(4, "little") + (2**40).to_bytes(8, "little")
                     + (2**40).to_bytes(8, "little"))
    with pytest.raises(ModelError, match="claims"):
        GGUFFile(path)


def test_safetensors_reader_widens_f16_and_bf16_exactly(tmp_path: Path) -> None:
    import torch
    from safetensors.torch import save_file

    values = torch.randn(5, 7) * 3
    save_file({"a": values.half(), "b": values.bfloat16(), "c": values}, tmp_path / "w.safetensors")
    stored = SafetensorsFile(tmp_path / "w.safetensors")
    assert np.array_equal(stored.float32("a"), values.half().float().numpy())
    assert np.array_equal(stored.float32("b"), values.bfloat16().float().numpy())
    assert np.array_equal(stored.float32("c"), values.numpy())
    index = np.array([4, 0, 4, 2])
    for name in "abc":  # the rows a step reads: the same values as the whole tensor's
        assert np.array_equal(stored.float32_rows(name, index), stored.float32(name)[index])


def test_sentencepiece_pieces_are_read_without_the_library() -> None:
    sentencepiece = pytest.importorskip("sentencepiece")
    path = FIXTURES / "tiny-llama-sp" / "tokenizer.model"
    processor = sentencepiece.SentencePieceProcessor(model_file=str(path))
    pieces = read_pieces(path.read_bytes(), "tokenizer.model")
    assert [p.text for p in pieces] == [processor.id_to_piece(i)
                                        for i in range(processor.get_piece_size())]
    assert [p.type == 6 for p in pieces] == [processor.is_byte(i) for i in range(len(pieces))]
    assert [p.type == 3 for p in pieces] == [processor.is_control(i)
                                             for i in range(len(pieces))]


BASE = {"model_type": "llama", "vocab_size": 10, "hidden_size": 8, "intermediate_size": 16,
        "num_hidden_layers": 1, "num_attention_heads": 2}


@pytest.mark.parametrize("spelling", [
    {"rope_theta": 500000.0},
    {"rope_theta": 500000},
    {"rope_parameters": {"rope_theta": 500000.0, "rope_type": "default"}},
    {"rope_scaling": None, "rope_theta": 500000.0},
    {"rope_scaling": {"type": "default"}, "rope_theta": 5e5},
])
def test_every_spelling_of_a_config_gives_one_architecture(spelling: dict) -> None:
    arch = Architecture.from_config({**BASE, **spelling}, "m")
    assert arch.rope_theta == 500000.0 and arch.rope_scaling is None
    assert arch == Architecture.from_config({**BASE, "rope_theta": 500000.0}, "m")
    assert (arch.head_dim, arch.num_key_value_heads, arch.rms_norm_eps) == (4, 2, 1e-6)


@pytest.mark.parametrize(("change", "message"), [
    ({"model_type": "gpt2"}, "model type"), ({"hidden_size": 0}, "hidden_size"),
    ({"num_attention_heads": 3}, "multiple"), ({"rms_norm_eps": "small"}, "rms_norm_eps"),
    ({"tie_word_embeddings": 1}, "tie_word_embeddings"), ({"rope_scaling": [1]}, "rope_scaling"),
])
def test_malformed_configs_are_model_errors(change: dict, message: str) -> None:
    with pytest.raises(ModelError, match=message):
        Architecture.from_config({**BASE, **change}, "m")


def test_legacy_forms_are_what_each_transformers_release_returned() -> None:
    """Fingerprint v1 hashed ``config.to_dict()``: 5.x folds rope_theta into
    rope_parameters, 4.x keeps the file's keys and adds rope_theta's default."""
    folder_config = json.loads((FIXTURES / "tiny-llama-bpe" / "config.json").read_text())
    v5, v4 = legacy_forms(folder_config)
    assert v5["rope_parameters"] == {"rope_theta": 10000.0, "rope_type": "default"}
    assert "rope_theta" not in v5
    assert v4["rope_theta"] == 10000.0 and v4["rope_parameters"] == v5["rope_parameters"]
    older, = [f for f in legacy_forms({**BASE, "rope_theta": 1e5}) if "rope_theta" in f]
    assert older["rope_theta"] == 1e5 and "rope_parameters" not in older


def test_the_start_token_follows_the_spec_order() -> None:
    ids = {"<s>": 1, "</s>": 2, "<bos>": 5}
    rule = StartTokenRule(tokenizer_config={"bos_token": {"content": "<bos>"}},
                          special_tokens_map={"bos_token": "<s>"},
                          config={"bos_token_id": 7}, token_ids=ids)
    assert resolve_start_token(rule, 10, "m") == 5
    assert resolve_start_token(replace(rule, tokenizer_config={}), 10, "m") == 1
    assert resolve_start_token(replace(rule, tokenizer_config={}, special_tokens_map={}),
                               10, "m") == 7
    eos_only = StartTokenRule(config={"eos_token_id": [2, 3]}, token_ids=ids)
    assert resolve_start_token(eos_only, 10, "m") == 2
    with pytest.raises(ModelError, match="not in the vocabulary"):
        resolve_start_token(StartTokenRule(tokenizer_config={"bos_token": "<x>"}), 10, "m")
    with pytest.raises(ModelError, match="outside"):
        resolve_start_token(StartTokenRule(config={"bos_token_id": 10}), 10, "m")
    with pytest.raises(ModelError, match="no BOS or EOS"):
        resolve_start_token(StartTokenRule(), 10, "m")


def test_a_mismatch_names_the_component_that_differs(tmp_path: Path) -> None:
    """The same weights and table with another start token: refused, saying so."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a.txt").write_bytes(b"hello there, hello again\n" * 4)
    out = tmp_path / "a.llma"
    llmarc.pack(src, out, codec="llm",
                llm=llmarc.LLMOptions(model=str(FIXTURES / "tiny-llama-bpe"), device="cpu"))
    other = tmp_path / "other"
    shutil.copytree(FIXTURES / "tiny-llama-bpe", other)
    vocab = json.loads((other / "tokenizer.json").read_text())["model"]["vocab"]
    config = json.loads((other / "tokenizer_config.json").read_text())
    config["bos_token"] = next(text for text, index in vocab.items() if index == 5)
    (other / "tokenizer_config.json").write_text(json.dumps(config))
    with (pytest.raises(ModelMismatchError, match=r"its start token differs;"),
          llmarc.open(out, model=str(other), device="cpu") as archive):
        archive.read("a.txt")
