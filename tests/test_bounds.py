"""Bounded work for hostile archives (issue 22): every allocation and loop of the reader is
bounded by the archive's real bytes and the model's real limits before it starts.

Nothing here asserts a wall-clock time (the suite runs on loaded machines): work is
bounded by counts (cache positions, parsed records) or by the peak memory of a
subprocess (``ru_maxrss`` of the children)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIXTURES = REPO / "fixtures"
MODELS = json.loads((REPO / "spec" / "vectors" / "llm" / "models.json").read_text())


def test_stepper_caches_grow_with_the_positions_stepped() -> None:
    """A stepper made for 2,048 positions holds caches for a few; they double as the
    positions are stepped, and the logits equal prefill's across every growth."""
    torch = pytest.importorskip("torch")
    from llmarc.inference.integer import CACHE_START, IntegerStepper
    from llmarc.model.loader import load_model

    loaded = load_model(str(FIXTURES / "tiny-llama-bpe"), device="cpu")
    tokens = torch.randint(0, 300, (2, 3 * CACHE_START - 5),
                           generator=torch.Generator().manual_seed(7))
    for engine, fused in (("int-v2", True), ("int-v1", True), ("int-v2", False)):
        model = loaded.integer_model(2048, engine)
        model.fused_kernels = fused  # False: the torch operations a GPU runs
        try:
            expected = model.prefill(tokens)
            stepper = IntegerStepper(model, 2, 2048)
            assert stepper.capacity == CACHE_START
            full = IntegerStepper(model, 2, CACHE_START)  # what 64 positions take
            assert sum(k.numel() for k in stepper.keys) == sum(k.numel() for k in full.keys)
            stepped = torch.stack([stepper.step(tokens[:, t]).clone()
                                   for t in range(tokens.shape[1])], dim=1)
            assert stepper.capacity == 4 * CACHE_START  # 64 -> 128 -> 256 positions
            assert torch.equal(stepped, expected)
            stepper.reset()  # a reused stepper keeps its caches and gives the same logits
            again = torch.stack([stepper.step(tokens[:, t]).clone() for t in range(10)],
                                dim=1)
            assert torch.equal(again, stepped[:, :10])
        finally:
            model.fused_kernels = True
