"""The portable engines ``int-v1`` and ``int-v2`` on the CPU: logits that are the same bit
for bit on every machine, computed with NumPy and compiled kernels (no torch).

A float engine's logits depend on the order in which a BLAS, a CPU generation or a GPU
adds things up, so an archive made on one machine may not open on another.  This engine
computes every number that feeds the frequency tables with operations whose result is
fixed by their inputs alone (spec/llm-codec.md §5 defines each one):

* every *sum* is a sum of integers whose partial sums are exactly representable, so the
  order of addition cannot matter: the linear layers multiply int8 weights by int8
  activations (:mod:`llmarc.inference.exact_product`), the attention multiplies int16 by
  int16 (int-v1) or int8 by int8 (int-v2, the only difference between the two:
  :data:`ATTENTION_LEVELS`);
* every other operation is one IEEE 754 binary64 operation (+, -, *, /, sqrt, floor,
  round-half-even, max) on its own, which every conforming CPU rounds the same way:
  elementwise, never fused, never reassociated (the kernels of
  :mod:`llmarc.inference.kernels` are compiled without fast-math);
* exp and sigmoid come from the integer table of spec/entropy.md §2.1, cos and sin from
  tables rounded from exact values (:mod:`llmarc.inference.rope`, never a platform libm).

Because each row's numbers depend only on that row's tokens, a forward pass over whole
segments (the encoder's prefill, here) and one-position steps (the decoder,
:mod:`llmarc.inference.stepping`) give the same logits, whatever the batch width, thread
count, CPU ISA or BLAS.  The same operations as torch ops, for a GPU, are
:mod:`llmarc.inference.integer_torch`; both derive their integer weights with
:func:`derive_linear`.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from llmarc.errors import ModelError
from llmarc.inference.constants import LINEAR_LEVELS, RESIDUAL_BITS, WEIGHT_LEVELS
from llmarc.inference.exact_product import Int8Matrix, batched_int8_product, float_product
from llmarc.inference.kernels import _kernels
from llmarc.inference.rope import rope_tables
from llmarc.model.derived import layer_tensor

#: Largest magnitude of quantized queries, keys, values and attention weights, per
#: engine (spec/llm-codec.md §5.6).  int-v2's int8 attention halves the decoder's cache
#: and makes the attention's integer sums int8 products.
ATTENTION_LEVELS = {"int-v1": 32767, "int-v2": 127}
SUPPORTED_ROPE_TYPES = ("default", None)
#: Weight rows quantized at a time by :func:`derive_linear`: the float64 temporaries of
#: a 49,152-row lm_head stay at tens of MB.
DERIVE_ROWS = 4096

F64 = np.float64
#: A layer's linear weights as both engines fuse them (q, k and v; gate and up side by
#: side: each output column is the same exact integer sum as in its own layer).
FUSED_LINEAR = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
                "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",)}


def check_architecture(config: Any) -> None:
    """Refuse what int-v1/v2 do not define (spec/llm-codec.md §5.1), with a ModelError."""
    if config.model_type != "llama":
        raise ModelError(f"model type {config.model_type!r} is not supported by int-v1/v2")
    rope_type = (config.rope_scaling or {}).get("rope_type")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ModelError(f"rope type {rope_type!r} is not supported by int-v1/v2")
    if config.attention_bias or config.mlp_bias:
        raise ModelError("biased attention or MLP layers are not supported by int-v1/v2")
    if config.hidden_act != "silu":
        raise ModelError(f"activation {config.hidden_act!r} is not supported by int-v1/v2")
    if config.hidden_size > 1 << 13:
        raise ModelError("int-v1/v2 support hidden sizes up to 8192")


def dimensions(config: Any) -> tuple[int, int, int, int, float]:
    """(hidden size, heads, key/value heads, head width, RMSNorm epsilon) of an
    architecture int-v1/v2 define (refused with a ModelError otherwise)."""
    check_architecture(config)
    return (config.hidden_size, config.num_attention_heads, config.num_key_value_heads,
            config.head_dim, float(config.rms_norm_eps))


def layer_parts(model: Any, index: int, linear: Callable[..., Any],
                norm: Callable[[str], Any]) -> dict[str, Any]:
    """The fields of layer ``index``'s record in either engine: its two norms by
    ``norm(name)``, each fused linear layer by ``linear(*float32 weights [out, in])``,
    one group of weights read at a time."""
    parts = {"input_norm": norm(layer_tensor(index, "input_layernorm")),
             "post_norm": norm(layer_tensor(index, "post_attention_layernorm"))}
    for field_name, members in FUSED_LINEAR.items():
        parts[field_name] = linear(*(model.tensor(layer_tensor(index, member))
                                     for member in members))
    return parts


def derive_linear(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A float32 weight [out, in] as (int8 [out, in], float64 scale [out]) by §5.2:
    w_q = round_half_even(w * (127 / max|w_row|)), scale = max|w_row| / 127 (a zero row
    gives w_q = 0, scale = 0).  Rows are quantized a block at a time (each row on its
    own, so blocks change no value)."""
    rows = weight.shape[0]
    q = np.empty(weight.shape, dtype=np.int8)
    scale = np.empty(rows, dtype=F64)
    for begin in range(0, rows, DERIVE_ROWS):
        values = weight[begin : begin + DERIVE_ROWS].astype(F64)
        peak = np.abs(values).max(axis=-1, keepdims=True)
        safe = np.where(peak > 0, peak, 1.0)
        q[begin : begin + DERIVE_ROWS] = np.round(values * (float(WEIGHT_LEVELS) / safe))
        scale[begin : begin + DERIVE_ROWS] = (peak / float(WEIGHT_LEVELS))[:, 0]
    return q, scale


