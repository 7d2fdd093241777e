"""The portable engine ``int-v1``: logits that are the same bit for bit on every machine.

A float engine's logits depend on the order in which a BLAS, a CPU generation or a GPU
adds things up, so an archive made on one machine may not open on another.  This engine
computes every number that feeds the frequency tables with operations whose result is
fixed by their inputs alone (spec/llm-codec.md §5 defines each one):

* every *sum* is a sum of integers whose partial sums are exactly representable, so the
  order of addition cannot matter: the linear layers multiply int8 weights by int8 (or
  int16) activations, the attention multiplies int16 by int16;
* every other operation is one IEEE 754 binary64 operation (+, -, *, /, sqrt, floor,
  round-half-even, max) on its own, which every conforming CPU and GPU rounds the same
  way: elementwise, never fused, never reassociated;
* exp and sigmoid come from the integer table of spec/entropy.md §2.1, cos and sin from
  tables rounded from exact values (never a platform libm).

Because each row's numbers depend only on that row's tokens, a full forward pass over a
segment (the encoder's prefill) and one-token-at-a-time stepping (the decoder) give the
same logits, whatever the batch width, thread count, CPU ISA or BLAS.

Everything is float64 tensors holding either integers or the results of those single
operations.  The fp32 GEMM path is an optimisation of the exact integer product: an fp32
GEMM of int8-valued operands is exact while each partial sum stays below 2^24, so the
inner dimension is cut into chunks of at most :data:`FP32_EXACT_CHUNK`.

Performance traps in PyTorch that would break the contract, and are avoided here:
``scalar / tensor`` is computed as ``reciprocal(tensor) * scalar`` (two roundings), so
divisions always take two tensors; ``addcmul``/``lerp`` may fuse into an FMA; TF32 and
reduced-precision reductions are off on CUDA (int8 values are exact in TF32 anyway).
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch

from llmarc.entropy.quantize import LOG2E_SCALED, MIN_EXPONENT, WEIGHTS
from llmarc.errors import ModelError

#: Fractional bits of the residual stream: h is stored as the integer round(h * 2^24).
RESIDUAL_BITS = 24
#: RMSNorm squares the residual shifted down to at most this many bits (exact sums).
NORM_BITS = 20
#: Largest magnitude of a linear layer's quantized input, and of a weight.
LINEAR_LEVELS = 127
WEIGHT_LEVELS = 127
#: Largest magnitude of quantized queries, keys, values and attention weights.
ATTENTION_LEVELS = 32767
#: Inner-dimension chunk for which an fp32 GEMM of int8 values is exact: 127*127*1040 < 2^24.
FP32_EXACT_CHUNK = 1040
#: 2^31: the weight of the top score in the exponential table (EXP2_TABLE[0]).
EXP_ONE = float(1 << 31)
MAX_EXP_INDEX = -MIN_EXPONENT  # 10240: WEIGHTS[10240] == 0
SUPPORTED_ROPE_TYPES = ("default", None)

F64 = torch.float64


def _div(numerator: torch.Tensor | float, denominator: torch.Tensor) -> torch.Tensor:
    """IEEE division with both operands as tensors (``float / tensor`` is not IEEE in
    PyTorch: it multiplies by a rounded reciprocal)."""
    if not isinstance(numerator, torch.Tensor):
        numerator = torch.full_like(denominator, numerator)
    return torch.div(numerator, denominator)


def quantize_rows(values: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization: (q, scale) with q integers in [-levels, levels].

    a = max|v| over the last axis; c = levels / a; q = round_half_even(v * c);
    scale = a / levels.  A zero row gives q = 0, scale = 0."""
    peak = values.abs().amax(dim=-1, keepdim=True)
    safe = torch.where(peak > 0, peak, torch.ones_like(peak))
    factor = _div(float(levels), safe)
    q = torch.round(values * factor)
    scale = peak / float(levels)  # tensor / scalar is one IEEE division
    return q, scale


