"""int-v1/int-v2 as torch ops: the path for a CUDA GPU (``--device cuda``).

The same operations as the CPU engine (:mod:`llmarc.inference.integer`, NumPy and
compiled kernels), each written as elementwise torch ops that every IEEE 754 device
rounds alike, and the same exact integer sums, so an archive packed here is the archive
the CPU packs, bit for bit (spec/llm-codec.md §5).  The integer weights come from the
CPU engine's derivation (:func:`~llmarc.inference.integer.derive_linear`) one tensor at
a time and are kept as int8 on the device (a quarter of float32: LLaMA-7B's 6.5 G
weights take 6.5 GB), widened to float32 one chunk at a time for the GEMMs.

Performance traps in PyTorch that would break the contract, and are avoided here:
``scalar / tensor`` is computed as ``reciprocal(tensor) * scalar``, and on CUDA
``tensor / scalar`` as ``tensor * (1 / scalar)`` (two roundings each: the first GPU run
found archives that differed from the CPU's by one bit of a quantization scale), so every
division is :func:`_div` of two tensors on the device; ``addcmul``/``lerp`` may fuse
into an FMA; TF32 and reduced-precision reductions are off on CUDA
(:func:`llmarc.model.loader.configure_determinism`; int8 values are exact in TF32 anyway).
On the CPU (``device="cpu"``) the same code runs too: the tests and ``make portability``
check it against the CPU engine there; ``benchmarks/gpu_roundtrip.py`` on a GPU.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from llmarc.entropy.quantize import LOG2E_SCALED, WEIGHTS
from llmarc.inference.constants import (
    EXP_ONE,
    LINEAR_LEVELS,
    MAX_EXP_INDEX,
    NORM_BITS,
    RESIDUAL_BITS,
)
from llmarc.inference.exact_product import FP32_EXACT_CHUNK
from llmarc.inference.integer import (
    ATTENTION_LEVELS,
    derive_linear,
    dimensions,
    layer_parts,
)
from llmarc.inference.rope import rope_tables

F64 = torch.float64


def _div(numerator: torch.Tensor | float, denominator: torch.Tensor | float) -> torch.Tensor:
    """IEEE division, a Python number on either side made a tensor on the other's device
    first: PyTorch computes ``float / tensor`` as a rounded reciprocal times the float,
    and its CUDA kernel ``tensor / float`` as the tensor times a rounded ``1 / float``."""
    if not isinstance(numerator, torch.Tensor):
        assert isinstance(denominator, torch.Tensor)
        numerator = torch.full_like(denominator, numerator)
    elif not isinstance(denominator, torch.Tensor):
        denominator = torch.full_like(numerator, denominator)
    return torch.div(numerator, denominator)


def quantize_rows(values: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row symmetric quantization: (q, scale) with q integers in [-levels, levels].

    a = max|v| over the last axis; c = levels / a; q = round_half_even(v * c);
    scale = a / levels.  A zero row gives q = 0, scale = 0."""
    peak = values.abs().amax(dim=-1, keepdim=True)
    safe = torch.where(peak > 0, peak, torch.ones_like(peak))
    factor = _div(float(levels), safe)
    q = torch.round(values * factor)
    scale = _div(peak, float(levels))
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


def silu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x) with e^-|x| from the exponential table: w = WEIGHTS[floor(|x| K)],
    sigmoid = 2^31 / (2^31 + w) for x >= 0, w / (2^31 + w) for x < 0."""
    w = exp_weights(torch.floor(x.abs() * LOG2E_SCALED))
    denominator = w + EXP_ONE
    numerator = torch.where(x >= 0, torch.full_like(w, EXP_ONE), w)
    return x * _div(numerator, denominator)


def chunked_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b exactly for integer operands of at most 127 in magnitude (any float or int
    dtype, b [..., inner, out]): fp32 GEMMs over inner chunks of :data:`FP32_EXACT_CHUNK`
    (every partial sum below 2^24), added up in float64 (exact: each is an integer
    below 2^24)."""
    inner = a.shape[-1]
    total: torch.Tensor | None = None
    for begin in range(0, inner, FP32_EXACT_CHUNK):
        end = begin + FP32_EXACT_CHUNK
        part = torch.matmul(a[..., begin:end].to(torch.float32),
                            b[..., begin:end, :].to(torch.float32)).to(F64)
        total = part if total is None else total.add_(part)
    assert total is not None
    return total


