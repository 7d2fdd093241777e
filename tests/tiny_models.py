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