def power_of_two(exponent: torch.Tensor) -> torch.Tensor:
    """2^k as float64, built from its bit pattern (exact; no pow/ldexp from a libm)."""
    return ((exponent.to(torch.int64) + 1023) << 52).view(F64)


def exp_weights(exponent: torch.Tensor) -> torch.Tensor:
    """WEIGHTS[e] (~2^31 * 2^(-e/256)) for integer-valued e >= 0 (clamped to 10240)."""
    index = exponent.clamp(max=MAX_EXP_INDEX).to(torch.long)
    return _weights_on(str(exponent.device))[index]


@functools.cache
def _weights_on(device: str) -> torch.Tensor:
    return torch.from_numpy(WEIGHTS.astype("float64")).to(device)


@dataclass
class IntLinear:
    """A linear layer as int8 weights (float32 holding integers, [in, out]) and a
    binary64 scale per output channel."""

    weight: torch.Tensor  # float32 [in, out], integer values in [-127, 127]
    scale: torch.Tensor  # float64 [out]

    @classmethod
    def from_float(cls, weight: torch.Tensor, device: Any) -> IntLinear:
        """w_q = round_half_even(w * (127 / max|w_row|)), scale = max|w_row| / 127."""
        w = weight.detach().to(torch.float32).to(F64)  # bf16/fp16 -> fp32 is exact
        q, scale = quantize_rows(w, WEIGHT_LEVELS)
        return cls(q.to(torch.float32).t().contiguous().to(device), scale.squeeze(-1).to(device))

    def integer_product(self, q: torch.Tensor) -> torch.Tensor:
        """sum_j q_j * w_jk exactly (float64 result), for |q| <= 127.

        fp32 GEMMs over chunks of the inner dimension small enough that no partial sum
        can reach 2^24, added up in float64 (exact: each chunk sum is below 2^24)."""
        inner = self.weight.shape[0]
        q32 = q.to(torch.float32)
        total: torch.Tensor | None = None
        for begin in range(0, inner, FP32_EXACT_CHUNK):
            part = torch.matmul(
                q32[..., begin : begin + FP32_EXACT_CHUNK],
                self.weight[begin : begin + FP32_EXACT_CHUNK],
            ).to(F64)
            total = part if total is None else total + part
        assert total is not None
        return total

    def __call__(self, q: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        """y = acc * (row_scale * scale): the real-valued output for input q * row_scale."""
        return self.integer_product(q) * (row_scale * self.scale)


@dataclass
class IntLayer:
    input_norm: torch.Tensor  # float64 [D] (float32 values)
    q_proj: IntLinear
    k_proj: IntLinear
    v_proj: IntLinear
    o_proj: IntLinear
    post_norm: torch.Tensor
    gate_proj: IntLinear
    up_proj: IntLinear
    down_proj: IntLinear


class IntegerModel:
    """A LLaMA-family model derived into integer form, and its exact forward pass.

    Built once from the float weights (:meth:`from_float`); ``prefill`` computes the
    logits of whole rows at once, :class:`IntegerStepper` one position at a time; both
    give identical float32 logits."""

    def __init__(self, model: Any, max_length: int, device: Any = None) -> None:
        config = model.config
        if getattr(config, "model_type", None) != "llama":
            raise ModelError(f"model type {config.model_type!r} is not supported by int-v1")
        rope = getattr(config, "rope_scaling", None) or {}
        rope_params = getattr(config, "rope_parameters", None) or {}
        rope_type = rope.get("rope_type", rope.get("type")) or rope_params.get("rope_type")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelError(f"rope type {rope_type!r} is not supported by int-v1")
        if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
            raise ModelError("biased attention or MLP layers are not supported by int-v1")
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ModelError(f"activation {config.hidden_act!r} is not supported by int-v1")
        decoder = model.model
        self.hidden = config.hidden_size
        if self.hidden > 1 << 13:
            raise ModelError("int-v1 supports hidden sizes up to 8192")
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or self.hidden // self.num_heads
        self.group = self.num_heads // self.num_kv_heads
        self.eps = float(config.rms_norm_eps)
        self.device = torch.device(device) if device is not None else model.device
        self.embedding = decoder.embed_tokens.weight.detach().to(self.device, torch.float32)
        self.layers = [
            IntLayer(
                input_norm=_norm_weight(layer.input_layernorm, self.device),
                q_proj=IntLinear.from_float(layer.self_attn.q_proj.weight, self.device),
                k_proj=IntLinear.from_float(layer.self_attn.k_proj.weight, self.device),
                v_proj=IntLinear.from_float(layer.self_attn.v_proj.weight, self.device),
                o_proj=IntLinear.from_float(layer.self_attn.o_proj.weight, self.device),
                post_norm=_norm_weight(layer.post_attention_layernorm, self.device),
                gate_proj=IntLinear.from_float(layer.mlp.gate_proj.weight, self.device),
                up_proj=IntLinear.from_float(layer.mlp.up_proj.weight, self.device),
                down_proj=IntLinear.from_float(layer.mlp.down_proj.weight, self.device),
            )
            for layer in decoder.layers
        ]
        self.final_norm = _norm_weight(decoder.norm, self.device)
        self.lm_head = IntLinear.from_float(model.lm_head.weight, self.device)
        self.vocab_size = model.lm_head.weight.shape[0]
        base = float(rope.get("rope_theta") or rope_params.get("rope_theta")
                     or getattr(config, "rope_theta", 10000.0))
        cos, sin = rope_tables(base, self.head_dim, max_length)
        self.cos = torch.tensor(cos, device=self.device)  # [L, head_dim/2]
        self.sin = torch.tensor(sin, device=self.device)
        self.max_length = max_length
        width = torch.tensor([float(self.head_dim)], dtype=F64, device=self.device)
        self.attention_scale = _div(1.0, torch.sqrt(width))  # 1/sqrt(head_dim)

    # ------------------------------------------------------------------ row operations
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """h = round_half_even(E[token] * 2^24), float64 integers."""
        return torch.round(self.embedding[tokens].to(F64) * float(1 << RESIDUAL_BITS))

    def norm_quantized(
        self, h: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm(h) * weight, quantized per row for a linear layer: (q, scale)."""
        peak = h.abs().amax(dim=-1, keepdim=True)
        _mantissa, exponent = torch.frexp(peak)  # peak < 2^exponent (0 for peak 0)
        shift = (exponent.to(torch.int64) - NORM_BITS).clamp(min=0)
        reduced = torch.floor(h * power_of_two(-shift))
        squares = (reduced * reduced).sum(dim=-1, keepdim=True)  # exact: < 2^53
        mean = squares * power_of_two(2 * shift - 2 * RESIDUAL_BITS) / float(h.shape[-1])
        root = torch.sqrt(mean + self.eps)
        q, scale = quantize_rows(h * weight, LINEAR_LEVELS)
        return q, _div(scale * 2.0**-RESIDUAL_BITS, root)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of [..., T, heads, head_dim] at integer positions [T]."""
        half = self.head_dim // 2
        cos = self.cos[positions][:, None, :]  # [T, 1, half]
        sin = self.sin[positions][:, None, :]
        first, second = x[..., :half], x[..., half:]
        return torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)

    def residual_add(self, h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return h + torch.round(y * float(1 << RESIDUAL_BITS))

    def mlp(self, layer: IntLayer, h: torch.Tensor) -> torch.Tensor:
        q, scale = self.norm_quantized(h, layer.post_norm)
        gate = layer.gate_proj(q, scale)
        up = layer.up_proj(q, scale)
        product = silu(gate) * up
        q, scale = quantize_rows(product, LINEAR_LEVELS)
        return self.residual_add(h, layer.down_proj(q, scale))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        q, scale = self.norm_quantized(h, self.final_norm)
        return self.lm_head(q, scale).to(torch.float32)

    def qkv(
        self, layer: IntLayer, h: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Quantized rotated queries, keys and values of rows h [..., T, D].

        Returns (q, q_scale*attention_scale, k, k_scale, v, v_scale), q/k/v as integers
        [..., T, heads, head_dim], scales [..., T, heads, 1]."""
        q, scale = self.norm_quantized(h, layer.input_norm)
        shape = h.shape[:-1]
        queries = layer.q_proj(q, scale).view(*shape, self.num_heads, self.head_dim)
        keys = layer.k_proj(q, scale).view(*shape, self.num_kv_heads, self.head_dim)
        values = layer.v_proj(q, scale).view(*shape, self.num_kv_heads, self.head_dim)
        queries, query_scale = quantize_rows(self.rotate(queries, positions), ATTENTION_LEVELS)
        keys, key_scale = quantize_rows(self.rotate(keys, positions), ATTENTION_LEVELS)
        values, value_scale = quantize_rows(values, ATTENTION_LEVELS)
        query_scale = query_scale * self.attention_scale
        return queries, query_scale, keys, key_scale, values, value_scale

    def attend(
        self,
        queries: torch.Tensor,  # [N, H, Tq, Dh] integers
        query_scale: torch.Tensor,  # [N, H, Tq, 1]
        keys: torch.Tensor,  # [N, Hkv, Tk, Dh] integers
        key_scale: torch.Tensor,  # [N, Hkv, Tk]
        values: torch.Tensor,  # [N, Hkv, Tk, Dh] integers
        value_scale: torch.Tensor,  # [N, Hkv, Tk]
        mask: torch.Tensor | None,  # [Tq, Tk] bool, True where a key is visible
    ) -> torch.Tensor:
        """Context vectors [N, Tq, H * Dh] (real-valued binary64)."""
        n, _h, tq, dh = queries.shape
        g = self.group
        q = queries.reshape(n, self.num_kv_heads, g * tq, dh)
        scores = torch.matmul(q, keys.transpose(-1, -2)).view(n, self.num_heads, tq, -1)
        factor = query_scale * key_scale.repeat_interleave(g, dim=1)[:, :, None, :]
        z = scores * factor
        if mask is not None:
            z = z.masked_fill(~mask, float("-inf"))
        top = z.amax(dim=-1, keepdim=True)
        exponent = -torch.floor((z - top) * LOG2E_SCALED)  # >= 0; +inf where masked
        weights = exp_weights(exponent)
        p = weights * value_scale.repeat_interleave(g, dim=1)[:, :, None, :]
        u, p_scale = quantize_rows(p, ATTENTION_LEVELS)
        u = u.view(n, self.num_kv_heads, g * tq, -1)
        context = torch.matmul(u, values).view(n, self.num_heads, tq, dh)
        context = _div(context * p_scale, weights.sum(dim=-1, keepdim=True))
        return context.transpose(1, 2).reshape(n, tq, self.num_heads * dh)

    def attention(
        self, layer: IntLayer, context: torch.Tensor, h: torch.Tensor
    ) -> torch.Tensor:
        q, scale = quantize_rows(context, LINEAR_LEVELS)
        return self.residual_add(h, layer.o_proj(q, scale))

    # ------------------------------------------------------------------ whole rows
    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, T, V] for rows of tokens [N, T] fed at positions 0..T-1."""
        t = tokens.shape[1]
        if t > self.max_length:
            raise ValueError(f"{t} positions exceed the engine's {self.max_length}")
        positions = torch.arange(t, device=self.device)
        mask = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()
        h = self.embed(tokens.to(self.device))
        for layer in self.layers:
            q, qs, k, ks, v, vs = self.qkv(layer, h, positions)
            context = self.attend(
                q.transpose(1, 2), qs.transpose(1, 2), k.transpose(1, 2),
                ks.squeeze(-1).transpose(1, 2), v.transpose(1, 2),
                vs.squeeze(-1).transpose(1, 2), mask,
            )
            h = self.mlp(layer, self.attention(layer, context, h))
        return self.logits(h)


def silu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x) with e^-|x| from the exponential table: w = WEIGHTS[floor(|x| K)],
    sigmoid = 2^31 / (2^31 + w) for x >= 0, w / (2^31 + w) for x < 0."""
    w = exp_weights(torch.floor(x.abs() * LOG2E_SCALED))
    denominator = w + EXP_ONE
    numerator = torch.where(x >= 0, torch.full_like(w, EXP_ONE), w)
    return x * _div(numerator, denominator)


def _norm_weight(norm: Any, device: Any) -> torch.Tensor:
    return norm.weight.detach().to(torch.float32).to(device, F64)


class IntegerStepper:
    """The decoder's side: ``width`` rows advanced one position per :meth:`step`.

    The key/value cache holds the integer keys and values (int16) and their per-head
    scales, so a step only computes the new position; its logits equal prefill's."""

    def __init__(self, model: IntegerModel, width: int, length: int) -> None:
        if length > model.max_length:
            raise ValueError(f"{length} positions exceed the engine's {model.max_length}")
        self.model, self.width, self.length = model, width, length
        shape = (width, model.num_kv_heads, length, model.head_dim)
        count = len(model.layers)
        device = model.device
        self.keys = [torch.zeros(shape, dtype=torch.int16, device=device) for _ in range(count)]
        self.values = [torch.zeros(shape, dtype=torch.int16, device=device) for _ in range(count)]
        scale_shape = (width, model.num_kv_heads, length)
        self.key_scales = [torch.zeros(scale_shape, dtype=F64, device=device)
                           for _ in range(count)]
        self.value_scales = [torch.zeros(scale_shape, dtype=F64, device=device)
                             for _ in range(count)]
        self.position = 0

    def reset(self) -> None:
        self.position = 0

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row at the current position; float32 logits [width, V]."""
        model, t = self.model, self.position
        if t >= self.length:
            raise RuntimeError("segment length exceeded: call reset() first")
        positions = torch.tensor([t], device=model.device)
        h = model.embed(tokens.to(model.device))[:, None, :]  # [B, 1, D]
        for index, layer in enumerate(model.layers):
            q, qs, k, ks, v, vs = model.qkv(layer, h, positions)
            self.keys[index][:, :, t] = k[:, 0].to(torch.int16)
            self.values[index][:, :, t] = v[:, 0].to(torch.int16)
            self.key_scales[index][:, :, t] = ks[:, 0, :, 0]
            self.value_scales[index][:, :, t] = vs[:, 0, :, 0]
            context = model.attend(
                q.transpose(1, 2), qs.transpose(1, 2),
                self.keys[index][:, :, : t + 1].to(F64), self.key_scales[index][:, :, : t + 1],
                self.values[index][:, :, : t + 1].to(F64),
                self.value_scales[index][:, :, : t + 1], None,
            )
            h = model.mlp(layer, model.attention(layer, context, h))
        self.position = t + 1
        return model.logits(h)[:, 0]


def rope_tables(base: float, head_dim: int, length: int) -> tuple[Any, Any]:
    """cos and sin of p * base^(-2i/head_dim), rounded to the nearest binary64 from the
    exact real values (mpmath at 192 bits), for p < length, i < head_dim / 2."""
    return _rope_tables(float(base), head_dim, length)


@functools.cache
def _rope_tables(base: float, head_dim: int, length: int) -> tuple[Any, Any]:
    import mpmath
    import numpy as np

    half = head_dim // 2
    cos = np.empty((length, half), dtype=np.float64)
    sin = np.empty((length, half), dtype=np.float64)
    with mpmath.workprec(192):
        b = mpmath.mpf(base)  # the binary64 base is an exact rational
        for i in range(half):
            theta = mpmath.power(b, mpmath.mpf(-2 * i) / head_dim)
            for p in range(length):
                angle = p * theta
                cos[p, i] = float(mpmath.cos(angle))
                sin[p, i] = float(mpmath.sin(angle))
    cos.flags.writeable = False
    sin.flags.writeable = False
    return cos, sin