@dataclass
class TorchLinear:
    """int8 weights [in, out] on the device and a float64 scale per output channel."""

    weight: torch.Tensor
    scale: torch.Tensor

    @classmethod
    def derive(cls, device: Any, *weights: np.ndarray) -> TorchLinear:
        """The layer of float32 weights [out, in] (several side by side as one), derived
        on the CPU by :func:`derive_linear` and moved to ``device`` as int8."""
        parts = [derive_linear(weight) for weight in weights]
        rows = np.concatenate([p[0] for p in parts])
        scale = np.concatenate([p[1] for p in parts])
        return cls(torch.from_numpy(rows).to(device).t(), torch.from_numpy(scale).to(device))

    def __call__(self, q: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        """y = acc * (row_scale * scale): the real-valued output for input q * row_scale."""
        return torch.mul(chunked_product(q, self.weight), row_scale * self.scale)

    def add_to_residual(self, q: torch.Tensor, row_scale: torch.Tensor,
                        h: torch.Tensor) -> torch.Tensor:
        """h + round_half_even(self(q, row_scale) * 2^24), h updated in place."""
        return h.add_(self(q, row_scale).mul_(float(1 << RESIDUAL_BITS)).round_())


@dataclass
class TorchLayer:
    input_norm: torch.Tensor  # float64 [D] (float32 values)
    qkv_proj: TorchLinear
    o_proj: TorchLinear
    post_norm: torch.Tensor
    gate_up_proj: TorchLinear
    down_proj: TorchLinear


class TorchIntegerModel:
    """The integer model on a torch device, with the CPU engine's interface: NumPy
    tokens in, float32 NumPy logits out."""

    def __init__(self, model: Any, max_length: int, device: Any,
                 attention_levels: int = ATTENTION_LEVELS["int-v1"]) -> None:
        config = model.architecture
        self.hidden, self.num_heads, self.num_kv_heads, self.head_dim, self.eps = \
            dimensions(config)
        self.group = self.num_heads // self.num_kv_heads
        self.device = torch.device(str(device))
        self.device_type = self.device.type
        self.attention_levels = attention_levels

        def tensor(name: str) -> torch.Tensor:
            return torch.from_numpy(model.tensor(name)).to(self.device)

        def norm(name: str) -> torch.Tensor:
            return tensor(name).to(F64)

        self.embedding = tensor("model.embed_tokens.weight")
        linear = functools.partial(TorchLinear.derive, self.device)
        self.layers = [TorchLayer(**layer_parts(model, index, linear, norm))
                       for index in range(config.num_hidden_layers)]
        self.final_norm = norm("model.norm.weight")
        self.lm_head = TorchLinear.derive(self.device, model.tensor("lm_head.weight"))
        self.vocab_size = config.vocab_size
        self.rope_base = float(config.rope_theta)
        self.extend(max_length)
        width = torch.tensor([float(self.head_dim)], dtype=F64, device=self.device)
        self.attention_scale = _div(1.0, torch.sqrt(width))  # 1/sqrt(head_dim)

    def with_attention_levels(self, levels: int) -> TorchIntegerModel:
        other = copy.copy(self)
        other.attention_levels = levels
        return other

    def extend(self, max_length: int) -> None:
        cos, sin = rope_tables(self.rope_base, self.head_dim, max_length)
        self.cos = torch.tensor(cos, device=self.device)  # [L, head_dim/2]
        self.sin = torch.tensor(sin, device=self.device)
        self.max_length = max_length

    def stepper(self, width: int, length: int) -> TorchStepper:
        return TorchStepper(self, width, length)

    # ------------------------------------------------------------------ the operations
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
        mean = _div(squares * power_of_two(2 * shift - 2 * RESIDUAL_BITS), float(h.shape[-1]))
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

    def qkv(
        self, layer: TorchLayer, h: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Quantized rotated queries, keys and values of rows h [..., T, D].

        Returns (q, q_scale*attention_scale, k, k_scale, v, v_scale), q/k/v as integers
        [..., T, heads, head_dim], scales [..., T, heads, 1]."""
        q, scale = self.norm_quantized(h, layer.input_norm)
        shape = h.shape[:-1]
        fused = layer.qkv_proj(q, scale)
        width_q = self.num_heads * self.head_dim
        width_kv = self.num_kv_heads * self.head_dim
        queries = fused[..., :width_q].reshape(*shape, self.num_heads, self.head_dim)
        keys = fused[..., width_q : width_q + width_kv].reshape(
            *shape, self.num_kv_heads, self.head_dim)
        values = fused[..., width_q + width_kv :].reshape(
            *shape, self.num_kv_heads, self.head_dim)
        levels = self.attention_levels
        queries, query_scale = quantize_rows(self.rotate(queries, positions), levels)
        keys, key_scale = quantize_rows(self.rotate(keys, positions), levels)
        values, value_scale = quantize_rows(values, levels)
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
        scores = self._integer_matmul(q, keys.transpose(-1, -2)).view(n, self.num_heads, tq, -1)
        factor = query_scale * key_scale.repeat_interleave(g, dim=1)[:, :, None, :]
        z = scores * factor
        if mask is not None:
            z = z.masked_fill(~mask, float("-inf"))
        top = z.amax(dim=-1, keepdim=True)
        exponent = -torch.floor((z - top) * LOG2E_SCALED)  # >= 0; +inf where masked
        weights = exp_weights(exponent)
        p = weights * value_scale.repeat_interleave(g, dim=1)[:, :, None, :]
        u, p_scale = quantize_rows(p, self.attention_levels)
        u = u.view(n, self.num_kv_heads, g * tq, -1)
        context = self._integer_matmul(u, values).view(n, self.num_heads, tq, dh)
        context = _div(context * p_scale, weights.sum(dim=-1, keepdim=True))
        return context.transpose(1, 2).reshape(n, tq, self.num_heads * dh)

    def _integer_matmul(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """a @ b exactly for float64 tensors of attention integers: one float64 GEMM
        (int-v1: products below 2^30, sums below 2^53); for int-v2's 8-bit operands fp32
        GEMMs over inner chunks (sums below 2^24), added in float64: a GPU's float64
        rate is a small fraction of its fp32 one."""
        if self.attention_levels > LINEAR_LEVELS:
            return torch.matmul(a, b)
        return chunked_product(a, b)

    def attention(self, layer: TorchLayer, context: torch.Tensor, h: torch.Tensor
                  ) -> torch.Tensor:
        q, scale = quantize_rows(context, LINEAR_LEVELS)
        return layer.o_proj.add_to_residual(q, scale, h)

    def mlp(self, layer: TorchLayer, h: torch.Tensor) -> torch.Tensor:
        q, scale = self.norm_quantized(h, layer.post_norm)
        both = layer.gate_up_proj(q, scale)
        width = both.shape[-1] // 2
        q, scale = quantize_rows(silu(both[..., :width]) * both[..., width:], LINEAR_LEVELS)
        return layer.down_proj.add_to_residual(q, scale, h)

    #: Rows of the lm_head computed at a time (bounds the float64 temporaries).
    LOGIT_ROWS = 64

    def lm_head_logits(self, q: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
        """float32 logits [..., V] (NumPy, on the host) of the final norm's quantized rows."""
        shape = q.shape[:-1]
        q = q.reshape(-1, q.shape[-1])
        scale = scale.reshape(-1, 1)
        out = torch.empty(q.shape[0], self.vocab_size, dtype=torch.float32, device=q.device)
        for begin in range(0, q.shape[0], self.LOGIT_ROWS):
            chunk = slice(begin, begin + self.LOGIT_ROWS)
            out[chunk] = self.lm_head(q[chunk], scale[chunk])
        return out.view(*shape, self.vocab_size).cpu().numpy()

    # ------------------------------------------------------------------ whole rows
    @torch.no_grad()
    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        """float32 logits [N, T, V] for rows of tokens [N, T] fed at positions 0..T-1."""
        q, scale = self.final_rows(tokens)
        return self.lm_head_logits(q, scale)

    @torch.no_grad()
    def final_rows(self, tokens: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """The final norm's quantized rows (q [N, T, D], scale [N, T]) on the device."""
        h = self.layers_over(tokens)
        q, scale = self.norm_quantized(h, self.final_norm)
        return q, scale.view(*h.shape[:2])

    def layers_over(self, tokens: np.ndarray, keep: KeepKeys | None = None) -> torch.Tensor:
        """The residual rows h [N, T, D] after every layer, for rows of tokens [N, T] fed
        at positions 0..T-1; ``keep(layer index, k, ks, v, vs)`` sees each layer's
        quantized keys and values (a stepper's prefill stores them in its caches)."""
        feed = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=self.device)
        t = feed.shape[1]
        if t > self.max_length:
            raise ValueError(f"{t} positions exceed the engine's {self.max_length}")
        positions = torch.arange(t, device=self.device)
        h = self.embed(feed)
        mask = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()
        for index, layer in enumerate(self.layers):
            q, qs, k, ks, v, vs = self.qkv(layer, h, positions)
            if keep is not None:
                keep(index, k, ks, v, vs)
            context = self.attend(
                q.transpose(1, 2), qs.transpose(1, 2), k.transpose(1, 2),
                ks.squeeze(-1).transpose(1, 2), v.transpose(1, 2),
                vs.squeeze(-1).transpose(1, 2), mask,
            )
            h = self.mlp(layer, self.attention(layer, context, h))
        return h


#: What :meth:`TorchIntegerModel.layers_over` hands a caller per layer: (index, keys
#: [N, T, Hkv, Dh], their scales [N, T, Hkv, 1], values, their scales).
KeepKeys = Callable[[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


class TorchStepper:
    """The decoder's side on the device: ``width`` rows one position per :meth:`step`,
    over integer key/value caches that grow with the positions stepped."""

    START = 64

    def __init__(self, model: TorchIntegerModel, width: int, length: int) -> None:
        if length > model.max_length:
            raise ValueError(f"{length} positions exceed the engine's {model.max_length}")
        self.model, self.width, self.length = model, width, length
        self.position = 0
        self.capacity = 0
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.key_scales: list[torch.Tensor] = []
        self.value_scales: list[torch.Tensor] = []
        self._grow(min(length, self.START))

    def _grow(self, positions: int) -> None:
        model = self.model
        dtype = torch.int8 if model.attention_levels <= LINEAR_LEVELS else torch.int16
        shape = (self.width, model.num_kv_heads, positions)

        def grown(old: list[torch.Tensor], tail: tuple[int, ...], kind: torch.dtype
                  ) -> list[torch.Tensor]:
            out = []
            for index in range(len(model.layers)):
                new = torch.zeros(shape + tail, dtype=kind, device=model.device)
                if old:
                    new[:, :, : old[index].shape[2]] = old[index]
                out.append(new)
            return out

        self.keys = grown(self.keys, (model.head_dim,), dtype)
        self.values = grown(self.values, (model.head_dim,), dtype)
        self.key_scales = grown(self.key_scales, (), F64)
        self.value_scales = grown(self.value_scales, (), F64)
        self.capacity = positions

    def reset(self) -> None:
        self.position = 0

    @torch.no_grad()
    def prefill(self, tokens: np.ndarray) -> None:
        """Feed known tokens [width, T] at positions 0 .. T-1 in one pass, as T
        :meth:`step` calls would (the caches get the same quantized keys and values),
        without their logits: a decoder's context (spec/llm-codec.md §3.4)."""
        width, count = np.shape(tokens)
        if self.position or width != self.width or count > self.length:
            raise ValueError("prefill: a fresh stepper and at most its length per row")
        while self.capacity < count:
            self._grow(min(self.length, max(2 * self.capacity, count)))

        self.model.layers_over(tokens, functools.partial(self._store, slice(0, count)))
        self.position = count

    def _store(self, positions: slice, index: int, k: torch.Tensor, ks: torch.Tensor,
               v: torch.Tensor, vs: torch.Tensor) -> None:
        """Layer ``index``'s quantized keys and values of ``positions`` (k, v [width, T,
        Hkv, Dh], their scales [width, T, Hkv, 1]) into the caches: one position per
        :meth:`step`, a context's at once in :meth:`prefill`."""
        self.keys[index][:, :, positions] = k.transpose(1, 2).to(self.keys[index].dtype)
        self.values[index][:, :, positions] = v.transpose(1, 2).to(self.values[index].dtype)
        self.key_scales[index][:, :, positions] = ks[..., 0].transpose(1, 2)
        self.value_scales[index][:, :, positions] = vs[..., 0].transpose(1, 2)

    @torch.no_grad()
    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row at the current position; float32 logits [width, V]."""
        model, t = self.model, self.position
        if t >= self.length:
            raise RuntimeError("segment length exceeded: call reset() first")
        if t >= self.capacity:
            self._grow(min(self.length, 2 * self.capacity))
        positions = torch.tensor([t], device=model.device)
        feed = torch.as_tensor(np.asarray(tokens, dtype=np.int64), device=model.device)
        h = model.embed(feed)[:, None, :]  # [B, 1, D]
        for index, layer in enumerate(model.layers):
            q, qs, k, ks, v, vs = model.qkv(layer, h, positions)
            self._store(slice(t, t + 1), index, k, ks, v, vs)
            context = model.attend(
                q.transpose(1, 2), qs.transpose(1, 2),
                self.keys[index][:, :, : t + 1].to(F64), self.key_scales[index][:, :, : t + 1],
                self.values[index][:, :, : t + 1].to(F64),
                self.value_scales[index][:, :, : t + 1], None,
            )
            h = model.mlp(layer, model.attention(layer, context, h))
        q, scale = model.norm_quantized(h, model.final_norm)
        self.position = t + 1
        return model.lm_head_logits(q, scale)[:, 0]