@dataclass
class IntLinear:
    """A linear layer as int8 weights and a binary64 scale per output channel: its
    output for input rows q * row_scale is (q @ w) * (row_scale * scale)."""

    matrix: Int8Matrix  # int8 [out, in]
    scale: np.ndarray  # float64 [out]

    @classmethod
    def derive(cls, *weights: np.ndarray) -> IntLinear:
        """The layer of float32 weights [out, in], several side by side as one
        (:data:`FUSED_LINEAR`)."""
        parts = [derive_linear(weight) for weight in weights]
        rows = parts[0][0] if len(parts) == 1 else np.concatenate([p[0] for p in parts])
        scale = parts[0][1] if len(parts) == 1 else np.concatenate([p[1] for p in parts])
        return cls(Int8Matrix(np.ascontiguousarray(rows)), np.ascontiguousarray(scale))

    @property
    def outputs(self) -> int:
        return self.matrix.outputs

    def epilogue(self, acc: np.ndarray, row_scale: np.ndarray, out: np.ndarray,
                 kind: str) -> None:
        """After the product: acc * (row_scale * scale) into ``out`` (any float dtype,
        rounded once), or added to the residual stream ``out`` as round(y * 2^24)."""
        kernels = _kernels(acc.size)
        getattr(kernels, kind)(acc, np.ascontiguousarray(row_scale.reshape(-1)), self.scale,
                               out)


@dataclass
class IntLayer:
    input_norm: np.ndarray  # float64 [D] (float32 values)
    qkv_proj: IntLinear  # q, k and v side by side
    o_proj: IntLinear
    post_norm: np.ndarray
    gate_up_proj: IntLinear  # gate and up side by side
    down_proj: IntLinear


