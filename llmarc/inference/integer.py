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
from typing import Any, ClassVar

import torch

from llmarc.entropy.quantize import LOG2E_SCALED, MIN_EXPONENT, WEIGHTS
from llmarc.errors import ModelError
from llmarc.inference.int8_gemm import int8_gemm_is_exact

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
#: Weight storage off the CPU (the value 127 fits; widening to float32 is exact).
COMPACT_STORAGE = torch.int8
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
    """A linear layer as int8 weights ([in, out]) and a binary64 scale per output channel.

    Three storages, one result (the exact integer product): on a CPU whose int8 GEMM is
    proven exact (:mod:`llmarc.inference.int8_gemm`), int8 in [out, in] layout, fed to
    ``torch._int_mm`` (int32 sums); on other CPUs float32 values read by chunked fp32
    GEMMs; on a GPU int8 (a quarter of the memory: LLaMA-7B's 6.5 G weights take 6.5 GB,
    not 26), widened to float32 one chunk at a time."""

    weight: torch.Tensor  # [in, out], integer values in [-127, 127]: float32 or int8
    scale: torch.Tensor  # float64 [out]
    int8_gemm: bool = False  # weight is an int8 view of [out, in] storage, for _int_mm
    #: Weight rows quantized per block in :meth:`from_float`.
    DERIVE_ROWS: ClassVar[int] = 4096

    @classmethod
    def from_float(cls, weight: torch.Tensor, device: Any, int8_gemm: bool = False
                   ) -> IntLinear:
        """w_q = round_half_even(w * (127 / max|w_row|)), scale = max|w_row| / 127.

        Rows are quantized a block at a time (each row on its own, so blocks change no
        value): the float64 temporaries of a 49,152-row lm_head stay at tens of MB."""
        rows = weight.shape[0]
        on_cpu = torch.device(device).type == "cpu"
        storage = torch.int8 if int8_gemm else torch.float32 if on_cpu else COMPACT_STORAGE
        q = torch.empty(weight.shape, dtype=storage)
        scale = torch.empty(rows, dtype=F64)
        for begin in range(0, rows, cls.DERIVE_ROWS):
            block = weight[begin : begin + cls.DERIVE_ROWS].detach()
            values, factor = quantize_rows(block.to(torch.float32).to(F64), WEIGHT_LEVELS)
            q[begin : begin + cls.DERIVE_ROWS] = values  # integers in [-127, 127]: exact
            scale[begin : begin + cls.DERIVE_ROWS] = factor.squeeze(-1)
        if int8_gemm:
            return cls(q.to(device).t(), scale.to(device), int8_gemm=True)
        return cls(q.t().contiguous().to(device), scale.to(device))

    def integer_product(self, q: torch.Tensor) -> torch.Tensor:
        """sum_j q_j * w_jk exactly (float64 result), for |q| <= 127.

        fp32 GEMMs over chunks of the inner dimension small enough that no partial sum
        can reach 2^24, added up in float64 (exact: each chunk sum is below 2^24)."""
        return self._accumulate(q).to(F64)

    def _accumulate(self, q: torch.Tensor) -> torch.Tensor:
        """The exact integer product, float32 when one chunk covers the inner dimension
        (every value is an integer below 2^24, so float32 holds it exactly), else float64."""
        inner = self.weight.shape[0]
        if self.int8_gemm:  # int32 sums, proven exact on this host
            rows = q.reshape(-1, inner).to(torch.int8)
            return torch._int_mm(rows, self.weight).view(*q.shape[:-1], -1)
        q32 = q.to(torch.float32)
        if inner <= FP32_EXACT_CHUNK:
            return torch.matmul(q32, self.weight.to(torch.float32))
        total: torch.Tensor | None = None
        for begin in range(0, inner, FP32_EXACT_CHUNK):
            part = torch.matmul(
                q32[..., begin : begin + FP32_EXACT_CHUNK],
                self.weight[begin : begin + FP32_EXACT_CHUNK].to(torch.float32),
            )
            if total is None:
                total = part.to(F64)
            else:
                total += part  # float64 += float32 integers: exact
        assert total is not None
        return total

    def __call__(self, q: torch.Tensor, row_scale: torch.Tensor) -> torch.Tensor:
        """y = acc * (row_scale * scale): the real-valued output for input q * row_scale.

        The multiply promotes a float32 accumulator to float64 inside the kernel (exact),
        then rounds once, as acc.to(float64) * factor would."""
        acc = self._accumulate(q)
        if acc.device.type != "cpu":
            return torch.mul(acc, row_scale * self.scale)
        out = torch.empty(acc.shape, dtype=F64)
        self._epilogue(acc, row_scale, out, "scaled")
        return out

    def _epilogue(self, acc: torch.Tensor, row_scale: torch.Tensor, out: torch.Tensor,
                  kind: str) -> None:
        """The CPU kernels after the GEMM: acc * (row_scale * scale) into ``out`` (any
        float dtype), or added to the residual stream ``out`` as round(y * 2^24)."""
        kernels = _kernels(acc.numel())
        cols = acc.shape[-1]
        getattr(kernels, kind)(
            acc.reshape(-1, cols).numpy(), row_scale.reshape(-1).contiguous().numpy(),
            self._scale_host, out.view(-1, cols).numpy())

    @functools.cached_property
    def _scale_host(self) -> Any:
        """The scales as a NumPy array for the CPU kernels (made once, not per call)."""
        return self.scale.contiguous().numpy()

    def add_to_residual(self, q: torch.Tensor, row_scale: torch.Tensor,
                        h: torch.Tensor) -> torch.Tensor:
        """h + round_half_even(self(q, row_scale) * 2^24), h updated in place."""
        acc = self._accumulate(q)
        if acc.device.type != "cpu":
            return h.add_(torch.mul(acc, row_scale * self.scale)
                          .mul_(float(1 << RESIDUAL_BITS)).round_())
        self._epilogue(acc, row_scale, h, "residual")
        return h


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
    #: q, k and v (and gate and up) side by side: one GEMM; each output column is the
    #: same exact integer sum as in its own layer, so fusing changes no value.
    qkv_proj: IntLinear | None = None
    gate_up_proj: IntLinear | None = None

    def fuse(self) -> None:
        """Replace q/k/v and gate/up by column views of one fused layer each."""
        self.qkv_proj = _fused(self.q_proj, self.k_proj, self.v_proj)
        self.q_proj, self.k_proj, self.v_proj = _split(
            self.qkv_proj, (self.q_proj, self.k_proj, self.v_proj))
        self.gate_up_proj = _fused(self.gate_proj, self.up_proj)
        self.gate_proj, self.up_proj = _split(self.gate_up_proj, (self.gate_proj, self.up_proj))


