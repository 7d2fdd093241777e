"""The portable engines ``int-v1`` and ``int-v2``: logits that are the same bit for bit on
every machine.

A float engine's logits depend on the order in which a BLAS, a CPU generation or a GPU
adds things up, so an archive made on one machine may not open on another.  This engine
computes every number that feeds the frequency tables with operations whose result is
fixed by their inputs alone (spec/llm-codec.md §5 defines each one):

* every *sum* is a sum of integers whose partial sums are exactly representable, so the
  order of addition cannot matter: the linear layers multiply int8 weights by int8 (or
  int16) activations, the attention multiplies int16 by int16 (int-v1) or int8 by int8
  (int-v2, the only difference between the two: :data:`ATTENTION_LEVELS`);
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

This module holds those operations as torch ops (the quantizer, powers of two, the
exponential weights, :class:`IntLinear` and :class:`IntLayer`, the exact GEMM helpers)
and :class:`IntegerModel`: the derivation of the integer weights from a float model and
the forward pass over whole rows (prefill), which on the CPU runs through the compiled
kernels of :mod:`llmarc.inference.kernels`.  The decoder's one-position steps are
:mod:`llmarc.inference.stepping`, the rotary tables :mod:`llmarc.inference.rope`, and the
numbers this module and the kernels share :mod:`llmarc.inference.constants`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from llmarc.entropy.quantize import LOG2E_SCALED, WEIGHTS
from llmarc.errors import ModelError
from llmarc.inference import vnni
from llmarc.inference.constants import (
    EXP_ONE,
    LINEAR_LEVELS,
    MAX_EXP_INDEX,
    NORM_BITS,
    RESIDUAL_BITS,
    WEIGHT_LEVELS,
)
from llmarc.inference.int8_gemm import int8_gemm_is_exact
from llmarc.inference.kernels import _LAZY, DOT_BLOCK, _kernels
from llmarc.inference.rope import rope_tables

#: Largest magnitude of quantized queries, keys, values and attention weights, per
#: engine (spec/llm-codec.md §5.6).  int-v2's int8 attention halves the decoder's cache
#: and makes the attention's integer sums int8 GEMMs (five times the float64 ones here).
ATTENTION_LEVELS = {"int-v1": 32767, "int-v2": 127}
#: Shapes (inner, outer) beside the linear layers' on which the int8 GEMM is proven
#: before int-v2's prefill attention uses it: q.k (inner: a head) and u.v (inner: keys).
ATTENTION_PROBE_KEYS = (128, 1024)
#: Inner-dimension chunk for which an fp32 GEMM of int8 values is exact: 127*127*1040 < 2^24.
FP32_EXACT_CHUNK = 1040
#: Up to this many rows, an int8 linear layer runs on the compiled kernel ``int8_rows``
#: (each weight row read once for all rows, at memory speed) instead of oneDNN's GEMM,
#: which spends more on dispatch and thread hand-offs than on arithmetic at 1-2 rows.
SMALL_GEMM_ROWS = 2
#: Weight storage off the CPU (the value 127 fits; widening to float32 is exact).
COMPACT_STORAGE = torch.int8
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
    _packed: Any = field(default=None, init=False, repr=False, compare=False)  # VNNI's
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

    def _accumulate(self, q: torch.Tensor, out: torch.Tensor | None = None,
                    stepping: bool = False) -> torch.Tensor:
        """The exact integer product, float32 when one chunk covers the inner dimension
        (every value is an integer below 2^24, so float32 holds it exactly), else float64;
        int32 from the int8 GEMM, written into ``out`` ([rows, outputs]) when given.
        ``stepping``: a decoder's step (see :meth:`few_rows`)."""
        inner = self.weight.shape[0]
        if self.int8_gemm:  # int32 sums, proven exact on this host
            rows = q.reshape(-1, inner).to(torch.int8)
            if self.few_rows(rows.shape[0], stepping):
                if out is None:
                    out = torch.empty(rows.shape[0], self.weight.shape[1], dtype=torch.int32)
                self.rows_product(rows.numpy(), out.numpy())
                return out.view(*q.shape[:-1], -1)
            if out is not None:
                return torch._int_mm(rows, self.weight, out=out)
            return torch._int_mm(rows, self.weight).view(*q.shape[:-1], -1)
        return _chunked_product(q, self.weight)

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

    def few_rows(self, rows: int, stepping: bool = False) -> bool:
        """Whether a product of ``rows`` rows goes to :meth:`rows_product`: oneDNN's GEMM
        is tuned for many rows.  The VNNI kernel serves only a decoder's steps (one row
        per segment): it packs the weights on first use (+134 MB for SmolLM2), which an
        encoder's occasional short segment or last block of logits would not repay."""
        return self.int8_gemm and (self._dot_rows(rows)
                                   or (stepping and self._vnni_rows(rows)))

    def _dot_rows(self, rows: int) -> bool:
        return rows <= SMALL_GEMM_ROWS and self.weight.shape[0] % DOT_BLOCK == 0

    def _vnni_rows(self, rows: int) -> bool:
        return rows <= vnni.MAX_ROWS and self.weight.shape[0] <= vnni.MAX_INNER \
            and vnni.available()

    def rows_product(self, q: Any, out: Any) -> None:
        """out = q @ w (NumPy int8 q [M, in], int32 out) by a compiled kernel for few
        rows: ``int8_rows`` up to SMALL_GEMM_ROWS, else the VNNI tiles of
        :mod:`llmarc.inference.vnni`."""
        if self._dot_rows(q.shape[0]):
            _kernels().int8_rows(q, self._rows_host, out)
        else:  # on torch's thread count, as the other kernels (see _kernels)
            parallel = _kernels(q.shape[0] * out.shape[1]).parallel
            vnni.kernel(parallel)(q, *self._vnni_packed, out)

    @property
    def _vnni_packed(self) -> tuple[Any, Any]:
        """The weights in the VNNI kernel's layout and their compensation, made on first
        use (a decoder's first step): only processes that step pay their memory, once
        even when several threads step at the same time."""
        if self._packed is None:  # the lock only until it exists: this is per GEMM call
            with _LAZY:
                if self._packed is None:
                    self._packed = vnni.pack(self._rows_host)
        return self._packed

    @functools.cached_property
    def _rows_host(self) -> Any:
        """The int8 weights as a NumPy [out, in] array (the storage the GEMM reads)."""
        return self.weight.t().numpy()

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

    def __init__(self, model: Any, max_length: int, device: Any = None,
                 attention_levels: int = ATTENTION_LEVELS["int-v1"]) -> None:
        """Derive the integer model from ``model``: a
        :class:`~llmarc.model.derived.DerivedModel` (or anything with its ``architecture``
        and ``tensor(name)``: float32 NumPy values under Hugging Face names), one weight
        at a time, so no float copy of the whole model is ever held."""
        config = model.architecture
        if config.model_type != "llama":
            raise ModelError(f"model type {config.model_type!r} is not supported by int-v1/v2")
        rope_type = (config.rope_scaling or {}).get("rope_type")
        if rope_type not in SUPPORTED_ROPE_TYPES:
            raise ModelError(f"rope type {rope_type!r} is not supported by int-v1/v2")
        if config.attention_bias or config.mlp_bias:
            raise ModelError("biased attention or MLP layers are not supported by int-v1/v2")
        if config.hidden_act != "silu":
            raise ModelError(f"activation {config.hidden_act!r} is not supported by int-v1/v2")
        self.hidden = config.hidden_size
        if self.hidden > 1 << 13:
            raise ModelError("int-v1/v2 support hidden sizes up to 8192")
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = config.head_dim
        self.group = self.num_heads // self.num_kv_heads
        self.eps = float(config.rms_norm_eps)
        #: N of the attention's quantizers: what makes this int-v1 or int-v2.
        self.attention_levels = attention_levels
        self.device = torch.device(device if device is not None else "cpu")

        def weight(name: str) -> torch.Tensor:
            return torch.from_numpy(model.tensor(name))

        self.embedding = weight("model.embed_tokens.weight").to(self.device)
        self._linear_shapes = _linear_shapes(config, self.head_dim)
        self.int8_gemm = self.device.type == "cpu" and int8_gemm_is_exact(self._linear_shapes)
        #: What the CPU kernels write quantized linear inputs as: the GEMM's operand type.
        self.activation_dtype = torch.int8 if self.int8_gemm else torch.float32

        def linear(name: str) -> IntLinear:
            return IntLinear.from_float(weight(name), self.device, self.int8_gemm)

        def norm(name: str) -> torch.Tensor:
            return weight(name).to(self.device, F64)

        self.layers = []
        for index in range(config.num_hidden_layers):
            prefix = f"model.layers.{index}."
            self.layers.append(IntLayer(
                input_norm=norm(prefix + "input_layernorm.weight"),
                q_proj=linear(prefix + "self_attn.q_proj.weight"),
                k_proj=linear(prefix + "self_attn.k_proj.weight"),
                v_proj=linear(prefix + "self_attn.v_proj.weight"),
                o_proj=linear(prefix + "self_attn.o_proj.weight"),
                post_norm=norm(prefix + "post_attention_layernorm.weight"),
                gate_proj=linear(prefix + "mlp.gate_proj.weight"),
                up_proj=linear(prefix + "mlp.up_proj.weight"),
                down_proj=linear(prefix + "mlp.down_proj.weight"),
            ))
            self.layers[-1].fuse()
        self.fused_kernels = self.device.type == "cpu"  # numba kernels; torch ops elsewhere
        self.final_norm = norm("model.norm.weight")
        self.lm_head = linear("lm_head.weight")
        self.vocab_size = config.vocab_size
        self.rope_base = float(config.rope_theta)
        self.extend(max_length)
        width = torch.tensor([float(self.head_dim)], dtype=F64, device=self.device)
        self.attention_scale = _div(1.0, torch.sqrt(width))  # 1/sqrt(head_dim)

    def with_attention_levels(self, levels: int) -> IntegerModel:
        """This model with another engine's attention quantizer (int-v1 or int-v2): a
        shallow copy sharing every weight, so one archive may hold members of both."""
        other = copy.copy(self)
        other.attention_levels = levels
        return other

    @property
    def int8_attention(self) -> bool:
        """Whether the prefill's attention sums are int8 GEMMs: int-v2's 8-bit operands
        on a host whose int8 GEMM is proven exact on the attention's shapes too."""
        return (self.attention_levels <= LINEAR_LEVELS and self.int8_gemm
                and int8_gemm_is_exact(self._attention_shapes))  # proven once per threads

    @property
    def _attention_shapes(self) -> list[tuple[int, int]]:
        return ([(self.head_dim, keys) for keys in ATTENTION_PROBE_KEYS]
                + [(keys, self.head_dim) for keys in ATTENTION_PROBE_KEYS])

    def exact_on_one_thread(self) -> bool:
        """Whether the int8 linear GEMMs are proven exact with one torch thread too, as
        :mod:`llmarc.inference.threads` runs them (the proof is per thread count:
        oneDNN may choose its kernel by it)."""
        if not self.int8_gemm:
            return True
        previous = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return int8_gemm_is_exact(self._linear_shapes)
        finally:
            torch.set_num_threads(previous)

    def extend(self, max_length: int) -> None:
        """Rotary tables for positions 0 .. max_length-1 (the weights stay as they are)."""
        cos, sin = rope_tables(self.rope_base, self.head_dim, max_length)
        self.cos = torch.tensor(cos, device=self.device)  # [L, head_dim/2]
        self.sin = torch.tensor(sin, device=self.device)
        self._cos_host, self._sin_host = cos, sin  # read-only NumPy, for the CPU kernels
        self.max_length = max_length

    # ------------------------------------------------------------------ row operations
    # The spec's operations as torch ops: the path off the CPU (a GPU), and the statement
    # the CPU kernels (the fused path below) must match bit for bit.
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

    def mlp(self, layer: IntLayer, h: torch.Tensor) -> torch.Tensor:
        q, scale = self.norm_quantized(h, layer.post_norm)
        assert layer.gate_up_proj is not None
        both = layer.gate_up_proj(q, scale)
        width = both.shape[-1] // 2
        q, scale = quantize_rows(silu(both[..., :width]) * both[..., width:], LINEAR_LEVELS)
        return layer.down_proj.add_to_residual(q, scale, h)

    #: Rows of the lm_head computed at a time: keeps the float64 temporaries of a
    #: [T, vocabulary] product in tens of megabytes instead of hundreds.
    LOGIT_ROWS = 64

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        q, scale = self.norm_quantized(h, self.final_norm)
        return self.lm_head_logits(q, scale)

    def lm_head_logits(self, q: torch.Tensor, scale: torch.Tensor,
                       work: Workspace | None = None) -> torch.Tensor:
        """float32 logits [..., V] of the final norm's quantized rows (q, scale).

        ``work``: a decoder's step, whose workspace holds the logits and the product
        (overwritten by the next step), so that no step allocates megabytes anew."""
        shape = q.shape[:-1]
        q = q.reshape(-1, q.shape[-1])
        scale = scale.reshape(-1, 1)
        rows, stepping = q.shape[0], work is not None
        product = None  # the int32 GEMM's output, reused per chunk
        if work is not None and self.fused_kernels:
            out = work.buffer("logits", (rows, self.vocab_size), torch.float32)[0]
            if self.lm_head.int8_gemm:
                product = work.buffer("logits_product", (min(rows, self.LOGIT_ROWS),
                                                         self.vocab_size), torch.int32)[0]
        else:
            out = torch.empty(rows, self.vocab_size, dtype=torch.float32, device=q.device)
        for begin in range(0, rows, self.LOGIT_ROWS):
            chunk = slice(begin, begin + self.LOGIT_ROWS)
            if self.fused_kernels:  # the float64 product rounded once to float32
                into = None if product is None else product[: len(q[chunk])]
                acc = self.lm_head._accumulate(q[chunk], into, stepping=stepping)
                self.lm_head._epilogue(acc, scale[chunk], out[chunk], "scaled")
            else:
                out[chunk] = self.lm_head(q[chunk], scale[chunk])
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
        GEMMs over inner chunks of :data:`FP32_EXACT_CHUNK` (sums below 2^24), added in
        float64: the path for GPUs, whose float64 rate is a small fraction of fp32's."""
        if self.attention_levels > LINEAR_LEVELS:
            return torch.matmul(a, b)
        return _chunked_product(a, b).to(F64)

    def attention(
        self, layer: IntLayer, context: torch.Tensor, h: torch.Tensor
    ) -> torch.Tensor:
        q, scale = quantize_rows(context, LINEAR_LEVELS)
        return layer.o_proj.add_to_residual(q, scale, h)

    # ------------------------------------------------------------------ the CPU path
    # The same operations, each layer as its four GEMMs with one compiled kernel between
    # each pair (spec order, one row at a time, in cache), into buffers made once: a
    # decoding step at batch width 1-2 was mostly the Python and dispatch overhead of
    # about forty small torch operations per layer.
    def forward_fused(
        self, h: torch.Tensor, positions: torch.Tensor, attend: AttendRows,
        work: Workspace,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Every layer over rows h [R, D] at ``positions`` [R] (h is updated in place);
        returns the final norm's quantized rows (q, scale) for :meth:`lm_head_logits`.
        ``attend(layer index, qkv [R, H + 2 Hkv, Dh], scales [R, H + 2 Hkv])`` gives the
        context rows [R, H * Dh] (float64) from the rotated, quantized queries, keys and
        values (int16 for int-v1, int8 for int-v2)."""
        inner = self.layers[0].down_proj.weight.shape[0]
        kernels = _kernels(h.shape[0] * 2 * inner)  # the widest kernel's elements
        h_host, at = h.numpy(), positions.numpy()
        norms = self._norms_host
        q, scale = work.quantized(self.hidden)
        context_q, context_scale = work.quantized(self.num_heads * self.head_dim)
        down_q, down_scale = work.quantized(inner)
        qkv, qkv_scale = work.qkv
        kernels.norm_quantize(h_host, norms[0], self.eps, q[1], scale[1])
        for index, layer in enumerate(self.layers):
            assert layer.qkv_proj is not None and layer.gate_up_proj is not None
            acc = work.product(layer.qkv_proj, q)
            kernels.qkv_rope(acc, scale[1], layer.qkv_proj._scale_host, at, self._cos_host,
                             self._sin_host, self.num_heads + self.num_kv_heads,
                             float(self.attention_levels), qkv[1], qkv_scale[1])
            context = attend(index, qkv, qkv_scale)
            kernels.quantize(context, float(LINEAR_LEVELS), context_q[1], context_scale[1])
            acc = work.product(layer.o_proj, context_q)
            kernels.residual_norm(acc, context_scale[1], layer.o_proj._scale_host, h_host,
                                  norms[2 * index + 1], self.eps, q[1], scale[1])
            acc = work.product(layer.gate_up_proj, q)
            kernels.swiglu_quantize(acc, scale[1], layer.gate_up_proj._scale_host,
                                    kernels.table, down_q[1], down_scale[1])
            acc = work.product(layer.down_proj, down_q)
            kernels.residual_norm(acc, down_scale[1], layer.down_proj._scale_host, h_host,
                                  norms[2 * index + 2], self.eps, q[1], scale[1])
        return q[0], scale[0]

    @functools.cached_property
    def _norms_host(self) -> list[Any]:
        """The norm weights in the order the CPU path applies them, as NumPy arrays:
        each layer's input and post-attention norms, then the final norm."""
        norms = [norm for layer in self.layers for norm in (layer.input_norm, layer.post_norm)]
        return [norm.numpy() for norm in [*norms, self.final_norm]]

    #: Query positions per block of :meth:`attend_causal`: block b's scores are a
    #: [heads, PREFILL_BLOCK, keys up to the block's end] float64 tensor (~10 MB at 1024).
    PREFILL_BLOCK = 128

    def attend_causal(self, qkv: torch.Tensor, qkv_scale: torch.Tensor) -> torch.Tensor:
        """The context rows [N, T, H * Dh] of whole rows (query j sees keys 0..j) from
        :meth:`forward_fused`'s qkv [N, T, H + 2 Hkv, Dh] and scales.  The two integer
        sums are GEMMs whose every result is exact whatever their order: int8 GEMMs
        (int32 sums) for int-v2 where proven exact, else float64 GEMMs (q.k and u.v are
        integers below 2^53); the kernel between them is the same sequence of binary64
        operations as the stepping kernel's.  Causal blocks of queries skip the keys no
        query of the block can see."""
        n, t = qkv.shape[:2]
        heads, kv, g, dh = self.num_heads, self.num_kv_heads, self.group, self.head_dim
        operand = torch.int8 if self.int8_attention else F64
        # [N, Hkv, g, T, Dh]: the g query heads that share a key head, as one GEMM operand
        queries = qkv[:, :, :heads].view(n, t, kv, g, dh).permute(0, 2, 3, 1, 4).to(operand)
        qs = (qkv_scale[:, :, :heads] * self.attention_scale).view(n, t, kv, g)
        qs = qs.permute(0, 2, 3, 1).contiguous()
        keys = qkv[:, :, heads : heads + kv].permute(0, 2, 1, 3).to(operand)  # [N, Hkv, T, Dh]
        values = qkv[:, :, heads + kv :].permute(0, 2, 1, 3).to(operand).contiguous()
        ks = qkv_scale[:, :, heads : heads + kv].transpose(1, 2).contiguous()  # [N, Hkv, T]
        vs = qkv_scale[:, :, heads + kv :].transpose(1, 2).contiguous()
        out = torch.empty(n, t, kv, g, dh, dtype=F64)
        kernels = _kernels(n * heads * t * t)
        for begin in range(0, t, self.PREFILL_BLOCK):
            end = min(t, begin + self.PREFILL_BLOCK)
            rows = end - begin
            block = queries[:, :, :, begin:end].reshape(n, kv, g * rows, dh)
            scores = _batched_product(block, keys[:, :, :end].transpose(-1, -2))
            weights = torch.empty(scores.shape, dtype=operand) if self.int8_attention else scores
            p_scale = torch.empty(n, kv, g, rows, dtype=F64)
            weight_sum = torch.empty(n, kv, g, rows, dtype=F64)
            kernels.causal_weights(
                scores.view(n, kv, g, rows, end).numpy(), qs[..., begin:end].numpy(),
                ks.numpy(), vs.numpy(), begin, kernels.table, float(self.attention_levels),
                weights.view(n, kv, g, rows, end).numpy(), p_scale.numpy(), weight_sum.numpy())
            context = _batched_product(weights, values[:, :, :end]).view(n, kv, g, rows, dh)
            context = _div(context.to(F64) * p_scale[..., None], weight_sum[..., None])
            out[:, begin:end] = context.permute(0, 3, 1, 2, 4)
        return out.view(n, t, heads * dh)

    # ------------------------------------------------------------------ whole rows
    @torch.no_grad()
    def prefill(self, tokens: torch.Tensor) -> torch.Tensor:
        """float32 logits [N, T, V] for rows of tokens [N, T] fed at positions 0..T-1."""
        q, scale = self.final_rows(tokens)
        return self.lm_head_logits(q, scale)

    @torch.no_grad()
    def final_rows(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The final norm's quantized rows (q [N, T, D], scale [N, T]) of rows of tokens
        [N, T] fed at positions 0..T-1: :meth:`lm_head_logits` of any slice of them gives
        those positions' logits, so an encoder holds the float32 logits of a few
        positions at a time, not of a whole batch (200 MB for 1,024 positions of a
        49,152-token vocabulary)."""
        n, t = tokens.shape
        if t > self.max_length:
            raise ValueError(f"{t} positions exceed the engine's {self.max_length}")
        positions = torch.arange(t, device=self.device)
        h = self.embed(tokens.to(self.device))
        if self.fused_kernels:
            rows = h.view(n * t, self.hidden)

            def attend(_index: int, qkv: tuple[torch.Tensor, Any],
                       scale: tuple[torch.Tensor, Any]) -> Any:
                context = self.attend_causal(qkv[0].view(n, t, *qkv[0].shape[1:]),
                                             scale[0].view(n, t, -1))
                return context.view(n * t, -1).numpy()

            q, scale = self.forward_fused(rows, positions.repeat(n), attend,
                                          Workspace(self, n * t))
            return q.view(n, t, -1), scale.view(n, t)
        mask = torch.ones(t, t, dtype=torch.bool, device=self.device).tril()
        for layer in self.layers:
            q, qs, k, ks, v, vs = self.qkv(layer, h, positions)
            context = self.attend(
                q.transpose(1, 2), qs.transpose(1, 2), k.transpose(1, 2),
                ks.squeeze(-1).transpose(1, 2), v.transpose(1, 2),
                vs.squeeze(-1).transpose(1, 2), mask,
            )
            h = self.mlp(layer, self.attention(layer, context, h))
        q, scale = self.norm_quantized(h, self.final_norm)
        return q, scale.view(n, t)


#: The attention of :meth:`IntegerModel.forward_fused`: (layer, qkv, scales) -> context
#: rows (float64, NumPy); qkv and scales as Workspace pairs (tensor, NumPy view).
AttendRows = Callable[[int, tuple[torch.Tensor, Any], tuple[torch.Tensor, Any]], Any]


def _chunked_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b exactly for integer operands of at most 127 in magnitude (any float or int
    dtype, b [..., inner, out]): fp32 GEMMs over inner chunks of :data:`FP32_EXACT_CHUNK`
    (every partial sum below 2^24); float32 when one chunk covers the inner dimension,
    else the chunks added in float64 (exact: each is an integer below 2^24)."""
    inner = a.shape[-1]
    if inner <= FP32_EXACT_CHUNK:
        return torch.matmul(a.to(torch.float32), b.to(torch.float32))
    total: torch.Tensor | None = None
    for begin in range(0, inner, FP32_EXACT_CHUNK):
        end = begin + FP32_EXACT_CHUNK
        part = torch.matmul(a[..., begin:end].to(torch.float32),
                            b[..., begin:end, :].to(torch.float32))
        total = part.to(F64) if total is None else total.add_(part)
    assert total is not None
    return total


def _batched_product(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b over the leading two axes: float64 by torch.matmul, int8 (int32 sums) by
    one ``torch._int_mm`` per matrix (it takes 2-D operands only)."""
    if a.dtype != torch.int8:
        return torch.matmul(a, b)
    out = torch.empty((*a.shape[:-1], b.shape[-1]), dtype=torch.int32)
    for i in range(a.shape[0]):
        for j in range(a.shape[1]):
            torch._int_mm(a[i, j], b[i, j], out=out[i, j])
    return out


class Workspace:
    """The CPU path's buffers for ``rows`` rows, made once per shape and reused by every
    layer (and, in a stepper, every step): each as a torch tensor (the GEMMs' operand or
    output) paired with a NumPy view of the same memory (the kernels' argument), so no
    step allocates or converts them again."""

    def __init__(self, model: IntegerModel, rows: int, stepping: bool = False) -> None:
        self.model, self.rows, self.stepping = model, rows, stepping
        self._buffers: dict[tuple[Any, ...], tuple[torch.Tensor, Any]] = {}
        total = model.num_heads + 2 * model.num_kv_heads
        self.qkv = (self.buffer("qkv", (rows, total, model.head_dim),
                                attention_dtype(model.attention_levels)),
                    self.buffer("qkv_scale", (rows, total), F64))

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype
               ) -> tuple[torch.Tensor, Any]:
        """(tensor, host view) of the buffer ``name``, made on first use."""
        key = (name, shape, dtype)
        if key not in self._buffers:
            tensor = torch.empty(shape, dtype=dtype)
            self._buffers[key] = (tensor, tensor.numpy())
        return self._buffers[key]

    def quantized(self, width: int) -> tuple[tuple[torch.Tensor, Any], tuple[torch.Tensor, Any]]:
        """((q, q_host), (scale, scale_host)): a linear layer's quantized input rows
        [rows, width] and their scales [rows], one pair per width."""
        return (self.buffer(f"q{width}", (self.rows, width), self.model.activation_dtype),
                self.buffer(f"scale{width}", (self.rows,), F64))

    def product(self, layer: IntLinear, q: tuple[torch.Tensor, Any]) -> Any:
        """The layer's exact integer product of the quantized rows ``q`` (tensor, host
        view) as a NumPy array: int32 into a reused buffer from the int8 weights (the
        compiled kernels of :meth:`IntLinear.rows_product` for few rows, else oneDNN's
        GEMM), or float32/float64 from the chunked fp32 GEMMs."""
        if not layer.int8_gemm:
            return layer._accumulate(q[0]).numpy()
        out, out_host = self.buffer("acc", (self.rows, layer.weight.shape[1]), torch.int32)
        if layer.few_rows(self.rows, self.stepping):
            layer.rows_product(q[1], out_host)
        else:
            torch._int_mm(q[0], layer.weight, out=out)
        return out_host


def attention_dtype(levels: int) -> torch.dtype:
    """The narrowest integer type of quantized attention operands: int8 for int-v2."""
    return torch.int8 if levels <= LINEAR_LEVELS else torch.int16


def silu(x: torch.Tensor) -> torch.Tensor:
    """x * sigmoid(x) with e^-|x| from the exponential table: w = WEIGHTS[floor(|x| K)],
    sigmoid = 2^31 / (2^31 + w) for x >= 0, w / (2^31 + w) for x < 0."""
    w = exp_weights(torch.floor(x.abs() * LOG2E_SCALED))
    denominator = w + EXP_ONE
    numerator = torch.where(x >= 0, torch.full_like(w, EXP_ONE), w)
    return x * _div(numerator, denominator)


def _linear_shapes(config: Any, head_dim: int) -> list[tuple[int, int]]:
    """(inner, outer) of every GEMM the model runs (fused q/k/v and gate/up)."""
    hidden, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    inter = config.intermediate_size
    return [(hidden, (heads + 2 * kv) * head_dim), (heads * head_dim, hidden),
            (hidden, 2 * inter), (inter, hidden), (hidden, config.vocab_size)]
