"""EpochTimer counts each epoch's training and not the evaluation the Trainer runs after it.

The Trainer runs under a fake clock that advances 1 s per optimizer step and 100 s per
evaluation, so the expectation (steps per epoch, in seconds) is exact."""

from __future__ import annotations

import json
import math

import pytest
from helpers.trainer_harness import SAMPLES, ToyDataset, make_args, make_model
from transformers import TrainerCallback

from hf_lookbehind import LookbehindTrainer
from hf_lookbehind_recipes import epoch_timer as callbacks
from hf_lookbehind_recipes.epoch_timer import EpochTimer

STEP_SECONDS, EVALUATION_SECONDS = 1.0, 100.0


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class AdvanceClock(TrainerCallback):
    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock

    def on_step_end(self, args, state, control, **kwargs):
        self.clock.now += STEP_SECONDS

    def on_evaluate(self, args, state, control, **kwargs):
        self.clock.now += EVALUATION_SECONDS


@pytest.mark.parametrize("method", ["none", "lookbehind"])
def test_epoch_seconds_count_training_steps_only(tmp_path, monkeypatch, method):
    clock = FakeClock()
    monkeypatch.setattr(callbacks.time, "perf_counter", clock)
    epochs, batch = 3, 16
    args = make_args(
        tmp_path,
        max_steps=-1,
        num_train_epochs=epochs,
        per_device_train_batch_size=batch,
        eval_strategy="epoch",
        lookbehind_method=method,
    )
    timer = EpochTimer()
    trainer = LookbehindTrainer(
        model=make_model(),
        args=args,
        train_dataset=ToyDataset(),
        eval_dataset=ToyDataset(n=16, seed=4),
        callbacks=[AdvanceClock(clock), timer],
    )
    trainer.train()

    steps_per_epoch = SAMPLES // batch
    assert timer.epoch_seconds == [steps_per_epoch * STEP_SECONDS] * epochs
    assert timer.seconds_per_epoch() == steps_per_epoch * STEP_SECONDS
    logged = [e for e in trainer.state.log_history if callbacks.EPOCH_SECONDS_KEY in e]
    assert [e["epoch"] for e in logged] == [1.0, 2.0, 3.0]
    trainer.state.save_to_json(str(tmp_path / "state.json"))
    saved = json.loads((tmp_path / "state.json").read_text())["log_history"]
    assert sum(callbacks.EPOCH_SECONDS_KEY in e for e in saved) == epochs


def test_seconds_per_epoch_leaves_out_the_warm_up_epoch():
    timer = EpochTimer()
    assert math.isnan(timer.seconds_per_epoch())
    timer.epoch_seconds = [9.0]
    assert timer.seconds_per_epoch() == 9.0
    timer.epoch_seconds = [9.0, 2.0, 4.0]
    assert timer.seconds_per_epoch() == 3.0
