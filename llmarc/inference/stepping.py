"""The decoder's side of the integer engines on the CPU: :class:`IntegerStepper` advances
rows one position per step over integer key/value caches, with the logits that
:meth:`IntegerModel.prefill` gives for the same positions (spec/llm-codec.md §5: a row's
numbers depend only on its own tokens).

A step is :meth:`IntegerModel.forward_fused` with the compiled stepping kernel
``attend_step`` (:mod:`llmarc.inference.kernels`), in the tiled cache layout that the
stepper allocates and grows.
"""

from __future__ import annotations

import numpy as np

from llmarc.inference.integer import F64, IntegerModel, Workspace, attention_dtype
from llmarc.inference.kernels import PAIR_LANES, _kernels

#: Positions a decoder's key/value caches start with; they double as positions are
#: stepped (IntegerStepper._grow), up to the longest segment of the group.
CACHE_START = 64


class IntegerStepper:
    """The decoder's side: ``width`` rows advanced one position per :meth:`step`.

    The key/value cache holds the integer keys and values (int16 for int-v1, int8 for
    int-v2) and their per-head scales, so a step only computes the new position; its
    logits equal prefill's."""

    def __init__(self, model: IntegerModel, width: int, length: int) -> None:
        if length > model.max_length:
            raise ValueError(f"{length} positions exceed the engine's {model.max_length}")
        self.model, self.width, self.length = model, width, length
        #: (keys, key scales, values, value scales) per layer.
        self.caches: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]] = []
        #: Positions the caches hold now: they grow with the positions really stepped
        #: (doubling, up to ``length``), never to ``length`` up front, so a payload that
        #: claims long segments but decodes few tokens costs a few positions' memory
        #: (spec/llm-codec.md §3.2), and a group of short segments a short cache.
        self.capacity = 0
        self.position = 0
        self._work = Workspace(model, width)
        self._grow(min(length, CACHE_START))

    def _grow(self, positions: int) -> None:
        """Caches for ``positions`` rounded up to the kernel's tile, keeping what the
        smaller ones hold: every cache is laid out with positions (or their tiles) on
        axis 2, so the old caches are the new ones' leading slice.

        The tiles of ``attend_step`` (Dp: Dh rounded up to 16, padding zero): int16
        keys [N, Hkv, L/16, Dp/2, 16, 2], int8 keys as k + 128 (uint8)
        [N, Hkv, L/16, Dp/4, 16, 4], values [N, Hkv, L/2, Dp, 2]."""
        model, width = self.model, self.width
        positions = -(-positions // PAIR_LANES) * PAIR_LANES
        dtype = attention_dtype(model.attention_levels)
        tiles = positions // PAIR_LANES
        columns = -(-model.head_dim // PAIR_LANES) * PAIR_LANES
        per = 4 if dtype == np.int8 else 2  # int8 keys as k + 128, for _quad_dots
        key_dtype = np.uint8 if dtype == np.int8 else dtype
        heads = model.num_kv_heads
        shapes = ((width, heads, tiles, columns // per, PAIR_LANES, per), key_dtype), \
            ((width, heads, positions), F64), \
            ((width, heads, positions // 2, columns, 2), dtype), \
            ((width, heads, positions), F64)
        grown = []
        for index in range(len(model.layers)):
            caches = []
            for part, (shape, kind) in enumerate(shapes):
                new = np.zeros(shape, dtype=kind)
                if self.caches:
                    old = self.caches[index][part]
                    new[:, :, : old.shape[2]] = old
                caches.append(new)
            grown.append(tuple(caches))
        self.caches = grown  # type: ignore[assignment]
        self.capacity = positions

    def reset(self) -> None:
        self.position = 0

    def prefill(self, tokens: np.ndarray) -> None:
        """Feed known tokens [width, T] at positions 0 .. T-1 in one forward pass, as T
        :meth:`step` calls would (the same quantized keys and values in the caches: both
        come from ``forward_fused``'s qkv), without their logits: a decoder's context
        (spec/llm-codec.md §3.4), whose predictions code nothing.  Batched GEMMs over
        the T positions instead of T steps of ``width`` rows."""
        model = self.model
        width, count = tokens.shape
        if self.position or width != self.width or count > self.length:
            raise ValueError("prefill: a fresh stepper and at most its length per row")
        while self.capacity < count:
            self._grow(min(self.length, max(2 * self.capacity, count)))
        heads, kv = model.num_heads, model.num_kv_heads

        def attend(index: int, qkv: np.ndarray, scale: np.ndarray) -> np.ndarray:
            qkv = qkv.reshape(width, count, *qkv.shape[1:])
            scale = scale.reshape(width, count, -1)
            self._store(index, qkv[:, :, heads : heads + kv], scale[:, :, heads : heads + kv],
                        qkv[:, :, heads + kv :], scale[:, :, heads + kv :])
            return model.attend_causal(qkv, scale).reshape(width * count, -1)

        h = model.embed(np.asarray(tokens, dtype=np.int64)).reshape(width * count, -1)
        positions = np.tile(np.arange(count, dtype=np.int64), width)
        model.forward_fused(h, positions, attend, Workspace(model, width * count))
        self.position = count

    def _store(self, index: int, keys: np.ndarray, key_scales: np.ndarray,
               values: np.ndarray, value_scales: np.ndarray) -> None:
        """Write positions 0 .. T-1 of every row (keys and values [width, T, Hkv, Dh],
        scales [width, T, Hkv]) into layer ``index``'s caches, in the tiled layout of
        :meth:`_grow` (``attend_step`` writes one position the same way)."""
        key_cache, key_scale_cache, value_cache, value_scale_cache = self.caches[index]
        width, count, heads, dh = keys.shape
        per, columns = key_cache.shape[5], key_cache.shape[3] * key_cache.shape[5]
        tiles = -(-count // PAIR_LANES)
        padded = np.zeros((width, tiles * PAIR_LANES, heads, columns), dtype=np.int16)
        padded[:, :count, :, :dh] = keys
        if per == 4:  # int8 keys as k + 128 in unsigned bytes; padding columns stay 0
            padded[:, :count, :, :dh] += 128
        key_cache[:, :, :tiles] = padded.reshape(
            width, tiles, PAIR_LANES, heads, columns // per, per).transpose(0, 3, 1, 4, 2, 5)
        pairs = -(-count // 2)
        padded = np.zeros((width, 2 * pairs, heads, columns), dtype=value_cache.dtype)
        padded[:, :count, :, :dh] = values
        value_cache[:, :, :pairs] = padded.reshape(
            width, pairs, 2, heads, columns).transpose(0, 3, 1, 4, 2)
        key_scale_cache[:, :, :count] = key_scales.transpose(0, 2, 1)
        value_scale_cache[:, :, :count] = value_scales.transpose(0, 2, 1)

    def step(self, tokens: np.ndarray) -> np.ndarray:
        """Feed one token per row at the current position; float32 logits [width, V].

        The logits live in the stepper's workspace: the next step overwrites them (copy
        what must outlive it)."""
        model, t = self.model, self.position
        if t >= self.length:
            raise RuntimeError("segment length exceeded: call reset() first")
        if t >= self.capacity:
            self._grow(min(self.length, 2 * self.capacity))
        work = self._work
        context = work.buffer("context", (self.width, model.num_heads * model.head_dim), F64)
        kernels = _kernels(context.size * (t + 1))
        levels = float(model.attention_levels)

        def attend(index: int, qkv: np.ndarray, scale: np.ndarray) -> np.ndarray:
            keys, key_scales, values, value_scales = self.caches[index]
            kernels.attend_step(qkv, scale, model.attention_scale, keys, key_scales, values,
                                value_scales, t, kernels.table, levels, context)
            return context

        h = model.embed(np.asarray(tokens, dtype=np.int64))
        positions = np.full(self.width, t, dtype=np.int64)
        q, scale = model.forward_fused(h, positions, attend, work)
        logits = model.lm_head_logits(q, scale, work)
        self.position = t + 1
        return logits