class IntegerModel:
    """A LLaMA-family model derived into integer form, and its exact forward pass on the
    CPU: ``prefill``/``final_rows`` over whole rows, :meth:`stepper` one position at a
    time; both give identical float32 logits."""

    device_type = "cpu"

    def __init__(self, model: Any, max_length: int,
                 attention_levels: int = ATTENTION_LEVELS["int-v1"]) -> None:
        """Derive the integer model from ``model``: a
        :class:`~llmarc.model.derived.DerivedModel` (or anything with its ``architecture``
        and ``tensor(name)``: float32 NumPy values under Hugging Face names), one weight
        at a time, so no float copy of the whole model is ever held."""
        config = model.architecture
        self.hidden, self.num_heads, self.num_kv_heads, self.head_dim, self.eps = \
            dimensions(config)
        self.group = self.num_heads // self.num_kv_heads
        #: N of the attention's quantizers: what makes this int-v1 or int-v2.
        self.attention_levels = attention_levels
        #: The embedding's rows for tokens: read from the model's files as a step needs
        #: them where the model can (a DerivedModel), so the float32 table (SmolLM2:
        #: 113 MB) is not held; else the whole table.
        self.embedding_rows: Callable[[np.ndarray], np.ndarray]
        if hasattr(model, "rows"):
            self.embedding_rows = functools.partial(model.rows, "model.embed_tokens.weight")
        else:
            self.embedding_rows = model.tensor("model.embed_tokens.weight").__getitem__

        def norm(name: str) -> np.ndarray:
            return model.tensor(name).astype(F64)

        self.layers = [IntLayer(**layer_parts(model, index, IntLinear.derive, norm))
                       for index in range(config.num_hidden_layers)]
        self.final_norm = norm("model.norm.weight")
        self.lm_head = IntLinear.derive(model.tensor("lm_head.weight"))
        self.vocab_size = config.vocab_size
        self.rope_base = float(config.rope_theta)
        self.extend(max_length)
        self.attention_scale = float(F64(1.0) / np.sqrt(F64(self.head_dim)))  # 1/sqrt(Dh)

    def with_attention_levels(self, levels: int) -> IntegerModel:
        """This model with another engine's attention quantizer (int-v1 or int-v2): a
        shallow copy sharing every weight, so one archive may hold members of both."""
        other = copy.copy(self)
        other.attention_levels = levels
        return other

    def extend(self, max_length: int) -> None:
        """Rotary tables for positions 0 .. max_length-1 (the weights stay as they are)."""
        self.cos, self.sin = rope_tables(self.rope_base, self.head_dim, max_length)
        self.max_length = max_length

    def stepper(self, width: int, length: int) -> Any:
        """The decoder's side: ``width`` rows stepped one position at a time."""
        from llmarc.inference.stepping import IntegerStepper

        return IntegerStepper(self, width, length)

    def embed(self, tokens: np.ndarray) -> np.ndarray:
        """h = round_half_even(E[token] * 2^24), float64 integers."""
        tokens = np.asarray(tokens, dtype=np.int64)
        rows = self.embedding_rows(tokens.reshape(-1)).reshape(*tokens.shape, -1)
        return np.round(rows.astype(F64) * float(1 << RESIDUAL_BITS))

    #: Rows of the lm_head computed at a time: keeps the int32 product of a
    #: [T, vocabulary] GEMM in megabytes instead of hundreds.
    LOGIT_ROWS = 64

    def lm_head_logits(self, q: np.ndarray, scale: np.ndarray,
                       work: Workspace | None = None) -> np.ndarray:
        """float32 logits [..., V] of the final norm's quantized rows (q, scale): the
        exact product times (row scale * column scale), rounded once to float32.

        ``work``: a decoder's step, whose workspace holds the logits and the product
        (overwritten by the next step), so that no step allocates megabytes anew."""
        shape = q.shape[:-1]
        q = q.reshape(-1, q.shape[-1])
        scale = scale.reshape(-1)
        rows = q.shape[0]
        chunk_rows = min(rows, self.LOGIT_ROWS)
        if work is not None:
            out = work.buffer("logits", (rows, self.vocab_size), np.float32)
            product = work.buffer("logits_product", (chunk_rows, self.vocab_size), np.int32)
        else:
            out = np.empty((rows, self.vocab_size), dtype=np.float32)
            product = np.empty((chunk_rows, self.vocab_size), dtype=np.int32)
        for begin in range(0, rows, self.LOGIT_ROWS):
            chunk = slice(begin, begin + self.LOGIT_ROWS)
            part = q[chunk]
            acc = self.lm_head.matrix.product(part, product[: len(part)])
            self.lm_head.epilogue(acc, scale[chunk], out[chunk], "scaled")
        return out.reshape(*shape, self.vocab_size)

    # Each layer as its four GEMMs with one compiled kernel between each pair (spec
    # order, one row at a time, in cache), into buffers made once: a decoding step at
    # batch width 1-2 was mostly the dispatch overhead of about forty small array
    # operations per layer.
    def forward_fused(
        self, h: np.ndarray, positions: np.ndarray, attend: AttendRows, work: Workspace,
    ) -> tuple[np.ndarray, np.ndarray]:
        """Every layer over rows h [R, D] at ``positions`` [R] (h is updated in place);
        returns the final norm's quantized rows (q, scale) for :meth:`lm_head_logits`.
        ``attend(layer index, qkv [R, H + 2 Hkv, Dh], scales [R, H + 2 Hkv])`` gives the
        context rows [R, H * Dh] (float64) from the rotated, quantized queries, keys and
        values (int16 for int-v1, int8 for int-v2)."""
        inner = self.layers[0].down_proj.matrix.inner
        kernels = _kernels(h.shape[0] * 2 * inner)  # the widest kernel's elements
        norms = self._norms
        q, scale = work.quantized(self.hidden)
        context_q, context_scale = work.quantized(self.num_heads * self.head_dim)
        down_q, down_scale = work.quantized(inner)
        qkv, qkv_scale = work.qkv
        kernels.norm_quantize(h, norms[0], self.eps, q, scale)
        for index, layer in enumerate(self.layers):
            acc = work.product(layer.qkv_proj, q)
            kernels.qkv_rope(acc, scale, layer.qkv_proj.scale, positions, self.cos,
                             self.sin, self.num_heads + self.num_kv_heads,
                             float(self.attention_levels), qkv, qkv_scale)
            context = attend(index, qkv, qkv_scale)
            kernels.quantize(context, float(LINEAR_LEVELS), context_q, context_scale)
            acc = work.product(layer.o_proj, context_q)
            kernels.residual_norm(acc, context_scale, layer.o_proj.scale, h,
                                  norms[2 * index + 1], self.eps, q, scale)
            acc = work.product(layer.gate_up_proj, q)
            kernels.swiglu_quantize(acc, scale, layer.gate_up_proj.scale, kernels.table,
                                    down_q, down_scale)
            acc = work.product(layer.down_proj, down_q)
            kernels.residual_norm(acc, down_scale, layer.down_proj.scale, h,
                                  norms[2 * index + 2], self.eps, q, scale)
        return q, scale

    @functools.cached_property
    def _norms(self) -> list[np.ndarray]:
        """The norm weights in the order :meth:`forward_fused` applies them: each
        layer's input and post-attention norms, then the final norm."""
        norms = [norm for layer in self.layers for norm in (layer.input_norm, layer.post_norm)]
        return [*norms, self.final_norm]

    #: Query positions per block of :meth:`attend_causal`: block b's scores are a
    #: [heads, PREFILL_BLOCK, keys up to the block's end] array (~10 MB at 1024).
    PREFILL_BLOCK = 128

    def attend_causal(self, qkv: np.ndarray, qkv_scale: np.ndarray) -> np.ndarray:
        """The context rows [N, T, H * Dh] of whole rows (query j sees keys 0..j) from
        :meth:`forward_fused`'s qkv [N, T, H + 2 Hkv, Dh] and scales.  The two integer
        sums are exact products (:mod:`llmarc.inference.exact_product`: int8 ones for
        int-v2's 8-bit operands, float64 GEMMs for int-v1's 16-bit ones); the kernel
        between them is the same sequence of binary64 operations as the stepping
        kernel's.  Causal blocks of queries skip the keys no query of the block can see."""
        n, t = qkv.shape[:2]
        heads, kv, g, dh = self.num_heads, self.num_kv_heads, self.group, self.head_dim
        int8 = self.attention_levels <= LINEAR_LEVELS
        operand = np.int8 if int8 else F64
        # [N, Hkv, g, T, Dh]: the g query heads that share a key head, as one operand
        queries = np.ascontiguousarray(
            qkv[:, :, :heads].reshape(n, t, kv, g, dh).transpose(0, 2, 3, 1, 4), operand)
        qs = (qkv_scale[:, :, :heads] * self.attention_scale).reshape(n, t, kv, g)
        qs = np.ascontiguousarray(qs.transpose(0, 2, 3, 1))
        keys = np.ascontiguousarray(qkv[:, :, heads : heads + kv].transpose(0, 2, 1, 3),
                                    operand)  # [N, Hkv, T, Dh]
        values = qkv[:, :, heads + kv :].transpose(0, 2, 1, 3)  # [N, Hkv, T, Dh]
        values = np.ascontiguousarray(values.swapaxes(-1, -2) if int8 else values, operand)
        ks = np.ascontiguousarray(qkv_scale[:, :, heads : heads + kv].transpose(0, 2, 1))
        vs = np.ascontiguousarray(qkv_scale[:, :, heads + kv :].transpose(0, 2, 1))
        out = np.empty((n, t, kv, g, dh), dtype=F64)
        kernels = _kernels(n * heads * t * t)
        for begin in range(0, t, self.PREFILL_BLOCK):
            end = min(t, begin + self.PREFILL_BLOCK)
            rows = end - begin
            block = queries[:, :, :, begin:end].reshape(n, kv, g * rows, dh)
            if int8:  # scores int32; weights int8 into their own array
                scores = batched_int8_product(block, keys[:, :, :end])
                weights = np.empty(scores.shape, dtype=np.int8)
            else:  # scores float64, overwritten by the weights
                scores = weights = float_product(block, keys[:, :, :end].swapaxes(-1, -2))
            p_scale = np.empty((n, kv, g, rows), dtype=F64)
            weight_sum = np.empty((n, kv, g, rows), dtype=F64)
            kernels.causal_weights(scores.reshape(n, kv, g, rows, end), qs[..., begin:end], ks,
                                   vs, begin, kernels.table, float(self.attention_levels),
                                   weights.reshape(n, kv, g, rows, end), p_scale, weight_sum)
            if int8:  # values stored [N, Hkv, Dh, T]: the product's [outputs, inner]
                context = batched_int8_product(weights, values[..., :end])
            else:
                context = float_product(weights, values[:, :, :end])
            context = context.reshape(n, kv, g, rows, dh)
            context = (context.astype(F64) * p_scale[..., None]) / weight_sum[..., None]
            out[:, begin:end] = context.transpose(0, 3, 1, 2, 4)
        return out.reshape(n, t, heads * dh)

    def prefill(self, tokens: np.ndarray) -> np.ndarray:
        """float32 logits [N, T, V] for rows of tokens [N, T] fed at positions 0..T-1."""
        q, scale = self.final_rows(tokens)
        return self.lm_head_logits(q, scale)

    def final_rows(self, tokens: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """The final norm's quantized rows (q [N, T, D], scale [N, T]) of rows of tokens
        [N, T] fed at positions 0..T-1: :meth:`lm_head_logits` of any slice of them gives
        those positions' logits, so an encoder holds the float32 logits of a few
        positions at a time, not of a whole batch (200 MB for 1,024 positions of a
        49,152-token vocabulary)."""
        tokens = np.asarray(tokens, dtype=np.int64)
        n, t = tokens.shape
        if t > self.max_length:
            raise ValueError(f"{t} positions exceed the engine's {self.max_length}")
        h = self.embed(tokens).reshape(n * t, self.hidden)
        positions = np.tile(np.arange(t, dtype=np.int64), n)

        def attend(_index: int, qkv: np.ndarray, scale: np.ndarray) -> np.ndarray:
            context = self.attend_causal(qkv.reshape(n, t, *qkv.shape[1:]),
                                         scale.reshape(n, t, -1))
            return context.reshape(n * t, -1)

        q, scale = self.forward_fused(h, positions, attend, Workspace(self, n * t))
        return q.reshape(n, t, -1), scale.reshape(n, t)


#: The attention of :meth:`IntegerModel.forward_fused`: (layer, qkv, scales) -> context
#: rows (float64).
AttendRows = Callable[[int, np.ndarray, np.ndarray], np.ndarray]


class Workspace:
    """The CPU path's buffers for ``rows`` rows, made once per shape and reused by every
    layer (and, in a stepper, every step), so no step allocates them again."""

    def __init__(self, model: IntegerModel, rows: int) -> None:
        self.model, self.rows = model, rows
        self._buffers: dict[tuple[Any, ...], np.ndarray] = {}
        total = model.num_heads + 2 * model.num_kv_heads
        self.qkv = (self.buffer("qkv", (rows, total, model.head_dim),
                                attention_dtype(model.attention_levels)),
                    self.buffer("qkv_scale", (rows, total), F64))

    def buffer(self, name: str, shape: tuple[int, ...], dtype: Any) -> np.ndarray:
        """The buffer ``name``, made on first use."""
        key = (name, shape, np.dtype(dtype).str)
        if key not in self._buffers:
            self._buffers[key] = np.empty(shape, dtype=dtype)
        return self._buffers[key]

    def quantized(self, width: int) -> tuple[np.ndarray, np.ndarray]:
        """(q, scale): a linear layer's quantized input rows [rows, width] (int8) and
        their scales [rows], one pair per width."""
        return (self.buffer(f"q{width}", (self.rows, width), np.int8),
                self.buffer(f"scale{width}", (self.rows,), F64))

    def product(self, layer: IntLinear, q: np.ndarray) -> np.ndarray:
        """The layer's exact integer product of the quantized rows ``q`` (int32, into a
        buffer reused by every layer of the same width)."""
        out = self.buffer("acc", (self.rows, layer.outputs), np.int32)
        return layer.matrix.product(q, out)


def attention_dtype(levels: int) -> Any:
    """The narrowest integer type of quantized attention operands: int8 for int-v2."""
    return np.int8 if levels <= LINEAR_LEVELS else np.int16