def _fused(*parts: IntLinear) -> IntLinear:
    scale = torch.cat([p.scale for p in parts])
    if parts[0].int8_gemm:  # keep the [out, in] storage
        return IntLinear(torch.cat([p.weight.t() for p in parts]).t(), scale, int8_gemm=True)
    return IntLinear(torch.cat([p.weight for p in parts], dim=1).contiguous(), scale)


def _split(fused: IntLinear, parts: tuple[IntLinear, ...]) -> tuple[IntLinear, ...]:
    views, begin = [], 0
    for part in parts:
        end = begin + part.weight.shape[1]
        views.append(IntLinear(fused.weight[:, begin:end], fused.scale[begin:end],
                               fused.int8_gemm))
        begin = end
    return tuple(views)


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
        self.int8_gemm = self.device.type == "cpu" and int8_gemm_is_exact(
            _linear_shapes(config, self.head_dim))
        #: What the CPU kernels write quantized linear inputs as: the GEMM's operand type.
        self.activation_dtype = torch.int8 if self.int8_gemm else torch.float32

        def linear(weight: torch.Tensor) -> IntLinear:
            return IntLinear.from_float(weight, self.device, self.int8_gemm)

        self.layers = [
            IntLayer(
                input_norm=_norm_weight(layer.input_layernorm, self.device),
                q_proj=linear(layer.self_attn.q_proj.weight),
                k_proj=linear(layer.self_attn.k_proj.weight),
                v_proj=linear(layer.self_attn.v_proj.weight),
                o_proj=linear(layer.self_attn.o_proj.weight),
                post_norm=_norm_weight(layer.post_attention_layernorm, self.device),
                gate_proj=linear(layer.mlp.gate_proj.weight),
                up_proj=linear(layer.mlp.up_proj.weight),
                down_proj=linear(layer.mlp.down_proj.weight),
            )
            for layer in decoder.layers
        ]
        for int_layer in self.layers:
            int_layer.fuse()
        self.fused_kernels = self.device.type == "cpu"  # numba kernels; torch ops elsewhere
        self.final_norm = _norm_weight(decoder.norm, self.device)
        self.lm_head = linear(model.lm_head.weight)
        self.vocab_size = model.lm_head.weight.shape[0]
        base = float(rope.get("rope_theta") or rope_params.get("rope_theta")
                     or getattr(config, "rope_theta", 10000.0))
        self.rope_base = base
        self.extend(max_length)
        width = torch.tensor([float(self.head_dim)], dtype=F64, device=self.device)
        self.attention_scale = _div(1.0, torch.sqrt(width))  # 1/sqrt(head_dim)

    def extend(self, max_length: int) -> None:
        """Rotary tables for positions 0 .. max_length-1 (the weights stay as they are)."""
        cos, sin = rope_tables(self.rope_base, self.head_dim, max_length)
        self.cos = torch.tensor(cos, device=self.device)  # [L, head_dim/2]
        self.sin = torch.tensor(sin, device=self.device)
        self._cos_host, self._sin_host = cos, sin  # read-only NumPy, for the CPU kernels
        self.max_length = max_length

    # ------------------------------------------------------------------ row operations
    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """h = round_half_even(E[token] * 2^24), float64 integers."""
        return torch.round(self.embedding[tokens].to(F64) * float(1 << RESIDUAL_BITS))

    def norm_quantized(
        self, h: torch.Tensor, weight: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """RMSNorm(h) * weight, quantized per row for a linear layer: (q, scale)."""
        if self.fused_kernels:
            rows = h.reshape(-1, h.shape[-1]).contiguous()
            q = torch.empty(rows.shape, dtype=self.activation_dtype)
            scale = torch.empty(rows.shape[0], dtype=F64)
            _kernels(rows.numel()).norm_quantize(rows.numpy(), weight.numpy(), self.eps, q.numpy(),
                                     scale.numpy())
            return q.view(h.shape), scale.view(*h.shape[:-1], 1)
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
        """h + round_half_even(y * 2^24); h and y are consumed (updated in place)."""
        return h.add_(y.mul_(float(1 << RESIDUAL_BITS)).round_())

    def mlp(self, layer: IntLayer, h: torch.Tensor) -> torch.Tensor:
        q, scale = self.norm_quantized(h, layer.post_norm)
        assert layer.gate_up_proj is not None
        both = layer.gate_up_proj(q, scale)
        width = both.shape[-1] // 2
        gate, up = both[..., :width], both[..., width:]
        if self.fused_kernels:
            kernels = _kernels(gate.numel() * 4)
            rows = gate.reshape(-1, width).contiguous()
            q = torch.empty(rows.shape, dtype=self.activation_dtype)
            scale = torch.empty(rows.shape[0], dtype=F64)
            kernels.swiglu_quantize(rows.numpy(), up.reshape(-1, width).contiguous().numpy(),
                                    kernels.table, q.numpy(), scale.numpy())
            q = q.view(*gate.shape)
            scale = scale.view(*gate.shape[:-1], 1)
        else:
            q, scale = quantize_rows(silu(gate) * up, LINEAR_LEVELS)
        return layer.down_proj.add_to_residual(q, scale, h)

    #: Rows of the lm_head computed at a time: keeps the float64 temporaries of a
    #: [T, vocabulary] product in tens of megabytes instead of hundreds.
    LOGIT_ROWS = 64

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        q, scale = self.norm_quantized(h, self.final_norm)
        shape = q.shape[:-1]
        q = q.reshape(-1, q.shape[-1])
        scale = scale.reshape(-1, 1)
        out = torch.empty(q.shape[0], self.vocab_size, dtype=torch.float32, device=q.device)
        for begin in range(0, q.shape[0], self.LOGIT_ROWS):
            end = begin + self.LOGIT_ROWS
            if self.fused_kernels:  # the float64 product rounded once to float32
                acc = self.lm_head._accumulate(q[begin:end])
                self.lm_head._epilogue(acc, scale[begin:end], out[begin:end], "scaled")
            else:
                out[begin:end] = self.lm_head(q[begin:end], scale[begin:end])
        return out.view(*shape, self.vocab_size)

    def qkv(
        self, layer: IntLayer, h: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, ...]:
        """Quantized rotated queries, keys and values of rows h [..., T, D].

        Returns (q, q_scale*attention_scale, k, k_scale, v, v_scale), q/k/v as integers
        [..., T, heads, head_dim], scales [..., T, heads, 1]."""
        q, scale = self.norm_quantized(h, layer.input_norm)
        shape = h.shape[:-1]
        assert layer.qkv_proj is not None
        fused = layer.qkv_proj(q, scale)
        if self.fused_kernels:
            return self._qkv_fused(fused, positions)
        width_q = self.num_heads * self.head_dim
        width_kv = self.num_kv_heads * self.head_dim
        queries = fused[..., :width_q].reshape(*shape, self.num_heads, self.head_dim)
        keys = fused[..., width_q : width_q + width_kv].reshape(
            *shape, self.num_kv_heads, self.head_dim)
        values = fused[..., width_q + width_kv :].reshape(
            *shape, self.num_kv_heads, self.head_dim)
        queries, query_scale = quantize_rows(self.rotate(queries, positions), ATTENTION_LEVELS)
        keys, key_scale = quantize_rows(self.rotate(keys, positions), ATTENTION_LEVELS)
        values, value_scale = quantize_rows(values, ATTENTION_LEVELS)
        query_scale = query_scale * self.attention_scale
        return queries, query_scale, keys, key_scale, values, value_scale

    def _qkv_fused(self, fused: torch.Tensor, positions: torch.Tensor
                   ) -> tuple[torch.Tensor, ...]:
        """:meth:`qkv` after the projection by the CPU kernels; q/k/v as int16."""
        kernels = _kernels(fused.numel() * 2)
        shape = fused.shape[:-1]
        rows = fused.reshape(-1, fused.shape[-1])
        count = rows.shape[0]
        heads, kv, dh = self.num_heads, self.num_kv_heads, self.head_dim
        rotated = heads + kv
        at = positions.to(torch.int64).repeat(count // positions.shape[0])
        out = torch.empty(count, rotated + kv, dh, dtype=torch.int16)
        scales = torch.empty(count, rotated + kv, dtype=F64)
        table_cos, table_sin = self._cos_host, self._sin_host
        kernels.rope_quantize(rows[:, : rotated * dh].view(count, rotated, dh).numpy(),
                              at.numpy(), table_cos, table_sin, True,
                              out[:, :rotated].numpy(), scales[:, :rotated].numpy())
        kernels.rope_quantize(rows[:, rotated * dh :].view(count, kv, dh).numpy(),
                              at.numpy(), table_cos, table_sin, False,
                              out[:, rotated:].numpy(), scales[:, rotated:].numpy())
        out = out.view(*shape, rotated + kv, dh)
        scales = scales.view(*shape, rotated + kv, 1)
        query_scale = scales[..., :heads, :] * self.attention_scale
        return (out[..., :heads, :], query_scale, out[..., heads:rotated, :],
                scales[..., heads:rotated, :], out[..., rotated:, :], scales[..., rotated:, :])

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

    def attend_rows(
        self,
        queries: torch.Tensor,  # [N, T, H, Dh] integers
        query_scale: torch.Tensor,  # [N, T, H, 1]
        keys: torch.Tensor,  # int16 [N, Hkv, L, Dh]
        key_scale: torch.Tensor,  # float64 [N, Hkv, L]
        values: torch.Tensor,  # int16 [N, Hkv, Dh, L]: d-major
        value_scale: torch.Tensor,  # float64 [N, Hkv, L]
        first: int,  # position of query 0: query j sees keys 0 .. first + j
    ) -> torch.Tensor:
        """:meth:`attend` by the fused CPU kernel, causal without a mask: the keys a
        query cannot see are never read (their exponential weight would be 0)."""
        n, t = queries.shape[:2]
        kernels = _kernels(n * t * self.num_heads * self.head_dim * (first + t))
        out = torch.empty(n, t, self.num_heads, self.head_dim, dtype=F64)
        kernels.attend(
            queries.to(torch.int16).contiguous().numpy(),
            query_scale.reshape(n, t, self.num_heads).contiguous().numpy(),
            keys.numpy(), key_scale.numpy(), values.numpy(), value_scale.numpy(),
            first, kernels.table, out.numpy(),
        )
        return out.view(n, t, self.num_heads * self.head_dim)

    #: Query positions per block of :meth:`attend_causal`: block b's scores are a
    #: [heads, PREFILL_BLOCK, keys up to the block's end] float64 tensor (~10 MB at 1024).
    PREFILL_BLOCK = 128

    def attend_causal(
        self,
        queries: torch.Tensor,  # int16 [N, T, H, Dh]
        query_scale: torch.Tensor,  # float64 [N, T, H, 1]
        keys: torch.Tensor,  # int16 [N, T, Hkv, Dh]
        key_scale: torch.Tensor,  # float64 [N, T, Hkv, 1]
        values: torch.Tensor,  # int16 [N, T, Hkv, Dh]
        value_scale: torch.Tensor,  # float64 [N, T, Hkv, 1]
    ) -> torch.Tensor:
        """:meth:`attend_rows` for whole rows (query j sees keys 0..j), with the two
        integer sums as float64 GEMMs: q.k (|products| < 2^30, 64 of them) and u.v
        (< 2^30 each, at most 2^13 of them) are integers below 2^53, so any GEMM's
        result is exact whatever its order; the kernel between them is the same
        sequence of binary64 operations as :meth:`attend_rows`'.  Causal blocks of
        queries skip the keys no query of the block can see."""
        n, t, heads, dh = queries.shape
        kv, g = self.num_kv_heads, self.group
        # [N, Hkv, g, T, Dh]: the g query heads that share a key head, as one GEMM operand
        q64 = queries.view(n, t, kv, g, dh).permute(0, 2, 3, 1, 4).to(F64)
        qs = query_scale.view(n, t, kv, g).permute(0, 2, 3, 1).contiguous()
        k64 = keys.permute(0, 2, 1, 3).to(F64)  # [N, Hkv, T, Dh]
        v64 = values.permute(0, 2, 1, 3).to(F64)
        ks = key_scale.view(n, t, kv).transpose(1, 2).contiguous()  # [N, Hkv, T]
        vs = value_scale.view(n, t, kv).transpose(1, 2).contiguous()
        out = torch.empty(n, t, kv, g, dh, dtype=F64)
        kernels = _kernels(n * heads * t * t)
        for begin in range(0, t, self.PREFILL_BLOCK):
            end = min(t, begin + self.PREFILL_BLOCK)
            rows = end - begin
            block = q64[:, :, :, begin:end].reshape(n, kv, g * rows, dh)
            scores = torch.matmul(block, k64[:, :, :end].transpose(-1, -2))
            p_scale = torch.empty(n, kv, g, rows, dtype=F64)
            weight_sum = torch.empty(n, kv, g, rows, dtype=F64)
            kernels.causal_weights(
                scores.view(n, kv, g, rows, end).numpy(), qs[..., begin:end].numpy(),
                ks.numpy(), vs.numpy(), begin, kernels.table, p_scale.numpy(),
                weight_sum.numpy())
            context = torch.matmul(scores, v64[:, :, :end]).view(n, kv, g, rows, dh)
            context = _div(context * p_scale[..., None], weight_sum[..., None])
            out[:, begin:end] = context.permute(0, 3, 1, 2, 4)
        return out.view(n, t, heads * dh)

    def attention(
        self, layer: IntLayer, context: torch.Tensor, h: torch.Tensor
    ) -> torch.Tensor:
        if self.fused_kernels:
            rows = context.reshape(-1, context.shape[-1])
            q = torch.empty(rows.shape, dtype=self.activation_dtype)
            scale = torch.empty(rows.shape[0], 1, dtype=F64)
            _kernels(rows.numel()).quantize(rows.numpy(), float(LINEAR_LEVELS), q.numpy(),
                                scale.view(-1).numpy())
        else:
            q, scale = quantize_rows(context, LINEAR_LEVELS)
        return layer.o_proj.add_to_residual(q, scale, h)

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
            if self.fused_kernels:
                context = self.attend_causal(q, qs, k, ks, v, vs)
                h = self.mlp(layer, self.attention(layer, context, h))
                continue
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



# ---------------------------------------------------------------------- fused kernels
# The attention of one query row and the SwiGLU product with its quantizer, compiled with
# numba (fastmath off: no FMA contraction, no reassociation; LLVM keeps every binary64
# operation as written).  They compute exactly the operations of spec/llm-codec.md §5 in
# its order, one row at a time and in cache, instead of a dozen passes over [heads, T, T]
# tensors.  Integer sums (q.k, u.v, the exponential weights) are int64: exact, so their
# order is free and LLVM may vectorize them.
_NUMBA: Any = None


#: Below this many elements of work a kernel runs on the calling thread: waking worker
#: threads costs more than it saves (milliseconds on a busy machine).
PARALLEL_WORK = 1 << 18


def _kernels(work: int = PARALLEL_WORK) -> Any:
    """The compiled kernels (compiled on first use, cached on disk by numba): the
    multi-threaded flavour for ``work`` elements or more when torch has several threads,
    else the single-threaded one.  Both compute the same values (rows are independent)."""
    global _NUMBA
    if _NUMBA is None:
        try:
            import numba
        except ImportError as exc:  # pragma: no cover - numba is in the llm extra
            raise ModelError("int-v1 needs numba: pip install 'llmarc[llm]'") from exc
        _NUMBA = _compile(numba)
    serial, parallel = _NUMBA
    if work < PARALLEL_WORK:
        return serial
    threads = min(torch.get_num_threads(), parallel.numba.config.NUMBA_NUM_THREADS)
    if threads <= 1:
        return serial
    if parallel.numba.get_num_threads() != threads:
        parallel.numba.set_num_threads(threads)
    return parallel


#: int16 products per vector step of the dot-product kernel (:func:`_int16_dot_blocks`).
DOT_BLOCK = 32


def _int16_dot_blocks(numba: Any) -> Any:
    """A numba intrinsic: the exact sum of ``32 * blocks`` int16 x int16 products (int64).

    Written in LLVM IR because numba's own code for this loop widens every product to
    int64 (one multiply-add per cycle).  The IR says what is exact and nothing more:
    products as int32 (|q|, |k| <= 32767: below 2^30), adjacent pairs added in int32
    (below 2^31), the pairs widened to int64 and summed in a vector accumulator, reduced
    once at the end.  LLVM maps the pair step to ``vpmaddwd`` where the CPU has it and to
    plain integer ops elsewhere; integer arithmetic has one answer on every target, so
    the result is the same everywhere.
    Measured here: 2.3x the plain loop for the 64-wide q.k of SmolLM2."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    lanes = DOT_BLOCK
    i16, i32, i64 = ir.IntType(16), ir.IntType(32), ir.IntType(64)
    half = ir.VectorType(i32, lanes // 2)
    wide = ir.VectorType(i64, lanes // 2)
    reduce_type = ir.FunctionType(i64, [wide])

    @intrinsic
    def dot_blocks(typingctx, a, ia, b, ib, blocks):  # pragma: no cover - code generation
        def codegen(context, builder, signature, args):
            a_data = context.make_array(signature.args[0])(context, builder, args[0]).data
            b_data = context.make_array(signature.args[2])(context, builder, args[2]).data

            def load(data, index):
                pointer = builder.bitcast(builder.gep(data, [index]),
                                          ir.VectorType(i16, lanes).as_pointer())
                return builder.sext(builder.load(pointer, align=2), ir.VectorType(i32, lanes))

            accumulator = cgutils.alloca_once_value(builder, ir.Constant(wide, None))
            with cgutils.for_range(builder, args[4]) as loop:
                offset = builder.mul(loop.index, ir.Constant(loop.index.type, lanes))
                products = builder.mul(load(a_data, builder.add(args[1], offset)),
                                       load(b_data, builder.add(args[3], offset)))
                even = ir.Constant(half, list(range(0, lanes, 2)))
                odd = ir.Constant(half, list(range(1, lanes, 2)))
                pairs = builder.add(builder.shuffle_vector(products, products, even),
                                    builder.shuffle_vector(products, products, odd))
                builder.store(builder.add(builder.load(accumulator), builder.sext(pairs, wide)),
                              accumulator)
            reduce = cgutils.get_or_insert_function(
                builder.module, reduce_type, f"llvm.vector.reduce.add.v{lanes // 2}i64")
            return builder.call(reduce, [builder.load(accumulator)])

        return types.int64(a, ia, b, ib, blocks), codegen

    return dot_blocks


def _compile(numba: Any) -> Any:
    import math
    import types

    import numpy as np

    log2e_scaled = float(LOG2E_SCALED)
    max_index = MAX_EXP_INDEX
    levels = float(ATTENTION_LEVELS)
    linear_levels = float(LINEAR_LEVELS)
    one = EXP_ONE
    residual_one = float(1 << RESIDUAL_BITS)
    residual_down = 2.0**-RESIDUAL_BITS
    residual_bits = RESIDUAL_BITS
    norm_bits = NORM_BITS

    dot_blocks = _int16_dot_blocks(numba)
    block = DOT_BLOCK

    @numba.njit(fastmath=False, nogil=True, cache=True)
    def weigh(z, count, top, v_scale, table):  # pragma: no cover
        # z[k] <- p_k = WEIGHTS[min(-floor((z_k - top) * K), 10240)] * v_scale[k] for
        # k < count; returns (sum of the weights as an integer, max p)
        total = 0
        peak = 0.0
        for k in range(count):
            e = -np.floor((z[k] - top) * log2e_scaled)
            if e > max_index:
                e = max_index
            w = table[np.int64(e)]
            total += w
            p = np.float64(w) * v_scale[k]
            z[k] = p
            if p > peak:
                peak = p
        return total, peak

    def attend(q, q_scale, keys, k_scale, values_t, v_scale, first, table, out):  # pragma: no cover
        # q int16 [N, T, H, Dh], q_scale f64 [N, T, H]; keys int16 [N, Hkv, L, Dh] and
        # values_t int16 [N, Hkv, Dh, L'] (d-major: u.v is a dot product along L; L' is L
        # rounded up to DOT_BLOCK), their scales f64 [N, Hkv, L]; query j sees keys
        # 0 .. first + j; out f64 [N, T, H, Dh].  One task per (row, key head): its keys
        # stay in cache for the heads sharing them.  u is zero past the visible keys, so
        # u.v runs over whole blocks (whatever values lie there, their products are 0).
        n_rows, t_rows, heads, dh = q.shape
        kv_heads = keys.shape[1]
        group = heads // kv_heads
        padded = values_t.shape[3]
        whole_blocks = dh % block == 0
        for r in numba.prange(n_rows * kv_heads):
            n = r // kv_heads
            kv = r % kv_heads
            key_rows = keys[n, kv]
            value_cols = values_t[n, kv]
            ks = k_scale[n, kv]
            vs = v_scale[n, kv]
            scores = np.empty((group, first + t_rows), dtype=np.float64)
            tops = np.empty(group, dtype=np.float64)
            u = np.zeros(value_cols.shape[1], dtype=np.int16)
            queries = np.empty((group, dh), dtype=np.int16)
            for j in range(t_rows):
                count = first + j + 1
                for g in range(group):
                    for d in range(dh):
                        queries[g, d] = q[n, j, kv * group + g, d]
                    tops[g] = -np.inf
                # q.k for the heads of the group, each key read once
                for k in range(count):
                    for g in range(group):
                        if whole_blocks:
                            acc = dot_blocks(queries, g * dh, key_rows, k * dh, dh // block)
                        else:
                            acc = 0
                            for d in range(dh):
                                acc += np.int64(queries[g, d]) * np.int64(key_rows[k, d])
                        zk = np.float64(acc) * (q_scale[n, j, kv * group + g] * ks[k])
                        scores[g, k] = zk
                        if zk > tops[g]:
                            tops[g] = zk
                for g in range(group):
                    h = kv * group + g
                    z = scores[g]
                    total, peak = weigh(z, count, tops[g], vs, table)
                    safe = peak if peak > 0.0 else 1.0
                    factor = levels / safe
                    p_scale = peak / levels
                    for k in range(count):
                        u[k] = np.int16(np.rint(z[k] * factor))
                    weight_sum = np.float64(total)
                    blocks = -(-count // block)
                    for d in range(dh):
                        context = dot_blocks(u, 0, value_cols, d * padded, blocks)
                        out[n, j, h, d] = (np.float64(context) * p_scale) / weight_sum

    def causal_weights(scores, q_scale, k_scale, v_scale, first, table, p_scale,
                       weight_sum):  # pragma: no cover
        # scores f64 [N, Hkv, g, T, K]: the exact q.k sums of queries first .. first+T-1
        # (query j sees keys 0 .. first + j), overwritten with the quantized weights u
        # (0 where a key is not visible); q_scale f64 [N, Hkv, g, T] (times 1/sqrt(Dh)),
        # k_scale, v_scale f64 [N, Hkv, L]; p_scale, weight_sum f64 [N, Hkv, g, T].
        # The operations of attend, in its order, for one query row each.
        n_rows, kv_heads, group, t_rows, width = scores.shape
        for r in numba.prange(n_rows * kv_heads * group * t_rows):
            n = r // (kv_heads * group * t_rows)
            kv = (r // (group * t_rows)) % kv_heads
            g = (r // t_rows) % group
            j = r % t_rows
            count = first + j + 1
            qs = q_scale[n, kv, g, j]
            row = scores[n, kv, g, j]
            top = -np.inf
            for k in range(count):
                zk = row[k] * (qs * k_scale[n, kv, k])
                row[k] = zk
                if zk > top:
                    top = zk
            total, peak = weigh(row, count, top, v_scale[n, kv], table)
            safe = peak if peak > 0.0 else 1.0
            factor = levels / safe
            for k in range(count):
                row[k] = np.rint(row[k] * factor)
            for k in range(count, width):
                row[k] = 0.0
            p_scale[n, kv, g, j] = peak / levels
            weight_sum[n, kv, g, j] = np.float64(total)

    def swiglu_quantize(gate, up, table, q_out, scale_out):  # pragma: no cover
        # gate, up f64 [R, I] (gate is overwritten); q_out [R, I] int8/f32; scale_out f64 [R]
        rows, width = gate.shape
        for r in numba.prange(rows):
            peak = 0.0
            for i in range(width):
                x = gate[r, i]
                e = np.floor(np.abs(x) * log2e_scaled)
                if e > max_index:
                    e = max_index
                w = np.float64(table[np.int64(e)])
                numerator = one if x >= 0.0 else w
                product = (x * (numerator / (w + one))) * up[r, i]
                gate[r, i] = product
                a = np.abs(product)
                if a > peak:
                    peak = a
            safe = peak if peak > 0.0 else 1.0
            factor = linear_levels / safe
            for i in range(width):
                q_out[r, i] = np.rint(gate[r, i] * factor)
            scale_out[r] = peak / linear_levels

    def scaled(acc, row_scale, col_scale, out):  # pragma: no cover
        # out[r, c] = acc[r, c] * (row_scale[r] * col_scale[c]), rounded to out's dtype
        rows, cols = acc.shape
        for r in numba.prange(rows):
            s = row_scale[r]
            for c in range(cols):
                out[r, c] = np.float64(acc[r, c]) * (s * col_scale[c])

    def residual(acc, row_scale, col_scale, h):  # pragma: no cover
        # h[r, c] += round_half_even(acc[r, c] * (row_scale[r] * col_scale[c]) * 2^24)
        rows, cols = acc.shape
        for r in numba.prange(rows):
            s = row_scale[r]
            for c in range(cols):
                y = np.float64(acc[r, c]) * (s * col_scale[c])
                h[r, c] = h[r, c] + np.rint(y * residual_one)

    def quantize(x, levels_, q_out, scale_out):  # pragma: no cover
        # quantize_rows: x f64 [R, C] -> q_out [R, C] (any dtype), scale_out f64 [R]
        rows, cols = x.shape
        for r in numba.prange(rows):
            peak = 0.0
            for c in range(cols):
                a = np.abs(x[r, c])
                if a > peak:
                    peak = a
            safe = peak if peak > 0.0 else 1.0
            factor = levels_ / safe
            for c in range(cols):
                q_out[r, c] = np.rint(x[r, c] * factor)
            scale_out[r] = peak / levels_

    def norm_quantize(h, weight, eps, q_out, scale_out):  # pragma: no cover
        # norm_quantized: RMSNorm(h) * weight quantized per row; q_out int8/f32, scale_out f64
        rows, cols = h.shape
        for r in numba.prange(rows):
            peak = 0.0
            for c in range(cols):
                a = np.abs(h[r, c])
                if a > peak:
                    peak = a
            exponent = math.frexp(peak)[1]
            shift = exponent - norm_bits
            if shift < 0:
                shift = 0
            down = math.ldexp(1.0, -shift)  # 2^-shift, exact
            squares = 0
            for c in range(cols):
                v = np.int64(np.floor(h[r, c] * down))
                squares += v * v
            mean = (np.float64(squares) * math.ldexp(1.0, 2 * shift - 2 * residual_bits)) \
                / np.float64(cols)
            root = np.sqrt(mean + eps)
            peak = 0.0
            for c in range(cols):
                a = np.abs(h[r, c] * weight[c])
                if a > peak:
                    peak = a
            safe = peak if peak > 0.0 else 1.0
            factor = linear_levels / safe
            for c in range(cols):
                q_out[r, c] = np.rint((h[r, c] * weight[c]) * factor)
            scale_out[r] = ((peak / linear_levels) * residual_down) / root

    def rope_quantize(x, positions, cos, sin, rotate, q_out, scale_out):  # pragma: no cover
        # x f64 [R, heads, Dh] (any strides); rotated at positions[R] when rotate, then
        # quantized per head to +-32767: q_out int16 [R, heads, Dh], scale_out f64 [R, heads]
        rows, heads, dh = x.shape
        half = dh // 2
        for r in numba.prange(rows):
            pos = positions[r]
            y = np.empty(dh, dtype=np.float64)
            for h in range(heads):
                if rotate:
                    for i in range(half):
                        a = x[r, h, i]
                        b = x[r, h, half + i]
                        c = cos[pos, i]
                        s = sin[pos, i]
                        y[i] = a * c - b * s
                        y[half + i] = b * c + a * s
                else:
                    for i in range(dh):
                        y[i] = x[r, h, i]
                peak = 0.0
                for i in range(dh):
                    a = np.abs(y[i])
                    if a > peak:
                        peak = a
                safe = peak if peak > 0.0 else 1.0
                factor = levels / safe
                for i in range(dh):
                    q_out[r, h, i] = np.int16(np.rint(y[i] * factor))
                scale_out[r, h] = peak / levels

    class Kernels:
        pass

    functions = (attend, causal_weights, swiglu_quantize, scaled, residual, quantize, norm_quantize,
                 rope_quantize)
    table = np.ascontiguousarray(WEIGHTS.astype(np.int64))
    flavours = []
    for parallel in (False, True):
        jit = numba.njit(parallel=parallel, fastmath=False, nogil=True, cache=True)
        kernels = Kernels()
        kernels.numba = numba
        kernels.table = table
        for function in functions:
            # a copy per flavour, named apart, so numba's disk cache keeps both
            copy = types.FunctionType(function.__code__, function.__globals__,
                                      function.__name__, function.__defaults__,
                                      function.__closure__)
            copy.__qualname__ = f"{function.__qualname__}_{'parallel' if parallel else 'serial'}"
            setattr(kernels, function.__name__, jit(copy))
        flavours.append(kernels)
    return tuple(flavours)


def _linear_shapes(config: Any, head_dim: int) -> list[tuple[int, int]]:
    """(inner, outer) of every GEMM the model runs (fused q/k/v and gate/up)."""
    hidden, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    inter = config.intermediate_size
    return [(hidden, (heads + 2 * kv) * head_dim), (heads * head_dim, hidden),
            (hidden, 2 * inter), (inter, hidden), (hidden, config.vocab_size)]


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
        #: the CPU kernel reads values d-major ([.., Dh, L]: u.v is a dot product along L)
        self.values_d_major = model.fused_kernels
        padded = -(-length // DOT_BLOCK) * DOT_BLOCK
        value_shape = ((width, model.num_kv_heads, model.head_dim, padded)
                       if self.values_d_major else shape)
        self.values = [torch.zeros(value_shape, dtype=torch.int16, device=device)
                       for _ in range(count)]
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
            if self.values_d_major:
                self.values[index][:, :, :, t] = v[:, 0].to(torch.int16)
            else:
                self.values[index][:, :, t] = v[:, 0].to(torch.int16)
            self.key_scales[index][:, :, t] = ks[:, 0, :, 0]
            self.value_scales[index][:, :, t] = vs[:, 0, :, 0]
            if model.fused_kernels:
                context = model.attend_rows(
                    q, qs, self.keys[index], self.key_scales[index], self.values[index],
                    self.value_scales[index], t)
                h = model.mlp(layer, model.attention(layer, context, h))
                continue
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


#: Fixed-point bits of the rotation recurrence in :func:`_rope_tables`.
ROPE_FIXED_BITS = 256


@functools.cache
def _rope_tables(base: float, head_dim: int, length: int) -> tuple[Any, Any]:
    """Position p's angle is p rotations by theta_i, carried out in 256-bit fixed point
    with Python integers: (c, s) <- (c*C1 - s*S1, s*C1 + c*S1) >> 256, from C1, S1 =
    cos, sin(theta_i) computed by mpmath at 320 bits.  Each step adds under 4 units of
    2^-256, so after 2^13 positions the error is below 2^-240, and ``c / 2^256`` (Python's
    int division is correctly rounded) is the binary64 nearest the exact cos(p theta_i)
    unless that lies within 2^-240 of a midpoint between two doubles: the same caveat as
    evaluating each value at high precision (spec §5.5), at a thirtieth of the time
    (65,536 mpmath cos/sin calls took ~2 s for a 1,024-position table)."""
    import mpmath
    import numpy as np

    half = head_dim // 2
    cos = np.empty((length, half), dtype=np.float64)
    sin = np.empty((length, half), dtype=np.float64)
    bits = ROPE_FIXED_BITS
    one = 1 << bits
    with mpmath.workprec(bits + 64):
        b = mpmath.mpf(base)  # the binary64 base is an exact rational
        for i in range(half):
            theta = mpmath.power(b, mpmath.mpf(-2 * i) / head_dim)
            step_cos = int(mpmath.nint(mpmath.cos(theta) * one))
            step_sin = int(mpmath.nint(mpmath.sin(theta) * one))
            c, s = one, 0
            column_cos, column_sin = [], []
            for _ in range(length):
                column_cos.append(c / one)
                column_sin.append(s / one)
                c, s = (c * step_cos - s * step_sin) >> bits, (s * step_cos + c * step_sin) >> bits
            cos[:, i] = column_cos
            sin[:, i] = column_sin
    cos.flags.writeable = False
    sin.flags.writeable = False
    return cos, sin
