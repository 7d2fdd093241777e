"""GGUF files of the tiny fixture models, written as llama.cpp's converter writes them.

The ``gguf`` package (a test dependency) writes the container and quantizes; the q/k
rows are permuted into llama.cpp's interleaved rotary order here, so that reading them
back exercises llmarc's un-permutation against an independent writer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
HF_TO_GGUF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
LAYER_PARTS = {
    "input_layernorm": "attn_norm", "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v", "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm", "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
}


def gguf_name(name: str) -> str:
    if name in HF_TO_GGUF:
        return HF_TO_GGUF[name]
    _model, _layers, index, *rest = name.split(".")
    return f"blk.{index}.{LAYER_PARTS['.'.join(rest[:-1])]}.weight"


def permute(rows: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's convert_hf_to_gguf permutation of q/k rows (HF -> GGUF order)."""
    out = rows.shape[0]
    return rows.reshape(heads, 2, out // heads // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(
        rows.shape)


def write_gguf(path: Path, fixture: str = "tiny-llama-bpe", matrix_type: str = "F32") -> Path:
    """``fixtures/<fixture>`` as a GGUF file with every matrix stored as ``matrix_type``
    (norms stay F32, as llama.cpp keeps them)."""
    import gguf
    from safetensors.numpy import load_file

    folder = FIXTURES / fixture
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(str(folder / "model.safetensors"))
    heads, kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(config["num_hidden_layers"])
    writer.add_context_length(config["max_position_embeddings"])
    writer.add_embedding_length(config["hidden_size"])
    writer.add_feed_forward_length(config["intermediate_size"])
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(config["rope_parameters"]["rope_theta"])
    writer.add_layer_norm_rms_eps(config["rms_norm_eps"])
    writer.add_rope_dimension_count(config["head_dim"])
    _add_tokenizer(writer, folder)
    qtype = gguf.GGMLQuantizationType[matrix_type]
    for name, values in tensors.items():
        values = values.astype(np.float32)
        if name.endswith("q_proj.weight"):
            values = permute(values, heads)
        elif name.endswith("k_proj.weight"):
            values = permute(values, kv_heads)
        if values.ndim == 2 and qtype != gguf.GGMLQuantizationType.F32:
            writer.add_tensor(gguf_name(name), gguf.quants.quantize(values, qtype),
                              raw_dtype=qtype)
        else:
            writer.add_tensor(gguf_name(name), values)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _add_tokenizer(writer: object, folder: Path) -> None:
    if (folder / "tokenizer.json").is_file():
        spec = json.loads((folder / "tokenizer.json").read_text())
        vocab = spec["model"]["vocab"]
        added = {t["id"]: t["content"] for t in spec["added_tokens"]}
        size = max([*vocab.values(), *added]) + 1
        tokens = [""] * size
        types = [1] * size
        for text, index in vocab.items():
            tokens[index] = text
        for index, text in added.items():
            tokens[index], types[index] = text, 3
        writer.add_tokenizer_model("gpt2")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_token_merges([m if isinstance(m, str) else " ".join(m)
                                 for m in spec["model"]["merges"]])
        writer.add_bos_token_id(0)
        return
    import sentencepiece

    sp = sentencepiece.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    count = sp.get_piece_size()
    types = []
    for i in range(count):
        types.append(3 if sp.is_control(i) else 2 if sp.is_unknown(i)
                     else 6 if sp.is_byte(i) else 1)
    writer.add_tokenizer_model("llama")
    writer.add_token_list([sp.id_to_piece(i) for i in range(count)])
    writer.add_token_scores([sp.get_score(i) for i in range(count)])
    writer.add_token_types(types)
    writer.add_bos_token_id(sp.bos_id())
    writer.add_eos_token_id(sp.eos_id())
