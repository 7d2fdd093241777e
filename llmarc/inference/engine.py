"""Fixed-width lockstep inference: the computation encoder and decoder both run.

Why not ``model.generate`` or a full forward pass?  The decoder cannot see the future
tokens, so it must step one token at a time; and measured on CPU, a full forward pass
and incremental stepping over the same tokens give logits that differ in the last bits,
as do a row computed at batch width 1 and inside a batch of 8.  The only safe contract
is that the encoder runs *exactly* the decoder's computation:

* B rows (``batch_width``) always step together, one token per step, all at the same
  position, starting from position 0 with a fresh cache.  Missing rows are padding.
* The KV cache is preallocated at ``[B, kv_heads, segment_length, head_dim]`` per layer,
  so every step sees the same tensor shapes and strides whatever the data: a row's
  logits depend only on its own tokens (tested) and on the recorded numerics profile.
* Rotary tables are computed once for all ``segment_length`` positions.

The loop is our own (about 60 lines over the Hugging Face modules' weights) rather than
``LlamaForCausalLM.forward`` with a cache object: it pins the op sequence we promise to
reproduce, avoids the per-step cache concatenation of ``DynamicCache`` (quadratic copying)
and the full-length masked attention of ``StaticCache``, and does not depend on private
cache APIs that change between transformers releases.  Only LLaMA-family decoders
(``model_type`` in :data:`SUPPORTED_MODEL_TYPES`) are accepted.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from llmarc.errors import ModelError

SUPPORTED_MODEL_TYPES = frozenset({"llama"})


@dataclass(frozen=True)
class EngineShape:
    """The shape parameters that are part of the numerics profile."""

    batch_width: int
    segment_length: int


class LockstepEngine:
    """Steps ``batch_width`` independent rows of a LLaMA-family model in lockstep.

    Usage::

        engine.reset()
        logits = engine.step(first_tokens)   # [B, V] float32 for position 0
        logits = engine.step(next_tokens)    # position 1, ...

    ``step`` may be called at most ``segment_length`` times between resets.
    """

    def __init__(self, model: torch.nn.Module, shape: EngineShape) -> None:
        config = model.config
        if getattr(config, "model_type", None) not in SUPPORTED_MODEL_TYPES:
            raise ModelError(
                f"model type {getattr(config, 'model_type', None)!r} is not supported "
                f"(supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
            )
        if shape.batch_width < 1 or shape.segment_length < 1:
            raise ValueError("batch width and segment length must be positive")
        if shape.segment_length > getattr(config, "max_position_embeddings", 1 << 30):
            raise ModelError(
                f"segment length {shape.segment_length} exceeds the model's context "
                f"({config.max_position_embeddings} positions)"
            )
        self.model = model.eval()
        self.shape = shape
        self.decoder = model.model
        self.layers = list(self.decoder.layers)
        attn = self.layers[0].self_attn
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = attn.head_dim
        self.group = self.num_heads // self.num_kv_heads
        self.scaling = attn.scaling
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype
        self.vocab_size = model.lm_head.out_features
        b, length = shape.batch_width, shape.segment_length
        cache_shape = (b, self.num_kv_heads, length, self.head_dim)
        self.keys = [torch.zeros(cache_shape, dtype=self.dtype, device=self.device)
                     for _ in self.layers]
        self.values = [torch.zeros(cache_shape, dtype=self.dtype, device=self.device)
                       for _ in self.layers]
        with torch.no_grad():
            positions = torch.arange(length, device=self.device)[None, :]
            probe = torch.zeros(1, dtype=self.dtype, device=self.device)
            cos, sin = self.decoder.rotary_emb(probe, positions)
        self.cos, self.sin = cos[0], sin[0]  # [L, head_dim]
        self.position = 0

    def reset(self) -> None:
        """Start a new group of rows at position 0 (the cache is overwritten, not cleared:
        positions past the current one are never read)."""
        self.position = 0

    @staticmethod
    def _rotate_half(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return torch.cat((-x[..., half:], x[..., :half]), dim=-1)

    @torch.no_grad()
    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row at the current position; return float32 logits [B, V]
        (NumPy in and out, as the integer engines' steppers)."""
        b, t = self.shape.batch_width, self.position
        if t >= self.shape.segment_length:
            raise RuntimeError("segment length exceeded: call reset() first")
        if tokens.shape != (b,):
            raise ValueError(f"expected {b} tokens, got shape {tuple(tokens.shape)}")
        tokens = torch.as_tensor(np.asarray(tokens, dtype=np.int64)).to(self.device)
        cos, sin = self.cos[t], self.sin[t]
        hidden = self.decoder.embed_tokens(tokens)  # [B, D]
        for index, layer in enumerate(self.layers):
            attn = layer.self_attn
            normed = layer.input_layernorm(hidden)
            q = attn.q_proj(normed).view(b, self.num_heads, self.head_dim)
            k = attn.k_proj(normed).view(b, self.num_kv_heads, self.head_dim)
            v = attn.v_proj(normed).view(b, self.num_kv_heads, self.head_dim)
            q = q * cos + self._rotate_half(q) * sin
            k = k * cos + self._rotate_half(k) * sin
            self.keys[index][:, :, t] = k
            self.values[index][:, :, t] = v
            past_k = self.keys[index][:, :, : t + 1]  # [B, Hkv, t+1, Dh]
            past_v = self.values[index][:, :, : t + 1]
            q = q.view(b, self.num_kv_heads, self.group, self.head_dim)
            scores = torch.matmul(q, past_k.transpose(-1, -2)).float() * self.scaling
            weights = torch.softmax(scores, dim=-1).to(self.dtype)  # [B, Hkv, G, t+1]
            context = torch.matmul(weights, past_v).reshape(b, self.num_heads * self.head_dim)
            hidden = hidden + attn.o_proj(context)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden))
        hidden = self.decoder.norm(hidden)
        logits = self.model.lm_head(hidden).float()
        self.position = t + 1
        return logits.cpu().numpy()
