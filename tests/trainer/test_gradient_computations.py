"""The Trainer logs the cumulative number of gradient computations (Table 10's unit: one
forward/backward pass over the batch) with every log entry, and it continues across a resume."""

from __future__ import annotations

import pytest
import torch
from helpers.trainer_harness import InOrderTrainer, ToyDataset, make_args, make_model, make_trainer
from transformers.integrations.integration_utils import rewrite_logs

STEPS = 6
# Flags, and the passes over the batch that one Trainer step of them costs.
MODES = {
    "sgd": (dict(lookbehind_method="none"), 1),
    "sam": (dict(lookbehind_method="sam", lookbehind_k=None), 2),
    "lookbehind_k2": (dict(lookbehind_k=2), 3),
    "lookbehind_adaptive_k3": (dict(lookbehind_k=3, lookbehind_adaptive_alpha=True), 4),
    "switching_k2": (dict(lookbehind_k=2, minibatch_switching=True), 2),
    "lookahead_sgd": (dict(lookbehind_method="lookahead", lookbehind_k=3, perturbation="none"), 1),
    "lookahead_sam": (dict(lookbehind_method="lookahead", lookbehind_k=3), 2),
    "multistep_avg_k3": (dict(lookbehind_method="multistep_avg", lookbehind_k=3), 4),
    "m_sam_lookbehind_k2": (
        dict(
            lookbehind_k=2,
            ascent_sync="per_micro_batch",
            per_device_train_batch_size=4,
            gradient_accumulation_steps=4,
        ),
        3,
    ),
    "accumulated_lookbehind_k2": (
        dict(lookbehind_k=2, per_device_train_batch_size=8, gradient_accumulation_steps=2),
        3,
    ),
}


def count_training_forwards(model) -> list[int]:
    """Counts the model's forward calls in training mode (evaluation runs in eval mode)."""
    calls = [0]

    def hook(module, args, output):
        calls[0] += module.training

    model.register_forward_hook(hook)
    return calls


def micro_batches_per_step(flags: dict) -> int:
    return flags.get("gradient_accumulation_steps", 1)


@pytest.mark.parametrize("mode", MODES)
def test_every_log_entry_carries_the_count(tmp_path, mode):
    flags, passes = MODES[mode]
    model = make_model()
    forwards = count_training_forwards(model)
    args = make_args(tmp_path, eval_strategy="steps", eval_steps=3, **flags)
    trainer = InOrderTrainer(
        model=model,
        args=args,
        train_dataset=ToyDataset(),
        eval_dataset=ToyDataset(n=16, seed=7),
        optimizers=(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), None),
    )
    trainer.train()
    assert forwards[0] == STEPS * passes * micro_batches_per_step(flags)  # measured passes
    history = trainer.state.log_history
    train_entries = [entry for entry in history if "loss" in entry]
    eval_entries = [entry for entry in history if "eval_loss" in entry]
    assert [e["gradient_computations"] for e in train_entries] == [
        step * passes for step in range(1, STEPS + 1)
    ]
    assert [e["eval_gradient_computations"] for e in eval_entries] == [3 * passes, 6 * passes]
    others = [entry for entry in history if entry not in eval_entries]
    assert all("gradient_computations" in entry for entry in others)


def test_tensorboard_files_the_evaluations_count_with_the_evaluation(tmp_path):
    """TensorBoard's callback files a key under ``eval/`` or ``train/`` by its prefix: an
    evaluation's entry puts nothing of its own under ``train/`` (``epoch`` is the Trainer's)."""
    model = make_model()
    trainer = InOrderTrainer(
        model=model,
        args=make_args(tmp_path, eval_strategy="steps", eval_steps=3, lookbehind_k=2),
        train_dataset=ToyDataset(),
        eval_dataset=ToyDataset(n=16, seed=7),
        optimizers=(torch.optim.SGD(model.parameters(), lr=0.1), None),
    )
    trainer.train()
    trainer.evaluate(metric_key_prefix="test")
    history = trainer.state.log_history
    evaluations = [e for e in history if "eval_loss" in e or "test_loss" in e]
    assert len(evaluations) == 3
    for entry in evaluations:  # "step" joins the entry after the callbacks saw it
        logged = {key: value for key, value in entry.items() if key != "step"}
        tags = {tag for tag in rewrite_logs(logged) if tag.startswith("train/")}
        assert tags == {"train/epoch"}, entry
    assert [e.get("test_gradient_computations") for e in evaluations][-1] == 6 * 3


@pytest.mark.parametrize("mode", ["lookbehind_k2", "switching_k2", "sgd"])
def test_the_count_continues_across_a_resume(tmp_path, mode):
    flags, passes = MODES[mode]
    first = make_trainer(tmp_path, save_strategy="steps", save_steps=3, **flags)
    first.train()
    resumed = make_trainer(tmp_path, save_strategy="steps", save_steps=3, **flags)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    after_resume = [e for e in resumed.state.log_history if "loss" in e and e["step"] > 3]
    assert [e["gradient_computations"] for e in after_resume] == [
        step * passes for step in range(4, STEPS + 1)
    ]
