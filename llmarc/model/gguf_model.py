"""A GGUF file -> :class:`~llmarc.model.derived.DerivedModel` (spec/model.md §3).

Tensor names map to the Hugging Face names, stored types dequantize by
:mod:`~llmarc.model.dequantize`, the query and key rows that llama.cpp's converter
interleaved for its rotary layout are put back in Hugging Face order, the metadata gives
the architecture, the token table and the start token.  All of it is llmarc's own code
over the file's bytes, written down in the spec: the embedded model means the same
thing under any library versions.
"""

from __future__ import annotations

import hashlib
import json
import struct
from typing import Any

import numpy as np

from llmarc.errors import ModelError
from llmarc.model.architecture import Architecture, converted_config
from llmarc.model.dequantize import dequantize, stored_size
from llmarc.model.derived import DerivedModel, canonical_shapes
from llmarc.model.gguf_file import Float32Value, GGUFFile, TensorInfo
from llmarc.model.sources import ModelSource, file_digest
from llmarc.model.tokenbytes import table_from_gguf

GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
LAYER_NAMES = {
    "attn_norm": "input_layernorm.weight",
    "attn_q": "self_attn.q_proj.weight",
    "attn_k": "self_attn.k_proj.weight",
    "attn_v": "self_attn.v_proj.weight",
    "attn_output": "self_attn.o_proj.weight",
    "ffn_norm": "post_attention_layernorm.weight",
    "ffn_gate": "mlp.gate_proj.weight",
    "ffn_up": "mlp.up_proj.weight",
    "ffn_down": "mlp.down_proj.weight",
}


def canonical_name(gguf_name: str) -> str | None:
    """The Hugging Face name of a GGUF tensor, or None for a name the spec does not map."""
    if gguf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if (len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight"
            and parts[2] in LAYER_NAMES and str(int(parts[1])) == parts[1]):
        return f"model.layers.{parts[1]}.{LAYER_NAMES[parts[2]]}"
    return None


def unpermute(rows: np.ndarray, heads: int) -> np.ndarray:
    """Undo llama.cpp's rotary permutation of q/k rows: within each head, stored row
    ``2j + b`` (b = 0, 1) goes back to row ``j + b·Dh/2``."""
    out, inner = rows.shape
    half = out // heads // 2
    return np.ascontiguousarray(
        rows.reshape(heads, half, 2, inner).swapaxes(1, 2).reshape(out, inner))


