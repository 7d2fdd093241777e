"""Tiny randomly initialised LLaMA models: fast stand-ins for the real model in codec tests."""

from __future__ import annotations

import torch
from transformers import LlamaConfig, LlamaForCausalLM


def tiny_llama(vocab_size: int = 300, seed: int = 0, layers: int = 2) -> LlamaForCausalLM:
    """A seeded random LLaMA (GQA, 2 layers, hidden 64) in float32, eval mode."""
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # sharpen the random logits so coding is not near-uniform
        model.lm_head.weight.mul_(8.0)
    return model


class RandomModel:
    """A seeded random LLaMA in the form the integer engines read (an ``architecture`` and
    ``tensor(name)`` of float32 values), with no model files and no transformers."""

    def __init__(self, seed: int = 0, **fields: object) -> None:
        import numpy as np

        from llmarc.model.architecture import Architecture
        from llmarc.model.derived import canonical_shapes

        values = {"model_type": "llama", "vocab_size": 300, "hidden_size": 64,
                  "intermediate_size": 128, "num_hidden_layers": 2, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "head_dim": 16, "hidden_act": "silu",
                  "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 4096,
                  "attention_bias": False, "mlp_bias": False, "tie_word_embeddings": False,
                  **fields}
        self.architecture = Architecture.build(values, None, "random model")
        rng = np.random.default_rng(seed)
        self._tensors = {
            name: (1.0 + 0.1 * rng.standard_normal(shape) if len(shape) == 1
                   else 0.05 * rng.standard_normal(shape)).astype("<f4")
            for name, shape in canonical_shapes(self.architecture).items()}

    def tensor(self, name: str):  # type: ignore[no-untyped-def]
        return self._tensors[name].copy()
