"""The decoder's side of the integer engines: :class:`IntegerStepper` advances rows one
position per step over integer key/value caches, with the logits that
:meth:`IntegerModel.prefill` gives for the same positions (spec/llm-codec.md §5: a row's
numbers depend only on its own tokens).

On the CPU a step is :meth:`IntegerModel.forward_fused` with the compiled stepping kernel
``attend_step`` (:mod:`llmarc.inference.kernels`), in the tiled cache layout that the
stepper allocates and grows; elsewhere (a GPU) the spec's operations as torch ops over
the cache.
"""

from __future__ import annotations

from typing import Any

import torch

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