class _GGUFWeights:
    """Dequantized, un-permuted weights under their canonical names; every tensor's
    type and byte range is checked when the file is opened, not when it is first read."""

    def __init__(self, gguf: GGUFFile, names: dict[str, TensorInfo], arch: Architecture,
                 what: str) -> None:
        self.gguf, self.names, self.arch = gguf, names, arch
        self.sizes = {name: stored_size(info.ggml_type, info.elements, info.dims[0],
                                        f"{what}: {name}") for name, info in names.items()}
        for name, info in names.items():
            gguf.raw(info, self.sizes[name])

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` of a 2-D tensor that is not un-permuted (the embedding), as
        float32 [len(index), row]: each stored row is whole blocks, so its bytes are one
        run of the tensor's, dequantized as a tensor of one row."""
        info = self.names[name]
        rows, width = info.shape
        row_bytes = self.sizes[name] // rows
        raw = np.frombuffer(self.gguf.raw(info, self.sizes[name]), dtype=np.uint8)
        picked = raw.reshape(rows, row_bytes)[np.asarray(index, dtype=np.int64)]
        return dequantize(memoryview(picked.reshape(-1)), info.ggml_type, (len(picked), width))

    def tensor(self, name: str) -> np.ndarray:
        info = self.names[name]
        values = dequantize(self.gguf.raw(info, self.sizes[name]), info.ggml_type, info.shape)
        self.gguf.release(info, self.sizes[name])  # a view of F32 pages reads them back
        if name.endswith("self_attn.q_proj.weight"):
            return unpermute(values, self.arch.num_attention_heads)
        if name.endswith("self_attn.k_proj.weight"):
            return unpermute(values, self.arch.num_key_value_heads)
        return values


def _metadata_list(metadata: dict[str, Any], key: str, what: str) -> list[Any]:
    value = metadata.get(key)
    if not isinstance(value, list):
        raise ModelError(f"{what}: GGUF metadata lacks the list {key}")
    return value


def read_gguf(source: ModelSource) -> DerivedModel:
    """Derive the model of a GGUF file (spec/model.md §3)."""
    what = source.display_name
    gguf = GGUFFile(source.path)
    names: dict[str, TensorInfo] = {}
    for info in gguf.tensors.values():
        name = canonical_name(info.name)
        if name is None:
            raise ModelError(f"{what}: GGUF tensor {info.name!r} is not one llmarc knows "
                             "(a LLaMA-family model has no such weight)")
        names[name] = info
    embedding = names.get("model.embed_tokens.weight")
    if embedding is None or len(embedding.dims) != 2:
        raise ModelError(f"{what}: GGUF has no 2-D token_embd.weight")
    metadata = gguf.metadata
    tokens = _metadata_list(metadata, "tokenizer.ggml.tokens", what)
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    architecture = Architecture.from_gguf(
        metadata, vocab_size=embedding.shape[0], tied="lm_head.weight" not in names, what=what)
    shapes = canonical_shapes(architecture)
    for name, shape in shapes.items():
        found = names[name].shape if name in names else None
        if found != shape:
            raise ModelError(f"{what}: weight {name} is "
                             f"{'missing' if found is None else list(found)}, "
                             f"expected {list(shape)}")
    if architecture.head_dim % 2:
        raise ModelError(f"{what}: head_dim {architecture.head_dim} is odd")
    tokenizer_model = metadata.get("tokenizer.ggml.model")
    table = table_from_gguf(str(tokenizer_model), tokens, types)
    width = architecture.vocab_size
    if len(table) > width:
        raise ModelError(f"{what}: {len(table)} tokens but the model predicts only {width}")
    start = metadata.get("tokenizer.ggml.bos_token_id",
                         metadata.get("tokenizer.ggml.eos_token_id"))
    if isinstance(start, bool) or not isinstance(start, int) or not 0 <= start < width:
        raise ModelError(f"{what}: GGUF names no usable BOS or EOS token ({start!r})")
    weights = _GGUFWeights(gguf, names, architecture, what)
    derived = DerivedModel(
        source=source, architecture=architecture,
        table=table + [None] * (width - len(table)), start_token=start, weights=weights,
        source_digest=file_digest(source.path),
        make_tokenizer=lambda: encoder_tokenizer(metadata, what),
        legacy_config=converted_config(architecture),
        legacy_weights_digest=lambda: converted_weights_digest(derived))
    return derived


def converted_weights_digest(derived: DerivedModel) -> str:
    """Fingerprint v1's weights digest of a GGUF model: llmarc 0.1 hashed the
    ``model.safetensors`` it wrote of the dequantized weights (float32, names in byte
    order, no ``lm_head.weight`` when tied, a compact JSON header padded with spaces to
    a multiple of 8); the same bytes are hashed here without writing them."""
    names = sorted(derived.shapes, key=str.encode)
    header, offset = {}, 0
    for name in names:
        size = 4 * int(np.prod(derived.shapes[name]))
        header[name] = {"dtype": "F32", "shape": list(derived.shapes[name]),
                        "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    sha = hashlib.sha256(struct.pack("<Q", len(text)) + text)
    for name in names:
        sha.update(derived.tensor(name).astype("<f4", copy=False).tobytes())
    return hashlib.sha256(b"model.safetensors\0" + sha.digest()).hexdigest()


def encoder_tokenizer(metadata: dict[str, Any], what: str) -> Any:
    """The encoder's tokenizer built from GGUF metadata: a byte-level BPE
    (``tokenizers``) for ``gpt2``, a SentencePiece model for ``llama``.  It decides only
    which tokens the encoder picks (the ratio), never what they mean."""
    tokens = metadata["tokenizer.ggml.tokens"]
    types = metadata.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    model = metadata.get("tokenizer.ggml.model")
    if model == "gpt2":
        import tokenizers

        merges = [tuple(m.split(" ", 1)) for m in metadata.get("tokenizer.ggml.merges", [])]
        bpe = tokenizers.models.BPE({t: i for i, t in enumerate(tokens)}, merges,
                                    fuse_unk=False, byte_fallback=False)
        tokenizer = tokenizers.Tokenizer(bpe)
        tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(
            add_prefix_space=False, use_regex=True)
        tokenizer.decoder = tokenizers.decoders.ByteLevel()
        tokenizer.add_special_tokens([tokenizers.AddedToken(t, special=True)
                                      for t, k in zip(tokens, types, strict=True) if k != 1])
        return tokenizer
    if model == "llama":
        import sentencepiece

        scores = metadata.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
        proto = sentencepiece_proto(
            tokens, [s.value if isinstance(s, Float32Value) else float(s) for s in scores],
            types, add_dummy_prefix=bool(metadata.get("tokenizer.ggml.add_space_prefix", True)))
        return sentencepiece.SentencePieceProcessor(model_proto=proto)
    raise ModelError(f"{what}: GGUF tokenizer model {model!r} is not supported")


def _field(number: int, wire: int, payload: bytes) -> bytes:
    return _varint(number << 3 | wire) + payload


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _message(number: int, payload: bytes) -> bytes:
    return _field(number, 2, _varint(len(payload)) + payload)


def sentencepiece_proto(tokens: list[str], scores: list[float], types: list[int],
                        add_dummy_prefix: bool) -> bytes:
    """A serialized SentencePiece ``ModelProto`` (BPE, byte fallback, no normalization)
    holding GGUF's pieces, for the ``sentencepiece`` library to tokenize with."""
    pieces = b"".join(
        _message(1, _message(1, text.encode()) + _field(2, 5, struct.pack("<f", score))
                 + _field(3, 0, _varint(kind)))
        for text, score, kind in zip(tokens, scores, types, strict=True))
    trainer = _field(3, 0, _varint(2)) + _field(35, 0, _varint(1))  # BPE, byte_fallback
    normalizer = (_message(1, b"identity") + _field(3, 0, _varint(int(add_dummy_prefix)))
                  + _field(4, 0, _varint(0)) + _field(5, 0, _varint(1)))
    return pieces + _message(2, trainer) + _message(3, normalizer)
