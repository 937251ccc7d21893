"""LookbehindTrainer resumed on the same instance, from the newest checkpoint, and with
a changed method: each run continues exactly as an independent run from the same state (a fresh
Trainer resumed from the checkpoint, or the engine in a plain loop)."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.models import max_param_difference
from helpers.trainer_harness import (
    MODES,
    engine_kwargs,
    make_model,
    make_trainer,
    model_and_sgd_from_checkpoint,
    sequential_closures,
)

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
    assert max_param_difference(trainer.model, model) < 1e-10


def lookbehind_keys(state_dict: dict) -> set[str]:
    """The engine's entries: in the per-parameter state and the groups, and the run state
    (``state["lookbehind_run"]``)."""
    entries = [*state_dict["state"].values(), *state_dict["param_groups"]]
    keys = {key for entry in entries for key in entry if key.startswith("lookbehind_")}
    return keys | {
        key for key in state_dict["state"] if isinstance(key, str) and key.startswith("lookbehind_")
    }


def test_resuming_a_lookbehind_checkpoint_without_lookbehind_drops_its_entries(tmp_path, caplog):
    """A switching checkpoint cut mid-cycle (3 steps, k = 2), resumed with
    ``--lookbehind_method none``: the base optimizer continues from the slow weights of the
    model file with its momentum, without the engine's buffers and run state."""
    first = make_trainer(
        tmp_path, **MODES["switching"], max_steps=3, save_strategy="steps", save_steps=3
    )
    first.train()
    checkpoint = tmp_path / "checkpoint-3"
    assert lookbehind_keys(torch.load(checkpoint / "optimizer.pt", weights_only=True))

    plain = make_trainer(tmp_path, lookbehind_method="none", max_steps=5)
    with caplog.at_level(logging.WARNING, logger="hf_lookbehind"):
        plain.train(resume_from_checkpoint=str(checkpoint))
    assert "lookbehind_fast" in caplog.text and "lookbehind_run" in caplog.text
    assert not lookbehind_keys(plain.optimizer.state_dict())
    assert all("asam_scale" not in group for group in plain.optimizer.param_groups)

    model, sgd = model_and_sgd_from_checkpoint(checkpoint)
    for closure in sequential_closures(model, 16, 2, first_step=3):
        sgd.zero_grad()
        closure()
        sgd.step()
    assert max_param_difference(plain.model, model) < 1e-10


def test_resuming_a_plain_checkpoint_with_lookbehind_starts_a_cycle_on_its_momentum(
    tmp_path, caplog
):
    plain = make_trainer(
        tmp_path, lookbehind_method="none", max_steps=3, save_strategy="steps", save_steps=3
    )
    plain.train()
    checkpoint = tmp_path / "checkpoint-3"

    resumed = make_trainer(tmp_path, **MODES["switching"], max_steps=6)
    with caplog.at_level(logging.WARNING, logger="hf_lookbehind"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert "written without the Lookbehind engine" in caplog.text
    assert (
        resumed.lookbehind.stats().gradient_computations == 2 * 3
    )  # two passes per switching step

    model, sgd = model_and_sgd_from_checkpoint(checkpoint)
    engine = Lookbehind(sgd, model=model, **engine_kwargs(MODES["switching"]))
    for closure in sequential_closures(model, 16, 3, first_step=3):
        engine.step(closure)
    assert engine.cycle_position == resumed.lookbehind.cycle_position == 1
    assert max_param_difference(resumed.model, model) < 1e-10
