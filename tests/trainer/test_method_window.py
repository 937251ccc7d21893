"""Switching methods during training (Sec. 5.4): the Trainer runs the baseline outside the epoch
window and Lookbehind inside it, with one base optimizer throughout, against plain loops that
hand the same base optimizer from one engine to the next; resume across the switch is exact."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.models import max_param_difference
from helpers.trainer_harness import (
    ToyDataset,
    make_args,
    make_model,
    make_trainer,
    sequential_closures,
)

from hf_lookbehind import Lookbehind

BATCH, STEPS_PER_EPOCH, EPOCHS = 16, 4, 3
STEPS = STEPS_PER_EPOCH * EPOCHS


def handed_over_loop(phases: list[tuple[int, dict]]) -> torch.nn.Module:
    """Independent expectation: for each (steps, settings), a new engine around the same SGD
    optimizer (its momentum carries over) trains on the next sequential batches."""
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    closures = sequential_closures(model, BATCH, sum(steps for steps, _ in phases))
    for steps, settings in phases:
        # The previous engine's entries (its groups' hyper-parameters and its run state) go
        # with it; the base optimizer keeps its own state.
        for group in base.param_groups:
            for key in ("lookbehind_rho", "lookbehind_alpha", "lookbehind_adaptive_alpha"):
                group.pop(key, None)
        base.state.pop("lookbehind_run", None)
        engine = Lookbehind(base, rho=0.1, **settings)
        for _ in range(steps):
            engine.step(next(closures))
    return model


SAM = dict(method="sam")
WINDOWS = {
    # flags, and the expected phases in steps
    "sam_then_lookbehind": (
        dict(lookbehind_start_epoch=1.0, lookbehind_k=2),
        [(4, SAM), (8, dict(k=2))],
    ),
    "sam_lookbehind_sam_adaptive": (
        dict(lookbehind_start_epoch=1, lookbehind_end_epoch=2, lookbehind_adaptive_alpha=True),
        [(4, SAM), (4, dict(k=2, adaptive_alpha=True)), (4, SAM)],
    ),
    "lookbehind_then_multistep": (
        dict(lookbehind_end_epoch=2, lookbehind_k=3, baseline_method="multistep"),
        [(8, dict(k=3)), (4, dict(method="multistep", k=3))],
    ),
    # k = 3 inner steps of one batch each from step 1: the cycle that spans the end of epoch 2
    # (steps 7-9) completes before SAM takes over at step 10.
    "switching_k3_finishes_its_cycle": (
        dict(
            lookbehind_start_epoch=0.25,
            lookbehind_end_epoch=2,
            lookbehind_k=3,
            minibatch_switching=True,
        ),
        [(1, SAM), (9, dict(k=3, minibatch_switching=True)), (2, SAM)],
    ),
}


@pytest.mark.parametrize("window", WINDOWS)
def test_trainer_switches_methods_at_the_window(tmp_path, window):
    flags, phases = WINDOWS[window]
    trainer = make_trainer(tmp_path, max_steps=STEPS, **flags)
    trainer.train()
    expected = handed_over_loop(phases)
    assert max_param_difference(trainer.model, expected) < 1e-10
    passes = {"sam": 2, "multistep": 4}
    computations = sum(
        steps
        * (
            2
            if settings.get("minibatch_switching")
            else passes.get(settings.get("method"), settings.get("k", 0) + 1)
        )
        for steps, settings in phases
    )
    assert trainer.lookbehind.stats().gradient_computations == computations
    without_window = make_trainer(
        tmp_path / "plain",
        max_steps=STEPS,
        **{**flags, "lookbehind_start_epoch": 0.0, "lookbehind_end_epoch": None},
    )
    without_window.train()
    assert max_param_difference(trainer.model, without_window.model) > 1e-6


@pytest.mark.parametrize(
    "window,checkpoint",
    [
        ("sam_lookbehind_sam_adaptive", 4),  # written by SAM, resumed into Lookbehind
        ("sam_lookbehind_sam_adaptive", 6),  # inside the window
        ("switching_k3_finishes_its_cycle", 8),  # mid-cycle, past the window's end
        ("switching_k3_finishes_its_cycle", 10),  # back to SAM
    ],
)
def test_resume_across_the_switch_is_bit_identical(tmp_path, window, checkpoint):
    flags, _ = WINDOWS[window]
    settings = dict(max_steps=STEPS, save_strategy="steps", save_steps=1, **flags)
    uninterrupted = make_trainer(tmp_path / "a", **settings)
    uninterrupted.train()
    resumed = make_trainer(tmp_path / "b", **settings)
    resumed.train(resume_from_checkpoint=str(tmp_path / "a" / f"checkpoint-{checkpoint}"))
    assert max_param_difference(resumed.model, uninterrupted.model) == 0.0


@pytest.mark.parametrize(
    "flags,message",
    [
        (dict(lookbehind_start_epoch=2, lookbehind_end_epoch=1), "must come after its start"),
        (dict(lookbehind_start_epoch=-1), "must be >= 0"),
        (dict(lookbehind_end_epoch=1, lookbehind_method="none"), "has no engine"),
        (dict(lookbehind_end_epoch=1, baseline_method="lookahead"), "unknown baseline_method"),
        (
            dict(
                lookbehind_end_epoch=1, baseline_method="multistep", ascent_sync="per_micro_batch"
            ),
            "per_micro_batch",
        ),
    ],
)
def test_bad_windows_fail_when_the_arguments_are_built(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **flags)


def test_reconfigure_refuses_to_cut_a_cycle():
    model = make_model()
    engine = Lookbehind(torch.optim.SGD(model.parameters(), lr=0.1), k=3, minibatch_switching=True)
    dataset = ToyDataset()

    def closure():
        loss = model(dataset.x[:16], labels=dataset.y[:16])["loss"]
        loss.backward()
        return loss

    engine.step(closure)
    with pytest.raises(RuntimeError, match="1 of 3 inner steps"):
        engine.reconfigure(method="sam")


def test_a_window_that_starts_after_the_run_ends_is_announced(tmp_path, caplog):
    trainer = make_trainer(tmp_path, max_steps=2, lookbehind_start_epoch=5.0)
    with caplog.at_level(logging.WARNING, logger="hf_lookbehind"):
        trainer.train()
    assert "before --lookbehind_start_epoch 5.0: it trains with --baseline_method sam" in (
        caplog.text
    )


def test_per_device_ascent_in_one_process_is_announced(tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_lookbehind"):
        make_trainer(tmp_path, max_steps=1, ascent_sync="per_device")
    assert "--ascent_sync per_device has no effect in one process" in caplog.text
