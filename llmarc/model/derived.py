"""The model as an archive sees it: what spec/model.md derives from a model's files.

Reading a model is one straight path: files -> a reader (:mod:`~llmarc.model.hf_folder`
or :mod:`~llmarc.model.gguf_model`) -> this :class:`DerivedModel` -> its fingerprint
(:mod:`~llmarc.model.fingerprint`).  Everything here is computed by llmarc's own code
from the files' bytes, so it is the same under any library versions, or none.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from llmarc.model.architecture import Architecture
from llmarc.model.sources import ModelSource
from llmarc.model.tokenbytes import TokenTable

LAYER_NORMS = ("input_layernorm", "post_attention_layernorm")
ATTENTION = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP = ("gate_proj", "up_proj", "down_proj")


def layer_tensor(layer: int, part: str) -> str:
    """The canonical (Hugging Face) name of one of a layer's weights."""
    if part in ATTENTION:
        return f"model.layers.{layer}.self_attn.{part}.weight"
    if part in MLP:
        return f"model.layers.{layer}.mlp.{part}.weight"
    return f"model.layers.{layer}.{part}.weight"


def canonical_shapes(arch: Architecture) -> dict[str, tuple[int, ...]]:
    """Every weight the engines read, in fingerprint v2's order, with its shape
    ([out, in] for matrices): spec/model.md §1."""
    d, inter, dh = arch.hidden_size, arch.intermediate_size, arch.head_dim
    q, kv = arch.num_attention_heads * dh, arch.num_key_value_heads * dh
    per_layer = {
        "input_layernorm": (d,), "q_proj": (q, d), "k_proj": (kv, d), "v_proj": (kv, d),
        "o_proj": (d, q), "post_attention_layernorm": (d,), "gate_proj": (inter, d),
        "up_proj": (inter, d), "down_proj": (d, inter),
    }
    shapes = {"model.embed_tokens.weight": (arch.vocab_size, d)}
    for layer in range(arch.num_hidden_layers):
        for part, shape in per_layer.items():
            shapes[layer_tensor(layer, part)] = shape
    shapes["model.norm.weight"] = (d,)
    if not arch.tie_word_embeddings:
        shapes["lm_head.weight"] = (arch.vocab_size, d)
    return shapes


class WeightReader(Protocol):
    """Float32 values of a model's weights under their canonical names."""

    def tensor(self, name: str) -> np.ndarray: ...

    def rows(self, name: str, index: np.ndarray) -> np.ndarray: ...


@dataclass
class DerivedModel:
    """A model's meaning for the LLM codec, derived from its files (spec/model.md).

    ``tensor(name)`` gives each weight's exact float32 values on demand (a file is never
    held in memory as a whole); ``table`` is padded to the logits width;
    ``make_tokenizer`` builds the encoder's tokenizer (a decoder never needs one);
    ``legacy_config`` and ``legacy_weights_digest`` are what fingerprint v1 hashed."""

    source: ModelSource
    architecture: Architecture
    table: TokenTable
    start_token: int
    weights: WeightReader
    source_digest: str
    make_tokenizer: Callable[[], Any]
    legacy_config: dict[str, Any]
    legacy_weights_digest: Callable[[], str]

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        return canonical_shapes(self.architecture)

    def tensor(self, name: str) -> np.ndarray:
        """The float32 values of weight ``name`` (``lm_head.weight`` of a tied model is the
        embedding table)."""
        if name == "lm_head.weight" and self.architecture.tie_word_embeddings:
            name = "model.embed_tokens.weight"
        return self.weights.tensor(name)

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """Rows ``index`` of 2-D weight ``name`` (the embedding): the same float32
        values as ``tensor(name)[index]``, without reading the rest."""
        return self.weights.rows(name, index)

    def tensors(self) -> Iterator[tuple[str, np.ndarray]]:
        """(name, float32 values) in canonical order, one at a time."""
        for name in self.shapes:
            yield name, self.tensor(name)
