"""The determinism contract of the lockstep engine, checked bit for bit on a tiny LLaMA."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmarc.errors import ModelError
from llmarc.inference.engine import EngineShape, LockstepEngine
from tests.tiny_models import tiny_llama


def run(engine: LockstepEngine, tokens: torch.Tensor) -> torch.Tensor:
    engine.reset()
    return torch.stack([torch.from_numpy(engine.step(tokens[:, t].numpy()))
                        for t in range(tokens.shape[1])], dim=1)


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def test_matches_the_reference_forward_pass(model) -> None:
    tokens = torch.randint(0, 300, (4, 40), generator=torch.Generator().manual_seed(1))
    ours = run(LockstepEngine(model, EngineShape(4, 40)), tokens)
    with torch.no_grad():
        reference = model(tokens).logits
    assert ours.dtype == torch.float32
    assert torch.allclose(ours, reference, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("width", [2, 5, 8])
def test_a_row_does_not_depend_on_its_companions(model, width: int) -> None:
    gen = torch.Generator().manual_seed(width)
    tokens = torch.randint(0, 300, (width, 48), generator=gen)
    other = tokens.clone()
    other[1:] = torch.randint(0, 300, (width - 1, 48), generator=gen)
    engine = LockstepEngine(model, EngineShape(width, 48))
    first, second = run(engine, tokens), run(engine, other)
    assert torch.equal(first[0], second[0])
    assert not torch.equal(first[1], second[1])


def test_encoder_and_decoder_runs_are_bit_identical(model) -> None:
    """Same tokens, fresh engines, run twice: the probability tables cannot differ."""
    tokens = torch.randint(0, 300, (3, 30), generator=torch.Generator().manual_seed(7))
    a = run(LockstepEngine(model, EngineShape(3, 30)), tokens)
    b = run(LockstepEngine(model, EngineShape(3, 30)), tokens)
    assert torch.equal(a, b)


def test_a_shorter_run_is_a_prefix_of_a_longer_one(model) -> None:
    """A decoder that stops early (shorter segments in its group) sees the same logits."""
    tokens = torch.randint(0, 300, (2, 32), generator=torch.Generator().manual_seed(3))
    engine = LockstepEngine(model, EngineShape(2, 32))
    full = run(engine, tokens)
    short = run(engine, tokens[:, :10])
    assert torch.equal(full[:, :10], short)


def test_stepping_past_the_segment_length_is_refused(model) -> None:
    engine = LockstepEngine(model, EngineShape(1, 2))
    engine.reset()
    engine.step(np.array([1]))
    engine.step(np.array([1]))
    with pytest.raises(RuntimeError):
        engine.step(np.array([1]))


def test_wrong_batch_shape_is_refused(model) -> None:
    engine = LockstepEngine(model, EngineShape(2, 4))
    with pytest.raises(ValueError):
        engine.step(np.array([1, 2, 3]))


def test_non_llama_models_are_refused(model) -> None:
    class Fake(torch.nn.Module):
        config = type("C", (), {"model_type": "gpt2"})()

    with pytest.raises(ModelError, match="gpt2"):
        LockstepEngine(Fake(), EngineShape(1, 4))
