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
"""

from __future__ import annotations

import copy
import functools
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch

from llmarc.entropy.quantize import LOG2E_SCALED, MIN_EXPONENT, WEIGHTS
from llmarc.errors import ModelError
from llmarc.inference import vnni
from llmarc.inference.int8_gemm import int8_gemm_is_exact

#: Fractional bits of the residual stream: h is stored as the integer round(h * 2^24).
RESIDUAL_BITS = 24
#: RMSNorm squares the residual shifted down to at most this many bits (exact sums).
NORM_BITS = 20
#: Largest magnitude of a linear layer's quantized input, and of a weight.
LINEAR_LEVELS = 127
WEIGHT_LEVELS = 127
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



# ---------------------------------------------------------------------- fused kernels
# The attention of one query row and the SwiGLU product with its quantizer, compiled with
# numba (fastmath off: no FMA contraction, no reassociation; LLVM keeps every binary64
# operation as written).  They compute exactly the operations of spec/llm-codec.md §5 in
# its order, one row at a time and in cache, instead of a dozen passes over [heads, T, T]
# tensors.  Integer sums (q.k, u.v, the exponential weights) are int64: exact, so their
# order is free and LLVM may vectorize them.  What keeps a loop from vectorizing, and
# how it is avoided without changing a value:
# * numba's Python error model tests every float divisor for zero (to raise
#   ZeroDivisionError), a branch per element: error_model="numpy" (no divisor here can
#   be zero: each is a peak > 0, 2^31 + w, a weight sum >= 2^31 or a count);
# * a lookup in the exponential table (LLVM emits no gathers here, and a hand-written
#   vpgatherqq was 2x slower than scalar loads): it gets a loop of its own, the arithmetic
#   around it goes in loops without one, and its index is cast to unsigned (a signed one
#   costs a test and a select per element for NumPy's negative indexes);
# * a float max (not reorderable without fast-math): the max of the int64 bit patterns,
#   whose order is the numbers' (_peak, _top).
_NUMBA: Any = None
#: Guards what is made once on first use (the kernels, VNNI's packed weights) when several
#: threads step at once (:mod:`llmarc.inference.threads`).
_LAZY = threading.RLock()
_pairs: Any = None  # the intrinsics and helpers of _compile
_listed_pairs: Any = None
_dot8: Any = None
_peak: Any = None
_top: Any = None
_weigh: Any = None
_norm_row: Any = None


#: Below this many elements of work a kernel runs on the calling thread: waking worker
#: threads costs more than it saves (milliseconds on a busy machine).
PARALLEL_WORK = 1 << 16


def _kernels(work: int = PARALLEL_WORK) -> Any:
    """The compiled kernels (compiled on first use, cached on disk by numba): the
    multi-threaded flavour for ``work`` elements or more when torch has several threads,
    else the single-threaded one.  Both compute the same values (rows are independent)."""
    global _NUMBA
    if _NUMBA is None:  # the lock only until they exist: this runs per kernel call
        with _LAZY:
            if _NUMBA is None:
                try:
                    import numba
                except ImportError as exc:  # pragma: no cover - numba is in the llm extra
                    raise ModelError("int-v1/v2 need numba: pip install 'llmarc[llm]'") from exc
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


#: int8 products per vector step of the few-rows kernel (:func:`_int8_dot_blocks`).
DOT_BLOCK = 32
#: Query rows per task of the prefill's ``causal_weights`` (their scratch is allocated
#: once): enough tasks to balance two threads even for one segment's 9 heads.
CAUSAL_ROWS_PER_TASK = 16
#: Tasks of the stepping kernel's parallel loop (each a run of (row, key head) pairs
#: sharing scratch arrays): a few per thread, not one allocation set per pair.
STEP_CHUNKS = 16
#: Results per call of :func:`_pair_dots`: the stepping kernel's caches are laid
#: out in tiles of this many keys (q.k) and value columns (u.v).
PAIR_LANES = 16
#: Positions a decoder's key/value caches start with; they double as positions are
#: stepped (IntegerStepper._grow), up to the longest segment of the group.
CACHE_START = 64


@functools.cache
def _int8_dot_blocks() -> Any:
    """A numba intrinsic: the exact sum of ``32 * blocks`` int8 x int8 products (int32).

    Written in LLVM IR because numba's own code for this loop widens every product
    (one multiply-add per cycle).  The IR says what is exact and nothing more: products
    as int32, adjacent pairs added (each pair below 2^15), summed in a vector of int32
    (a row of up to 2^17 products stays below 2^31), reduced once at the end.  LLVM maps
    the pair step to ``vpmaddwd`` where the CPU has it and to plain integer ops
    elsewhere; integer arithmetic has one answer on every target."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    lanes = DOT_BLOCK
    i8, i32 = ir.IntType(8), ir.IntType(32)
    half = ir.VectorType(i32, lanes // 2)
    reduce_type = ir.FunctionType(i32, [half])

    @intrinsic
    def dot_blocks(typingctx, a, ia, b, ib, blocks):  # pragma: no cover - code generation
        def codegen(context, builder, signature, args):
            a_data = context.make_array(signature.args[0])(context, builder, args[0]).data
            b_data = context.make_array(signature.args[2])(context, builder, args[2]).data

            def load(data, index):
                pointer = builder.bitcast(builder.gep(data, [index]),
                                          ir.VectorType(i8, lanes).as_pointer())
                return builder.sext(builder.load(pointer, align=1), ir.VectorType(i32, lanes))

            accumulator = cgutils.alloca_once_value(builder, ir.Constant(half, None))
            with cgutils.for_range(builder, args[4]) as loop:
                offset = builder.mul(loop.index, ir.Constant(loop.index.type, lanes))
                products = builder.mul(load(a_data, builder.add(args[1], offset)),
                                       load(b_data, builder.add(args[3], offset)))
                builder.store(builder.add(builder.load(accumulator),
                                          _pair_sums(builder, products, lanes)), accumulator)
            reduce = cgutils.get_or_insert_function(
                builder.module, reduce_type, f"llvm.vector.reduce.add.v{lanes // 2}i32")
            return builder.call(reduce, [builder.load(accumulator)])

        return types.int32(a, ia, b, ib, blocks), codegen

    return dot_blocks


@functools.cache
def _pair_dots(listed: bool = False) -> Any:
    """A numba intrinsic: 16 exact dot products of int16 (int-v1) or int8 (int-v2)
    vectors at once, as int64, into ``out``.

    ``pair_dots(a, ia, w, iw, steps, stride, out, io)``: for lane i < 16,
    ``out[io + i] = sum over s < steps of a[ia+2s] * w[iw+s*stride+2i]
    + a[ia+2s+1] * w[iw+s*stride+2i+1]``.  The pair of ``a`` is broadcast to every lane;
    ``w`` holds, per step, 16 lanes of two interleaved integers.  The stepping kernel
    lays its caches out so that one call is q.k for 16 keys (steps along the head's
    width) or u.v for 16 value columns (steps along the keys): no per-result reduction,
    which cost more than the products for 64-wide heads.  int16: each pair sum is below
    2^31 (|a|, |w| <= 32767), widened to int64 and summed: exact for any count.  int8:
    pair sums below 2^15 add up in int32 (exact below 65,536 steps: the stepper makes at
    most 32,768, half the longest segment) and widen once.  LLVM maps the pair step to
    ``vpmaddwd`` where the CPU has it; integer arithmetic has one answer on every target.

    ``listed``: ``pair_dots(a, ia, w, iw, at, first, count, stride, out, io)`` sums over
    the steps ``at[first : first + count]`` only: u.v over the key pairs whose two
    weights are not both zero (the others add nothing), which skips their rows of the
    value cache: at int-v2's 127 levels about 70 % of them at position 500 (SmolLM2)."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    lanes = PAIR_LANES
    i32, i64 = ir.IntType(32), ir.IntType(64)
    wide = ir.VectorType(i32, 2 * lanes)
    sums_type = ir.VectorType(i64, lanes)

    def emit(context, builder, signature, args, bits, count, step_of):  # pragma: no cover
        words = ir.VectorType(ir.IntType(bits), 2 * lanes)
        pairs_type = ir.VectorType(ir.IntType(2 * bits), lanes)
        partial_type = ir.VectorType(i32 if bits == 8 else i64, lanes)
        a_data = context.make_array(signature.args[0])(context, builder, args[0]).data
        w_data = context.make_array(signature.args[2])(context, builder, args[2]).data
        out_data = context.make_array(signature.args[-2])(context, builder, args[-2]).data
        stride = args[-3]
        accumulator = cgutils.alloca_once_value(builder, ir.Constant(partial_type, None))
        with cgutils.for_range(builder, count) as loop:
            step = step_of(loop.index)
            at = builder.add(args[1], builder.mul(step, ir.Constant(step.type, 2)))
            pair = builder.load(builder.bitcast(builder.gep(a_data, [at]),
                                                pairs_type.element.as_pointer()),
                                align=bits // 8)
            splat = builder.insert_element(ir.Constant(pairs_type, None), pair,
                                           ir.Constant(i32, 0))
            splat = builder.shuffle_vector(splat, splat,
                                           ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))
            broadcast = builder.sext(builder.bitcast(splat, words), wide)
            row = builder.gep(w_data, [builder.add(args[3], builder.mul(step, stride))])
            loaded = builder.sext(builder.load(builder.bitcast(row, words.as_pointer()),
                                               align=bits // 8), wide)
            sums = _pair_sums(builder, builder.mul(broadcast, loaded), 2 * lanes)
            if bits == 16:
                sums = builder.sext(sums, sums_type)
            builder.store(builder.add(builder.load(accumulator), sums), accumulator)
        total = builder.load(accumulator)
        if bits == 8:
            total = builder.sext(total, sums_type)
        target = builder.bitcast(builder.gep(out_data, [args[-1]]), sums_type.as_pointer())
        builder.store(total, target, align=8)
        return context.get_dummy_value()

    if not listed:
        @intrinsic
        def pair_dots(typingctx, a, ia, w, iw, steps, stride, out,
                      io):  # pragma: no cover - code generation
            def codegen(context, builder, signature, args):
                return emit(context, builder, signature, args, a.dtype.bitwidth, args[4],
                            lambda index: index)

            return types.void(a, ia, w, iw, steps, stride, out, io), codegen

        return pair_dots

    @intrinsic
    def listed_pair_dots(typingctx, a, ia, w, iw, at, first, count, stride, out,
                         io):  # pragma: no cover - code generation
        def codegen(context, builder, signature, args):
            at_data = context.make_array(signature.args[4])(context, builder, args[4]).data

            def step_of(index):  # at is int64
                return builder.load(builder.gep(at_data, [builder.add(args[5], index)]))

            return emit(context, builder, signature, args, a.dtype.bitwidth, args[6], step_of)

        return types.void(a, ia, w, iw, at, first, count, stride, out, io), codegen

    return listed_pair_dots


@functools.cache
def _quad_dots(vnni_instructions: bool) -> Any:
    """A numba intrinsic: int-v2's q.k for 16 keys at once, 4 columns per step.

    ``quad_dots(a, ia, w, iw, steps, stride, out, io)``: for lane i < 16, ``out[io + i] =
    sum over s < steps, j < 4 of a[ia+4s+j] * w[iw+s*stride+4i+j]`` (int64), where ``a``
    holds int8 queries and ``w`` the keys offset to unsigned bytes (k + 128): the sum is
    q.k + 128 * sum(q), and the caller takes the second term back.  With
    ``vnni_instructions`` (a CPU with AVX-512 VNNI) one ``vpdpbusd`` is a step (64
    products; it wraps, never saturates; every int32 sum is below 255 * 127 * Dh);
    without, the same integers are multiplied and added in int32 by plain vector ops.
    int-v1's operand types (int16) compile to the plain form in int64: numba compiles
    both branches of the stepping kernel, which never calls this one with them."""
    from llvmlite import ir
    from numba import types
    from numba.core import cgutils
    from numba.extending import intrinsic

    lanes = PAIR_LANES
    i32, i64 = ir.IntType(32), ir.IntType(64)

    @intrinsic
    def quad_dots(typingctx, a, ia, w, iw, steps, stride, out,
                  io):  # pragma: no cover - code generation
        a_bits, w_bits = a.dtype.bitwidth, w.dtype.bitwidth
        bytes_only = a_bits == 8 and w_bits == 8 and not w.dtype.signed
        use_vnni = bytes_only and vnni_instructions

        def codegen(context, builder, signature, args):
            a_data = context.make_array(signature.args[0])(context, builder, args[0]).data
            w_data = context.make_array(signature.args[2])(context, builder, args[2]).data
            out_data = context.make_array(signature.args[6])(context, builder, args[6]).data
            sum_type = i32 if bytes_only else i64
            partial_type = ir.VectorType(sum_type, lanes)
            quad = ir.IntType(4 * a_bits)
            accumulator = cgutils.alloca_once_value(builder, ir.Constant(partial_type, None))
            with cgutils.for_range(builder, args[4]) as loop:
                step = loop.index
                at = builder.add(args[1], builder.mul(step, ir.Constant(step.type, 4)))
                word = builder.load(builder.bitcast(builder.gep(a_data, [at]),
                                                    quad.as_pointer()), align=1)
                splat = builder.insert_element(ir.Constant(ir.VectorType(quad, lanes), None),
                                               word, ir.Constant(i32, 0))
                splat = builder.shuffle_vector(
                    splat, splat, ir.Constant(ir.VectorType(i32, lanes), [0] * lanes))
                row = builder.gep(w_data, [builder.add(args[3], builder.mul(step, args[5]))])
                keys = builder.load(builder.bitcast(
                    row, ir.VectorType(ir.IntType(w_bits), 4 * lanes).as_pointer()), align=1)
                total = builder.load(accumulator)
                if use_vnni:
                    vector = ir.VectorType(i32, lanes)
                    total = builder.call(vnni.dot_instruction(builder), [
                        total, builder.bitcast(keys, vector), builder.bitcast(splat, vector)])
                else:
                    wide = ir.VectorType(sum_type, 4 * lanes)
                    queries = builder.sext(builder.bitcast(
                        splat, ir.VectorType(ir.IntType(a_bits), 4 * lanes)), wide)
                    extend = builder.sext if w.dtype.signed else builder.zext
                    products = builder.mul(queries, extend(keys, wide))
                    total = builder.add(total, _pair_sums(
                        builder, _pair_sums(builder, products, 4 * lanes), 2 * lanes))
                builder.store(total, accumulator)
            total = builder.load(accumulator)
            if bytes_only:
                total = builder.sext(total, ir.VectorType(i64, lanes))
            target = builder.bitcast(builder.gep(out_data, [args[7]]),
                                     ir.VectorType(i64, lanes).as_pointer())
            builder.store(total, target, align=8)
            return context.get_dummy_value()

        return types.void(a, ia, w, iw, steps, stride, out, io), codegen

    return quad_dots


def _pair_sums(builder: Any, products: Any, lanes: int) -> Any:
    """Adjacent lanes of ``products`` (``lanes`` of int32) added: the ``vpmaddwd`` shape."""
    from llvmlite import ir

    half = ir.VectorType(ir.IntType(32), lanes // 2)
    even = ir.Constant(half, list(range(0, lanes, 2)))
    odd = ir.Constant(half, list(range(1, lanes, 2)))
    return builder.add(builder.shuffle_vector(products, products, even),
                       builder.shuffle_vector(products, products, odd))


def _compile(numba: Any) -> Any:
    import math
    import types

    import numpy as np

    log2e_scaled = float(LOG2E_SCALED)
    max_index = MAX_EXP_INDEX
    linear_levels = float(LINEAR_LEVELS)
    one = EXP_ONE
    residual_one = float(1 << RESIDUAL_BITS)
    residual_down = 2.0**-RESIDUAL_BITS
    residual_bits = RESIDUAL_BITS
    norm_bits = NORM_BITS
    magnitude = (1 << 63) - 1  # every bit of a double but its sign

    # The intrinsics and helpers are module globals, not closure cells: numba keys its
    # disk cache on a hash of a kernel's closure, and they pickle differently in every
    # process, so as cells they forced a recompilation (seconds) in every process.
    global _pairs, _quads, _listed_pairs, _dot8, _peak, _top, _weigh, _norm_row
    _pairs, _quads = _pair_dots(), _quad_dots(vnni.available())
    _listed_pairs, _dot8 = _pair_dots(listed=True), _int8_dot_blocks()
    block = DOT_BLOCK
    lanes = PAIR_LANES
    rows_per_task = CAUSAL_ROWS_PER_TASK
    step_chunks = STEP_CHUNKS

    def int8_rows(q, weight, out):  # pragma: no cover
        # out[r, o] = sum_i q[r, i] * weight[o, i]: q int8 [M, in], weight int8 [out, in]
        # (in a multiple of DOT_BLOCK), out int32 [M, out]; exact in int32 (|sum| <=
        # 127^2 * in < 2^31); each weight row is read once for the M rows
        rows, inner = q.shape
        blocks = inner // block
        for o in numba.prange(weight.shape[0]):
            for r in range(rows):
                out[r, o] = _dot8(q, r * inner, weight, o * inner, blocks)

    helper = numba.njit(fastmath=False, error_model="numpy", nogil=True, cache=True)

    @helper
    def peak_of(values):  # pragma: no cover
        # max |v| of a float64 vector without NaN, as the largest bit pattern of |v|: for
        # non-negative doubles the order of the int64 patterns is the numeric order, and
        # an integer max vectorizes where a float one (without fast-math) does not
        bits = values.view(np.int64)
        top = 0
        for i in range(bits.shape[0]):
            top = max(top, bits[i] & magnitude)
        box = np.empty(1, dtype=np.int64)
        box[0] = top
        return box.view(np.float64)[0]

    @helper
    def top_of(values):  # pragma: no cover
        # max v of a float64 vector without NaN, the same way: flipping the magnitude
        # bits of the negative ones orders all patterns as their values (-0 below +0,
        # which only the sign of a zero maximum can tell apart: z - top, the sole use,
        # then differs at most in the sign of a zero, which floor and EXP ignore)
        bits = values.view(np.int64)
        top = -(1 << 63)
        for i in range(bits.shape[0]):
            b = bits[i]
            top = max(top, b ^ ((b >> 63) & magnitude))
        box = np.empty(1, dtype=np.int64)
        box[0] = top ^ ((top >> 63) & magnitude)
        return box.view(np.float64)[0]

    @helper
    def weigh(z, count, top, v_scale, table, index):  # pragma: no cover
        # z[k] <- p_k = WEIGHTS[min(-floor((z_k - top) * K), 10240)] * v_scale[k] for
        # k < count; returns (sum of the weights as an integer, max p).  The exponents
        # are found in a pass of their own (``index``, int64 scratch): without the table
        # lookup it vectorizes.
        for k in range(count):
            index[k] = np.int64(min(-np.floor((z[k] - top) * log2e_scaled), max_index))
        total = 0
        for k in range(count):
            w = table[np.uint64(index[k])]  # unsigned: no test for a negative index
            total += w
            z[k] = np.float64(w) * v_scale[k]
        return total, _peak(z[:count])

    @helper
    def norm_row(h, weight, eps, q_out):  # pragma: no cover
        # RMSNorm(h) * weight of one row quantized to +-127 into q_out; returns its scale
        cols = h.shape[0]
        exponent = math.frexp(_peak(h))[1]
        shift = exponent - norm_bits
        if shift < 0:
            shift = 0
        down = math.ldexp(1.0, -shift)  # 2^-shift, exact
        squares = 0
        for c in range(cols):
            v = np.int64(np.floor(h[c] * down))
            squares += v * v
        mean = (np.float64(squares) * math.ldexp(1.0, 2 * shift - 2 * residual_bits)) \
            / np.float64(cols)
        root = np.sqrt(mean + eps)
        products = np.empty(cols, dtype=np.float64)
        for c in range(cols):
            products[c] = h[c] * weight[c]
        peak = _peak(products)
        safe = peak if peak > 0.0 else 1.0
        factor = linear_levels / safe
        for c in range(cols):
            q_out[c] = np.rint(products[c] * factor)
        return ((peak / linear_levels) * residual_down) / root

    _peak, _top, _weigh, _norm_row = peak_of, top_of, weigh, norm_row

    def attend_step(qkv, scales, attention_scale, keys, k_scale, values, v_scale, t,
                    table, levels, context):  # pragma: no cover
        # Position t of every row: qkv [N, H + 2 Hkv, Dh] (queries, keys, values of the
        # position, quantized to +-levels: int16 or int8, the caches' type) and their
        # scales f64 [N, H + 2 Hkv].  The key and value are stored in the caches first,
        # tiled (Dp: Dh rounded up to 16, L' the length rounded up to 16, padding zero):
        # int16 keys [N, Hkv, L'/16, Dp/2, 16, 2] for _pairs (key t, column d at [t/16,
        # d/2, t%16, d%2]: a tile is q.k for 16 keys), or int8 keys offset to unsigned
        # bytes (k + 128) [N, Hkv, L'/16, Dp/4, 16, 4] for _quads; values [N, Hkv, L'/2, Dp, 2]
        # (value t, column d at [t/2, d, t%2]: a run of 16 columns is u.v for them),
        # scales f64 [N, Hkv, L].  Then the query sees keys 0 .. t; context f64 [N, H *
        # Dh].  One (row, key head) at a time: its keys and values stay in cache for the
        # heads sharing them.  u.v runs over the key pairs with a weight that is not 0,
        # as whole pairs (u is zero past the visible keys; a padding value's product is 0).
        n_rows, columns, dh = qkv.shape
        kv_heads = keys.shape[1]
        per = keys.shape[5]  # columns of a key side by side: 2 (_pairs) or 4 (_quads)
        key_offset = 128 if per == 4 else 0
        padded = keys.shape[3] * per
        heads = columns - 2 * kv_heads
        group = heads // kv_heads
        count = t + 1
        tiles = -(-count // lanes)
        width = tiles * lanes
        steps = -(-count // 2)
        tasks = n_rows * kv_heads
        per_chunk = -(-tasks // step_chunks)  # tasks sharing one set of scratch arrays
        for chunk in numba.prange(-(-tasks // per_chunk)):
            # scratch; its zeros past a head's width and past the visible keys are never
            # overwritten, so every task of the chunk sees them
            queries = np.zeros(group * padded, dtype=values.dtype)
            offsets = np.empty(group, dtype=np.int64)  # key_offset * sum(q): _quads' excess
            sums = np.empty(group * width, dtype=np.int64)
            u = np.zeros(group * width, dtype=values.dtype)
            z = np.empty(count, dtype=np.float64)
            index = np.empty(count, dtype=np.int64)
            p_scale = np.empty(group, dtype=np.float64)
            weight_sum = np.empty(group, dtype=np.float64)
            c = np.empty(group * padded, dtype=np.int64)
            pairs = np.empty(group * steps, dtype=np.int64)  # the key pairs u.v runs over
            listed = np.empty(group, dtype=np.int64)
            for r in range(chunk * per_chunk, min(tasks, (chunk + 1) * per_chunk)):
                n = r // kv_heads
                kv = r % kv_heads
                for d in range(dh):
                    keys[n, kv, t // lanes, d // per, t % lanes, d % per] = \
                        qkv[n, heads + kv, d] + key_offset
                    values[n, kv, t // 2, d, t % 2] = qkv[n, heads + kv_heads + kv, d]
                k_scale[n, kv, t] = scales[n, heads + kv]
                v_scale[n, kv, t] = scales[n, heads + kv_heads + kv]
                key_tiles = keys[n, kv].reshape(-1)
                value_pairs = values[n, kv].reshape(-1)
                ks = k_scale[n, kv]
                for g in range(group):
                    query_sum = 0
                    for d in range(dh):
                        queries[g * padded + d] = qkv[n, kv * group + g, d]
                        query_sum += qkv[n, kv * group + g, d]
                    offsets[g] = key_offset * query_sum
                for tile in range(tiles):  # a tile of keys serves every head of the group
                    for g in range(group):
                        if per == 4:
                            _quads(queries, g * padded, key_tiles, tile * lanes * padded,
                                   padded // 4, 4 * lanes, sums, g * width + tile * lanes)
                        else:
                            _pairs(queries, g * padded, key_tiles, tile * lanes * padded,
                                   padded // 2, 2 * lanes, sums, g * width + tile * lanes)
                for g in range(group):
                    # views of this head's scratch: loops over them index from 0, which
                    # numba knows is not negative, so they vectorize as plain loads
                    head_sums = sums[g * width:(g + 1) * width]
                    head_u = u[g * width:(g + 1) * width]
                    head_pairs = pairs[g * steps:(g + 1) * steps]
                    q_scale = scales[n, kv * group + g] * attention_scale
                    for k in range(count):
                        z[k] = np.float64(head_sums[k] - offsets[g]) * (q_scale * ks[k])
                    total, peak = _weigh(z, count, _top(z), v_scale[n, kv], table, index)
                    safe = peak if peak > 0.0 else 1.0
                    factor = levels / safe
                    p_scale[g] = peak / levels
                    weight_sum[g] = np.float64(total)
                    for k in range(count):
                        head_u[k] = np.rint(z[k] * factor)
                    found = 0  # the pairs with a weight that is not 0 (without branches)
                    for s in range(steps):
                        head_pairs[found] = s
                        found += (head_u[2 * s] != 0) | (head_u[2 * s + 1] != 0)
                    listed[g] = found
                for run in range(padded // lanes):  # u.v for 16 columns of every head
                    for g in range(group):
                        _listed_pairs(u, g * width, value_pairs, run * 2 * lanes, pairs,
                                      g * steps, listed[g], 2 * padded, c,
                                      g * padded + run * lanes)
                for g in range(group):
                    head_c = c[g * padded:g * padded + dh]
                    head_context = context[n, (kv * group + g) * dh:(kv * group + g + 1) * dh]
                    for d in range(dh):
                        head_context[d] = (np.float64(head_c[d]) * p_scale[g]) / weight_sum[g]

    def causal_weights(scores, q_scale, k_scale, v_scale, first, table, levels, u_out,
                       p_scale, weight_sum):  # pragma: no cover
        # scores [N, Hkv, g, T, K] (f64 or int32): the exact q.k sums of queries first ..
        # first+T-1 (query j sees keys 0 .. first + j); u_out [N, Hkv, g, T, K] (f64 or
        # int8; may be scores itself): the weights quantized to +-levels (0 where a key
        # is not visible); q_scale f64 [N, Hkv, g, T] (times 1/sqrt(Dh)), k_scale,
        # v_scale f64 [N, Hkv, L]; p_scale, weight_sum f64 [N, Hkv, g, T].  The
        # operations of attend, in its order, for one query row each.
        # Tasks of ROWS_PER_TASK query rows share their scratch (one allocation each).
        n_rows, kv_heads, group, t_rows, width = scores.shape
        chunks = -(-t_rows // rows_per_task)
        for r in numba.prange(n_rows * kv_heads * group * chunks):
            n = r // (kv_heads * group * chunks)
            kv = (r // (group * chunks)) % kv_heads
            g = (r // chunks) % group
            begin = (r % chunks) * rows_per_task
            z = np.empty(width, dtype=np.float64)
            index = np.empty(width, dtype=np.int64)
            ks = k_scale[n, kv]
            for j in range(begin, min(begin + rows_per_task, t_rows)):
                count = first + j + 1
                qs = q_scale[n, kv, g, j]
                row = scores[n, kv, g, j]
                for k in range(count):
                    z[k] = np.float64(row[k]) * (qs * ks[k])
                total, peak = _weigh(z, count, _top(z[:count]), v_scale[n, kv], table, index)
                safe = peak if peak > 0.0 else 1.0
                factor = levels / safe
                u = u_out[n, kv, g, j]
                for k in range(count):
                    u[k] = np.rint(z[k] * factor)
                for k in range(count, width):
                    u[k] = 0
                p_scale[n, kv, g, j] = peak / levels
                weight_sum[n, kv, g, j] = np.float64(total)

    def swiglu_quantize(acc, row_scale, col_scale, table, q_out, scale_out):  # pragma: no cover
        # acc [R, 2I]: the fused gate/up projection's integer sums (any dtype); gate and
        # up are acc * (row_scale * col_scale); silu(gate) * up quantized per row:
        # q_out [R, I] int8/f32, scale_out f64 [R].  The table lookup has a pass of its
        # own, so that the others vectorize (2.4x the single loop, measured).
        rows = acc.shape[0]
        width = acc.shape[1] // 2
        gate_scale, up_scale = col_scale[:width], col_scale[width:]
        for r in numba.prange(rows):
            s = row_scale[r]
            gate_acc, up_acc = acc[r, :width], acc[r, width:]  # views: see attend_step
            gate = np.empty(width, dtype=np.float64)
            index = np.empty(width, dtype=np.int64)
            products = np.empty(width, dtype=np.float64)
            for i in range(width):
                x = np.float64(gate_acc[i]) * (s * gate_scale[i])
                gate[i] = x
                index[i] = np.int64(min(np.floor(np.abs(x) * log2e_scaled), max_index))
            for i in range(width):
                products[i] = np.float64(table[np.uint64(index[i])])
            for i in range(width):
                x = gate[i]
                w = products[i]
                up = np.float64(up_acc[i]) * (s * up_scale[i])
                numerator = one if x >= 0.0 else w
                products[i] = (x * (numerator / (w + one))) * up
            peak = _peak(products)
            safe = peak if peak > 0.0 else 1.0
            factor = linear_levels / safe
            for i in range(width):
                q_out[r, i] = np.rint(products[i] * factor)
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
            peak = _peak(x[r])
            safe = peak if peak > 0.0 else 1.0
            factor = levels_ / safe
            for c in range(cols):
                q_out[r, c] = np.rint(x[r, c] * factor)
            scale_out[r] = peak / levels_

    def norm_quantize(h, weight, eps, q_out, scale_out):  # pragma: no cover
        # norm_quantized: RMSNorm(h) * weight quantized per row; q_out int8/f32, scale_out f64
        for r in numba.prange(h.shape[0]):
            scale_out[r] = _norm_row(h[r], weight, eps, q_out[r])

    def residual_norm(acc, row_scale, col_scale, h, weight, eps, q_out,
                      scale_out):  # pragma: no cover
        # h[r, c] += round_half_even(acc[r, c] * (row_scale[r] * col_scale[c]) * 2^24),
        # then norm_quantize of the new row (row_scale is read before scale_out is
        # written: they may be one buffer)
        rows, cols = h.shape
        for r in numba.prange(rows):
            s = row_scale[r]
            for c in range(cols):
                y = np.float64(acc[r, c]) * (s * col_scale[c])
                h[r, c] = h[r, c] + np.rint(y * residual_one)
            scale_out[r] = _norm_row(h[r], weight, eps, q_out[r])

    def qkv_rope(acc, row_scale, col_scale, positions, cos, sin, rotated, levels, q_out,
                 scale_out):  # pragma: no cover
        # acc [R, heads * Dh]: the fused q/k/v projection's integer sums (any dtype); the
        # values acc * (row_scale * col_scale), the first ``rotated`` heads rotated at
        # positions[R], each head quantized to +-levels: q_out int16/int8 [R, heads, Dh],
        # scale_out f64 [R, heads]
        rows, heads, dh = q_out.shape
        half = dh // 2
        for r in numba.prange(rows):
            s = row_scale[r]
            pos = positions[r]
            x = np.empty(dh, dtype=np.float64)
            y = np.empty(dh, dtype=np.float64)
            for h in range(heads):
                head_acc = acc[r, h * dh:(h + 1) * dh]  # views: see attend_step
                head_scale = col_scale[h * dh:(h + 1) * dh]
                for i in range(dh):
                    x[i] = np.float64(head_acc[i]) * (s * head_scale[i])
                if h < rotated:
                    for i in range(half):
                        a = x[i]
                        b = x[half + i]
                        c = cos[pos, i]
                        si = sin[pos, i]
                        y[i] = a * c - b * si
                        y[half + i] = b * c + a * si
                else:
                    for i in range(dh):
                        y[i] = x[i]
                peak = _peak(y)
                safe = peak if peak > 0.0 else 1.0
                factor = levels / safe
                for i in range(dh):
                    q_out[r, h, i] = np.rint(y[i] * factor)
                scale_out[r, h] = peak / levels

    class Kernels:
        pass

    functions = (int8_rows, attend_step, causal_weights, swiglu_quantize, scaled, residual,
                 quantize, norm_quantize, residual_norm, qkv_rope)
    table = np.ascontiguousarray(WEIGHTS.astype(np.int64))
    flavours = []
    isa = "_vnni" if vnni.available() else ""
    for parallel in (False, True):
        jit = numba.njit(parallel=parallel, fastmath=False, error_model="numpy", nogil=True,
                         cache=True)
        kernels = Kernels()
        kernels.numba = numba
        kernels.parallel = parallel
        kernels.table = table
        for function in functions:
            # a copy per flavour, named apart, so numba's disk cache keeps both
            copy = types.FunctionType(function.__code__, function.__globals__,
                                      function.__name__, function.__defaults__,
                                      function.__closure__)
            # and one per VNNI choice: it is compiled into _quads, and numba's cache would
            # otherwise hand a process with LLMARC_VNNI=off the other one's code
            copy.__qualname__ = (f"{function.__qualname__}_"
                                 f"{'parallel' if parallel else 'serial'}{isa}")
            setattr(kernels, function.__name__, jit(copy))
        flavours.append(kernels)
    return tuple(flavours)


def _linear_shapes(config: Any, head_dim: int) -> list[tuple[int, int]]:
    """(inner, outer) of every GEMM the model runs (fused q/k/v and gate/up)."""
    hidden, heads, kv = config.hidden_size, config.num_attention_heads, config.num_key_value_heads
    inter = config.intermediate_size
    return [(hidden, (heads + 2 * kv) * head_dim), (heads * head_dim, hidden),
            (hidden, 2 * inter), (inter, hidden), (hidden, config.vocab_size)]


class IntegerStepper:
    """The decoder's side: ``width`` rows advanced one position per :meth:`step`.

    The key/value cache holds the integer keys and values (int16 for int-v1, int8 for
    int-v2) and their per-head scales, so a step only computes the new position; its
    logits equal prefill's."""

    def __init__(self, model: IntegerModel, width: int, length: int) -> None:
        if length > model.max_length:
            raise ValueError(f"{length} positions exceed the engine's {model.max_length}")
        self.model, self.width, self.length = model, width, length
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.key_scales: list[torch.Tensor] = []
        self.value_scales: list[torch.Tensor] = []
        #: Positions the caches hold now: they grow with the positions really stepped
        #: (doubling, up to ``length``), never to ``length`` up front, so a payload that
        #: claims long segments but decodes few tokens costs a few positions' memory
        #: (spec/llm-codec.md §3.2), and a group of short segments a short cache.
        self.capacity = 0
        self.position = 0
        self._work: Workspace | None = None  # the CPU path's buffers, made on first step
        self._caches: list[tuple[Any, ...]] = []  # NumPy views of the caches, for the kernel
        self._grow(min(length, CACHE_START))

    def _shapes(self, positions: int) -> tuple[tuple[int, ...], tuple[int, ...],
                                                tuple[int, ...], torch.dtype, torch.dtype]:
        """(key, value, scale shapes, key dtype, value dtype) of caches for ``positions``."""
        model, width = self.model, self.width
        shape = (width, model.num_kv_heads, positions, model.head_dim)
        key_shape = value_shape = shape
        dtype = key_dtype = attention_dtype(model.attention_levels)
        if model.fused_kernels:  # the tiles of the CPU kernel (``attend_step``)
            tiles = -(-positions // PAIR_LANES)
            columns = -(-model.head_dim // PAIR_LANES) * PAIR_LANES
            per = 4 if dtype == torch.int8 else 2  # int8 keys as k + 128, for _quad_dots
            key_dtype = torch.uint8 if dtype == torch.int8 else dtype
            key_shape = (width, model.num_kv_heads, tiles, columns // per, PAIR_LANES, per)
            value_shape = (width, model.num_kv_heads, tiles * PAIR_LANES // 2, columns, 2)
        return key_shape, value_shape, (width, model.num_kv_heads, positions), key_dtype, dtype

    def _grow(self, positions: int) -> None:
        """Caches for ``positions`` (a multiple of the kernel's tile, at most ``length``),
        keeping what the smaller ones hold: every cache is laid out with positions (or
        their tiles) on axis 2, so the old caches are the new ones' leading slice."""
        if self.model.fused_kernels:
            positions = -(-positions // PAIR_LANES) * PAIR_LANES
        key_shape, value_shape, scale_shape, key_dtype, dtype = self._shapes(positions)
        device = self.model.device

        def grown(old: list[torch.Tensor], shape: tuple[int, ...], kind: torch.dtype,
                  ) -> list[torch.Tensor]:
            out = []
            for index in range(len(self.model.layers)):
                new = torch.zeros(shape, dtype=kind, device=device)
                if old:
                    new[:, :, : old[index].shape[2]] = old[index]
                out.append(new)
            return out

        self.keys = grown(self.keys, key_shape, key_dtype)
        self.values = grown(self.values, value_shape, dtype)
        self.key_scales = grown(self.key_scales, scale_shape, F64)
        self.value_scales = grown(self.value_scales, scale_shape, F64)
        self.capacity = positions
        self._caches = []  # NumPy views of the old caches are stale

    def reset(self) -> None:
        self.position = 0

    @torch.no_grad()
    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """Feed one token per row at the current position; float32 logits [width, V].

        On the CPU path the logits live in the stepper's workspace: the next step
        overwrites them (copy what must outlive it)."""
        model, t = self.model, self.position
        if t >= self.length:
            raise RuntimeError("segment length exceeded: call reset() first")
        if t >= self.capacity:
            self._grow(min(self.length, 2 * self.capacity))
        step = self._step_fused if model.fused_kernels else self._step_torch
        logits = step(tokens, t)
        self.position = t + 1
        return logits

    def _step_fused(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """The CPU path: :meth:`IntegerModel.forward_fused` with the stepping kernel,
        which stores position t's key and value in the cache and attends over 0..t."""
        model = self.model
        if self._work is None:
            self._work = Workspace(model, self.width, stepping=True)
        if not self._caches:
            self._caches = [(k.numpy(), ks.numpy(), v.numpy(), vs.numpy()) for k, ks, v, vs
                            in zip(self.keys, self.key_scales, self.values, self.value_scales,
                                   strict=True)]
        work = self._work
        _, context_host = work.buffer(
            "context", (self.width, model.num_heads * model.head_dim), F64)
        kernels = _kernels(context_host.size * (t + 1))
        scale_by = float(model.attention_scale.item())
        levels = float(model.attention_levels)

        def attend(index: int, qkv: tuple[torch.Tensor, Any],
                   scale: tuple[torch.Tensor, Any]) -> Any:
            keys, key_scales, values, value_scales = self._caches[index]
            kernels.attend_step(qkv[1], scale[1], scale_by, keys, key_scales, values,
                                value_scales, t, kernels.table, levels, context_host)
            return context_host

        h = model.embed(tokens.to(model.device))
        positions = torch.full((self.width,), t, dtype=torch.int64)
        q, scale = model.forward_fused(h, positions, attend, work)
        return model.lm_head_logits(q, scale, work)

    def _step_torch(self, tokens: torch.Tensor, t: int) -> torch.Tensor:
        """Off the CPU: the spec's operations as torch ops over the cache."""
        model = self.model
        positions = torch.tensor([t], device=model.device)
        h = model.embed(tokens.to(model.device))[:, None, :]  # [B, 1, D]
        for index, layer in enumerate(model.layers):
            q, qs, k, ks, v, vs = model.qkv(layer, h, positions)
            self.keys[index][:, :, t] = k[:, 0].to(self.keys[index].dtype)
            self.values[index][:, :, t] = v[:, 0].to(self.values[index].dtype)
            self.key_scales[index][:, :, t] = ks[:, 0, :, 0]
            self.value_scales[index][:, :, t] = vs[:, 0, :, 0]
            context = model.attend(
                q.transpose(1, 2), qs.transpose(1, 2),
                self.keys[index][:, :, : t + 1].to(F64), self.key_scales[index][:, :, : t + 1],
                self.values[index][:, :, : t + 1].to(F64),
                self.value_scales[index][:, :, : t + 1], None,
            )
            h = model.mlp(layer, model.attention(layer, context, h))
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
