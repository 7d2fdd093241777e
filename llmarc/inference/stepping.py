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
