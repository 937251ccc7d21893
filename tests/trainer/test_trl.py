"""TRL's trainers with Lookbehind through ``LookbehindMixin`` (tiny Llama models built from
configs, LoRA adapters from PEFT): passes per step, which weights change, every logged metric
against the plain TRL trainer on the same batch at the same weights, reference-model forwards
per step against the plain trainer's, FLOs, and the saved model reloaded."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from datasets import Dataset
from helpers.tiny_lm import causal_lm, char_tokenizer, instructions, preferences, reward_model
from peft import LoraConfig, PeftModel
from transformers import AutoModelForCausalLM, HfArgumentParser, TrainerCallback, TrainingArguments
from trl import (
    DPOConfig,
    DPOTrainer,
    GRPOConfig,
    GRPOTrainer,
    KTOConfig,
    KTOTrainer,
    RewardConfig,
    RewardTrainer,
    SFTConfig,
    SFTTrainer,
)

from hf_lookbehind import LookbehindConfig, LookbehindMixin, LookbehindTrainingArguments

STEPS = 3
SAME_BATCH = LookbehindConfig(lookbehind_k=2, rho=0.05)
SWITCHING = LookbehindConfig(lookbehind_k=2, rho=0.05, minibatch_switching=True)
LORA = dict(r=4, target_modules=["q_proj", "v_proj"])


class Recorded:
    """A trainer that keeps the micro-batches of every step as the Trainer fetched them, with
    their item count."""

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, count = super().get_batch_samples(epoch_iterator, num_batches, device)
        self.recorded_batches.append((batches, count))
        return batches, count


class WeightsAtStepBegin(TrainerCallback):
    def __init__(self) -> None:
        self.weights: list[dict[str, torch.Tensor]] = []

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        self.weights.append(trainable_weights(model))


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def recorded(trainer_class: type) -> type:
    return type(trainer_class.__name__, (Recorded, trainer_class), {})


def lookbehind_class(trainer_class: type) -> type:
    """What a user writes: ``class LookbehindXTrainer(LookbehindMixin, XTrainer)`` (with the
    test's recording of batches)."""
    bases = (Recorded, LookbehindMixin, trainer_class)
    return type(f"Lookbehind{trainer_class.__name__}", bases, {})


def config(config_class: type, output_dir, **overrides):
    settings = dict(
        output_dir=str(output_dir),
        max_steps=STEPS,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="constant",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        disable_tqdm=True,
    )
    settings.update(overrides)
    return config_class(**settings)


class ForwardCounter:
    """Forwards of a module, counted by a forward hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.count = 0
        module.register_forward_hook(self._hook)

    def _hook(self, *args) -> None:
        self.count += 1


class WeightsOfAnotherRun(TrainerCallback):
    """At the beginning of every step, the trainable weights another run held then."""

    def __init__(self, weights: list[dict[str, torch.Tensor]]) -> None:
        self.weights = weights

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        model.load_state_dict(self.weights[state.global_step], strict=False)


def plain_logs(plain, trainer, first_pass_steps: list[int]) -> list[dict[str, float]]:
    """What ``plain`` (the same TRL trainer without Lookbehind) logs at every step of
    ``trainer``'s run: its own training on the same batches, from the weights ``trainer`` held at
    the beginning of each step. Where ``trainer``'s first pass ran elsewhere (switching mode,
    inside a cycle), only the token count."""
    callbacks = trainer.callback_handler.callbacks
    recorder = next(c for c in callbacks if isinstance(c, WeightsAtStepBegin))
    plain.add_callback(WeightsOfAnotherRun(recorder.weights))
    plain.recorded_batches = []
    plain.train()
    for (ours, _), (theirs, _) in zip(trainer.recorded_batches, plain.recorded_batches):
        for a, b in zip(ours, theirs):
            assert torch.equal(a["input_ids"], b["input_ids"])
    logs = [entry for entry in plain.state.log_history if "loss" in entry]
    metrics = ("loss", "num_tokens", "entropy", "mean_token_accuracy", "accuracy", "margin",
               "min_reward", "mean_reward", "max_reward", "kl")  # fmt: skip
    data = [{key: entry[key] for key in entry if key in metrics or "/" in key} for entry in logs]
    return [
        entry if step in first_pass_steps else {"num_tokens": entry["num_tokens"]}
        for step, entry in enumerate(data)
    ]


def assert_logs_match(trainer, expected: list[dict[str, float]]) -> None:
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == len(expected) == STEPS
    for entry, plain in zip(logged, expected):
        assert plain.keys() <= entry.keys()
        for key, value in plain.items():
            assert entry[key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


def first_pass_steps(lookbehind: LookbehindConfig) -> list[int]:
    """Steps whose first pass runs at the weights the model holds when they begin: every step
    in same-batch mode, the first step of each cycle in switching mode."""
    k = lookbehind.lookbehind_k
    return [s for s in range(STEPS) if not lookbehind.minibatch_switching or s % k == 0]


def passes_per_step(lookbehind: LookbehindConfig) -> int:
    return 2 if lookbehind.minibatch_switching else lookbehind.lookbehind_k + 1


def train(trainer):
    trainer.add_callback(WeightsAtStepBegin())
    trainer.recorded_batches = []
    trainer.train()
    return trainer


def assert_trainable_weights_changed(model, initial: dict[str, torch.Tensor]) -> set[str]:
    """Every trainable weight moved and no other did; returns the names of those that moved."""
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, initial[n])}
    assert changed == {n for n, p in model.named_parameters() if p.requires_grad}
    return changed


def assert_same_weights(reloaded: torch.nn.Module, trainer) -> None:
    """The model reloaded from what ``trainer`` saved holds the trained (slow) weights."""
    trained = dict(trainer.model.named_parameters())
    reloaded_weights = dict(reloaded.named_parameters())
    assert reloaded_weights.keys() == trained.keys()
    for name, p in reloaded_weights.items():
        assert torch.equal(p, trained[name]), name


# ------------------------------------------------------------------------------------- SFT
@pytest.mark.parametrize(
    "lookbehind, accumulation",
    [(SAME_BATCH, 1), (SWITCHING, 2)],
    ids=["same_batch", "switching_accumulated"],
)
def test_sft_with_lora_logs_what_plain_sft_logs(tmp_path, lookbehind, accumulation):
    tokenizer = char_tokenizer()
    args = config(SFTConfig, tmp_path, gradient_accumulation_steps=accumulation)
    trainer = lookbehind_class(SFTTrainer)(
        model=causal_lm(tokenizer),
        args=args,
        lookbehind=lookbehind,
        train_dataset=instructions(),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    assert trainer.args is args  # TRL's own config, its defaults untouched
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    forwards = ForwardCounter(trainer.model.get_base_model().model)
    train(trainer)
    passes = passes_per_step(lookbehind)
    assert forwards.count == STEPS * passes * accumulation
    assert trainer.lookbehind.stats().gradient_computations == STEPS * passes
    changed = assert_trainable_weights_changed(trainer.model, initial)
    assert all("lora_" in name for name in changed)

    plain = recorded(SFTTrainer)(
        model=causal_lm(tokenizer),
        args=config(SFTConfig, tmp_path / "plain", gradient_accumulation_steps=accumulation),
        train_dataset=instructions(),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    assert_logs_match(trainer, plain_logs(plain, trainer, first_pass_steps(lookbehind)))
    assert trainer.state.total_flos == pytest.approx(passes * plain.state.total_flos)

    trainer.save_model(tmp_path / "saved")
    reloaded = PeftModel.from_pretrained(causal_lm(tokenizer), tmp_path / "saved")
    assert_same_weights(reloaded, trainer)


class LookbehindSFTTrainer(LookbehindMixin, SFTTrainer):
    pass


def lora_sft(output_dir, lookbehind: LookbehindConfig):
    """SFT with LoRA from peft_config, 4 steps on a linear schedule, saved after every step."""
    tokenizer = char_tokenizer()
    args = config(
        SFTConfig,
        output_dir,
        max_steps=4,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=1,
        seed=0,
    )
    return LookbehindSFTTrainer(
        model=causal_lm(tokenizer),
        args=args,
        lookbehind=lookbehind,
        train_dataset=instructions(),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )


@pytest.mark.parametrize(
    "lookbehind, step", [(SAME_BATCH, 2), (SWITCHING, 3)], ids=["same_batch", "switching_mid_cycle"]
)
def test_sft_with_lora_resumes_bit_identically(tmp_path, lookbehind, step):
    """The checkpoints hold the adapter as PEFT saves it; resumed from one (in switching mode
    from inside a cycle of k = 2), the run ends where the uninterrupted run ends."""
    uninterrupted = lora_sft(tmp_path / "whole", lookbehind)
    uninterrupted.train()
    checkpoint = tmp_path / "whole" / f"checkpoint-{step}"
    assert (checkpoint / "adapter_model.safetensors").is_file()

    resumed = lora_sft(tmp_path / "resumed", lookbehind)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected = uninterrupted.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert resumed.gradient_computations == uninterrupted.gradient_computations


# ------------------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("reference", ["ref_model", "lora"])
def test_dpo_runs_the_reference_once_per_batch(tmp_path, reference):
    """With a reference model, and with LoRA (the reference is the model without adapters):
    the reference forwards per step are the plain DPOTrainer's, the rewards, margins and
    log-probabilities logged are its own at the same weights."""
    tokenizer = char_tokenizer()

    def build(trainer_class, output_dir, **extra):
        if reference == "lora":
            setup = dict(peft_config=LoraConfig(**LORA))
        else:
            setup = dict(ref_model=causal_lm(tokenizer))
        return trainer_class(
            model=causal_lm(tokenizer),
            args=config(DPOConfig, output_dir),
            train_dataset=preferences(),
            processing_class=tokenizer,
            **setup,
            **extra,
        )

    def reference_forwards(trainer) -> ForwardCounter:
        if reference == "lora":
            return ForwardCounter(trainer.model.get_base_model().model)
        return ForwardCounter(trainer.ref_model.model)

    trainer = build(lookbehind_class(DPOTrainer), tmp_path, lookbehind=SAME_BATCH)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    counted = reference_forwards(trainer)
    train(trainer)
    plain = build(recorded(DPOTrainer), tmp_path / "plain")
    plain_counted = reference_forwards(plain)
    expected = plain_logs(plain, trainer, first_pass_steps(SAME_BATCH))
    assert_logs_match(trainer, expected)
    assert {"rewards/margins", "logps/chosen", "rewards/accuracies"} <= expected[0].keys()

    passes = passes_per_step(SAME_BATCH)
    if reference == "lora":  # the policy's passes and the reference share the base model
        assert counted.count - STEPS * passes == plain_counted.count - STEPS == STEPS
        changed = assert_trainable_weights_changed(trainer.model, initial)
        assert all("lora_" in name for name in changed)
    else:
        assert counted.count == plain_counted.count == STEPS
        assert_trainable_weights_changed(trainer.model, initial)
        fresh = causal_lm(tokenizer)
        for (name, p), q in zip(trainer.ref_model.named_parameters(), fresh.parameters()):
            assert torch.equal(p, q), name
        trainer.save_model(tmp_path / "saved")
        assert_same_weights(AutoModelForCausalLM.from_pretrained(tmp_path / "saved"), trainer)


# ---------------------------------------------------------------------------------- Reward
def test_reward_model_with_lora_logs_what_plain_reward_training_logs(tmp_path):
    tokenizer = char_tokenizer()

    def build(trainer_class, output_dir, **extra):
        return trainer_class(
            model=reward_model(tokenizer),
            args=config(RewardConfig, output_dir),
            train_dataset=preferences(),
            processing_class=tokenizer,
            peft_config=LoraConfig(task_type="SEQ_CLS", **LORA),
            **extra,
        )

    trainer = build(lookbehind_class(RewardTrainer), tmp_path, lookbehind=SWITCHING)
    initial = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    train(trainer)
    assert trainer.lookbehind.stats().gradient_computations == STEPS * passes_per_step(SWITCHING)
    changed = assert_trainable_weights_changed(trainer.model, initial)
    assert all("lora_" in n or "score.modules_to_save" in n for n in changed)
    plain = build(recorded(RewardTrainer), tmp_path / "plain")
    expected = plain_logs(plain, trainer, first_pass_steps(SWITCHING))
    assert {"accuracy", "margin", "mean_reward"} <= expected[0].keys()
    assert_logs_match(trainer, expected)

    trainer.save_model(tmp_path / "saved")
    reloaded = PeftModel.from_pretrained(reward_model(tokenizer), tmp_path / "saved")
    assert_same_weights(reloaded, trainer)


# ------------------------------------------------------------------------------------- KTO
def test_kto_reference_model_runs_once_per_batch(tmp_path):
    """KTO's reference log-probabilities (of the completions and of the KL batch) are computed
    once per batch, as the plain KTOTrainer computes them."""
    tokenizer = char_tokenizer()
    data = Dataset.from_list(
        [{**example, "label": i % 2 == 0} for i, example in enumerate(instructions())]
    )

    def build(trainer_class, output_dir, **extra):
        return trainer_class(
            model=causal_lm(tokenizer),
            ref_model=causal_lm(tokenizer),
            args=config(KTOConfig, output_dir),
            train_dataset=data,
            processing_class=tokenizer,
            **extra,
        )

    trainer = build(lookbehind_class(KTOTrainer), tmp_path, lookbehind=SAME_BATCH)
    counted = ForwardCounter(trainer.ref_model.model)
    train(trainer)
    plain = build(recorded(KTOTrainer), tmp_path / "plain")
    plain_counted = ForwardCounter(plain.ref_model.model)
    assert_logs_match(trainer, plain_logs(plain, trainer, first_pass_steps(SAME_BATCH)))
    assert counted.count == plain_counted.count > 0


# ---------------------------------------------------------------------------- configuration
def test_a_rebuilt_config_keeps_the_lookbehind_settings(tmp_path):
    """SFTTrainer turns plain TrainingArguments into an SFTConfig; the Lookbehind settings,
    given apart, are those of the engine."""
    tokenizer = char_tokenizer()
    trainer = lookbehind_class(SFTTrainer)(
        model=causal_lm(tokenizer),
        args=config(TrainingArguments, tmp_path, max_steps=1),
        lookbehind=LookbehindConfig(lookbehind_k=3, rho=0.2),
        train_dataset=instructions(),
        processing_class=tokenizer,
    )
    assert isinstance(trainer.args, SFTConfig)
    train(trainer)
    assert (trainer.lookbehind.settings.k, trainer.lookbehind.settings.rho) == (3, 0.2)
    assert all(group["lookbehind_rho"] == 0.2 for group in trainer.lookbehind.param_groups)
    assert trainer.lookbehind.stats().gradient_computations == 4


def test_lookbehind_training_arguments_in_a_trainer_that_rebuilds_them_are_refused(tmp_path):
    tokenizer = char_tokenizer()
    args = LookbehindTrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True)
    with pytest.raises(TypeError, match=r"SFTConfig.*lookbehind=LookbehindConfig"):
        lookbehind_class(SFTTrainer)(
            model=causal_lm(tokenizer),
            args=args,
            train_dataset=instructions(),
            processing_class=tokenizer,
        )


def test_the_command_line_parses_a_trl_config_and_the_lookbehind_settings():
    parser = HfArgumentParser((SFTConfig, LookbehindConfig))
    sft, lookbehind = parser.parse_args_into_dataclasses(
        args=["--output_dir", "out", "--lookbehind_k", "3", "--minibatch_switching",
              "--rho", "0.1", "--max_length", "256", "--use_cpu"]
    )  # fmt: skip
    assert lookbehind.lookbehind_k == 3 and lookbehind.minibatch_switching
    assert lookbehind.rho == 0.1
    assert sft.max_length == 256
    defaults = SFTConfig(output_dir="out", max_length=256, use_cpu=True)
    assert sft.gradient_checkpointing and sft.bf16  # SFTConfig's own defaults
    for field in dataclasses.fields(SFTConfig):
        if field.name not in ("logging_dir",):
            assert getattr(sft, field.name) == getattr(defaults, field.name), field.name


def test_on_policy_trainers_are_refused_before_training(tmp_path):
    """GRPOTrainer generates completions in ``_prepare_inputs`` and hands out one buffered
    batch per call, so the passes of a step would not see one batch."""
    tokenizer = char_tokenizer()
    prompts = Dataset.from_list([{"prompt": question} for question in instructions()["prompt"]])
    with pytest.raises(ValueError, match="_prepare_inputs"):
        lookbehind_class(GRPOTrainer)(
            model=causal_lm(tokenizer),
            reward_funcs=lambda completions, **kwargs: [float(len(c)) for c in completions],
            args=config(GRPOConfig, tmp_path, per_device_train_batch_size=2, num_generations=2,
                        max_completion_length=4),
            lookbehind=SAME_BATCH,
            train_dataset=prompts,
            processing_class=tokenizer,
        )  # fmt: skip
