"""A hyper-parameter search reaches the engine: each trial's engine holds the trial's rho and
alpha, whether the settings come as ``lookbehind=LookbehindConfig(...)`` (any Trainer subclass,
TRL's included) or inside ``LookbehindTrainingArguments``."""

from __future__ import annotations

import copy

import pytest
from helpers.tiny_lm import causal_lm, char_tokenizer, instructions
from helpers.trainer_harness import ToyDataset, make_args, make_model
from transformers import TrainerCallback, TrainingArguments
from trl import SFTConfig, SFTTrainer

from hf_lookbehind import LookbehindConfig, LookbehindMixin, LookbehindTrainer

pytest.importorskip("optuna")


class EngineSettings(TrainerCallback):
    """The settings and the groups' values of each trial's engine, at its first step."""

    def __init__(self) -> None:
        self.seen: list[tuple[float, float, list[float]]] = []

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        if state.global_step == 0:
            engine = getattr(optimizer, "optimizer", optimizer)
            rhos = [group["lookbehind_rho"] for group in engine.param_groups]
            self.seen.append((engine.settings.rho, engine.settings.alpha, rhos))


def space(trial) -> dict:
    return {
        "rho": trial.suggest_float("rho", 0.1, 0.3),
        "lookbehind_alpha": trial.suggest_float("lookbehind_alpha", 0.6, 0.9),
        "learning_rate": trial.suggest_float("learning_rate", 0.01, 0.1),
    }


def search(trainer) -> None:
    trainer.hyperparameter_search(
        hp_space=space,
        backend="optuna",
        n_trials=2,
        compute_objective=lambda metrics: metrics.get("eval_loss", 0.0),
        direction="minimize",
    )


@pytest.mark.parametrize("where", ["lookbehind_config", "training_arguments"])
def test_each_trial_trains_with_its_own_rho_and_alpha(tmp_path, where):
    callback = EngineSettings()
    if where == "lookbehind_config":
        args = TrainingArguments(
            output_dir=str(tmp_path),
            max_steps=2,
            per_device_train_batch_size=16,
            learning_rate=0.1,
            report_to=[],
            use_cpu=True,
            save_strategy="no",
            disable_tqdm=True,
            max_grad_norm=0.0,
        )
        extra = {"lookbehind": LookbehindConfig(lookbehind_k=2, rho=0.05)}
    else:
        args, extra = make_args(tmp_path, max_steps=2, lookbehind_k=2, rho=0.05), {}
    trainer = LookbehindTrainer(
        model_init=make_model,
        args=args,
        train_dataset=ToyDataset(),
        eval_dataset=ToyDataset(16),
        callbacks=[callback],
        **extra,
    )
    search(trainer)
    assert len(callback.seen) == 2
    for rho, alpha, group_rhos in callback.seen:
        assert 0.1 <= rho <= 0.3 and 0.6 <= alpha <= 0.9  # the trial's, not 0.05 and 0.5
        assert set(group_rhos) == {rho}
    assert callback.seen[0][:2] != callback.seen[1][:2]


class LookbehindSFTTrainer(LookbehindMixin, SFTTrainer):
    pass


def test_a_trl_trainer_searches_rho_and_alpha(tmp_path):
    tokenizer = char_tokenizer()
    callback = EngineSettings()
    args = SFTConfig(
        output_dir=str(tmp_path),
        max_steps=1,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to=[],
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        max_length=64,
    )
    trainer = LookbehindSFTTrainer(
        model=causal_lm(tokenizer),
        args=args,
        lookbehind=LookbehindConfig(lookbehind_k=2),
        train_dataset=instructions(8),
        eval_dataset=instructions(4),
        processing_class=tokenizer,
        callbacks=[callback],
    )
    # TRL's trainers take no model_init: a search gives them one after construction, here a
    # copy of the model as the trainer prepared it
    prepared = copy.deepcopy(trainer.model)
    trainer.model_init = lambda trial=None: copy.deepcopy(prepared)
    search(trainer)
    assert len(callback.seen) == 2
    for rho, alpha, _ in callback.seen:
        assert 0.1 <= rho <= 0.3 and 0.6 <= alpha <= 0.9
