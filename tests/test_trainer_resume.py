"""LookbehindTrainer resumed on the same instance, from the newest complete checkpoint, and with
a changed method: each run continues exactly as an independent run from the same state (a fresh
Trainer resumed from the checkpoint, or the engine in a plain loop)."""

from __future__ import annotations

import pytest
import torch
from test_trainer import MODES, engine_kwargs, max_difference
from trainer_harness import make_model, make_trainer, sequential_closures

from hf_lookbehind import Lookbehind


@pytest.mark.parametrize("mode", ["same_batch", "switching"])
def test_a_second_train_resumed_on_the_same_trainer_continues_like_a_fresh_trainer(tmp_path, mode):
    """The notebook pattern: ``train()``, then more steps with ``resume_from_checkpoint=True``
    on the same instance. In switching mode the checkpoint is mid-cycle (3 steps, k = 2)."""
    overrides = dict(MODES[mode], save_strategy="steps", save_steps=3, max_steps=3)
    trainer = make_trainer(tmp_path / "again", **overrides)
    trainer.train()
    after_three = [p.detach().clone() for p in trainer.model.parameters()]
    trainer.args.max_steps = 7
    trainer.train(resume_from_checkpoint=True)

    fresh = make_trainer(tmp_path / "fresh", **{**overrides, "max_steps": 7})
    fresh.train(resume_from_checkpoint=str(tmp_path / "again" / "checkpoint-3"))
    for a, b in zip(trainer.model.parameters(), fresh.model.parameters()):
        assert torch.equal(a, b)
    assert (
        max((a - b).abs().max().item() for a, b in zip(trainer.model.parameters(), after_three))
        > 1e-3
    )
    assert trainer.gradient_computations == fresh.gradient_computations


@pytest.mark.parametrize("mode", ["same_batch", "switching"])
def test_a_second_train_without_resuming_keeps_training_with_the_same_engine(tmp_path, mode):
    """``train()`` twice: the second run starts its step count and data order anew and keeps the
    weights and the optimizer state (momentum; in switching mode the open cycle of 5 steps with
    k = 2), like the engine stepping on in a plain loop."""
    trainer = make_trainer(tmp_path, **{**MODES[mode], "max_steps": 5})
    trainer.train()
    trainer.train()
    model = make_model()
    engine = Lookbehind(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        model=model,
        **engine_kwargs(MODES[mode]),
    )
    for _ in range(2):
        for closure in sequential_closures(model, 16, 5):
            engine.step(closure)
    assert max_difference(trainer.model, model) < 1e-10
