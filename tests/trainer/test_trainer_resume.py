"""LookbehindTrainer resumed on the same instance, from the newest checkpoint, with a changed
method, and on a PEFT model (LoRA): each run continues exactly as an independent run from the
same state (a fresh Trainer resumed from the checkpoint, the uninterrupted run, or the engine in
a plain loop)."""

from __future__ import annotations

import logging

import pytest
import torch
from helpers.models import max_param_difference
from helpers.tiny_lm import causal_lm, char_tokenizer, question
from helpers.trainer_harness import (
    MODES,
    engine_kwargs,
    make_model,
    make_trainer,
    model_and_sgd_from_checkpoint,
    sequential_closures,
)
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import TrainingArguments

from hf_lookbehind import Lookbehind, LookbehindConfig, LookbehindTrainer


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


# ------------------------------------------------------------------------------------ LoRA
LORA_TARGETS = ("q_proj", "v_proj")
LORA_MODES = {
    "same_batch": (LookbehindConfig(lookbehind_k=2, rho=0.05), 2),
    # Resumed from step 3 with k = 2: inside a cycle, its buffers in optimizer.pt.
    "switching": (LookbehindConfig(lookbehind_k=2, rho=0.05, minibatch_switching=True), 3),
}


class Questions(Dataset):
    """The tiny language model's questions as padded token ids, the padding masked out of the
    loss."""

    def __init__(self, n: int = 16, length: int = 24) -> None:
        tokenizer = char_tokenizer()
        encoded = tokenizer(
            [question(i) for i in range(n)],
            padding="max_length",
            max_length=length,
            return_tensors="pt",
        )
        self.ids, self.mask = encoded["input_ids"], encoded["attention_mask"]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        ids, mask = self.ids[index], self.mask[index]
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "labels": ids.masked_fill(mask == 0, -100),
        }


def lora_trainer(output_dir, lookbehind: LookbehindConfig, targets=LORA_TARGETS, **overrides):
    """LookbehindTrainer on a PEFT model (LoRA on a tiny Llama), saved after every step."""
    model = get_peft_model(
        causal_lm(char_tokenizer()), LoraConfig(r=4, target_modules=list(targets))
    )
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        lr_scheduler_type="linear",
        max_steps=4,
        save_strategy="steps",
        save_steps=1,
        logging_steps=1,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    args = TrainingArguments(**{**settings, **overrides})
    return LookbehindTrainer(
        model=model, args=args, train_dataset=Questions(), lookbehind=lookbehind
    )


@pytest.mark.parametrize("mode", LORA_MODES)
def test_a_lora_run_resumes_bit_identically(tmp_path, mode):
    """A checkpoint holds the adapter as PEFT saves it (adapter_model.safetensors): resumed, the
    run ends where the uninterrupted run ends, also from inside a switching cycle."""
    lookbehind, step = LORA_MODES[mode]
    uninterrupted = lora_trainer(tmp_path / "whole", lookbehind)
    uninterrupted.train()
    checkpoint = tmp_path / "whole" / f"checkpoint-{step}"
    assert (checkpoint / "adapter_model.safetensors").is_file()
    assert not (checkpoint / "model.safetensors").exists()

    resumed = lora_trainer(tmp_path / "resumed", lookbehind)
    resumed.train(resume_from_checkpoint=str(checkpoint))
    expected = uninterrupted.model.state_dict()
    for name, value in resumed.model.state_dict().items():
        assert torch.equal(value, expected[name]), name
    assert resumed.gradient_computations == uninterrupted.gradient_computations


def test_a_lora_checkpoint_of_other_target_modules_is_refused_naming_a_few_names(tmp_path):
    """LoRA on q_proj and v_proj, resumed on all four attention projections: the adapter file
    lacks 8 tensors per layer pair; the refusal names a few of them and the count."""
    lookbehind = LORA_MODES["same_batch"][0]
    lora_trainer(tmp_path, lookbehind, max_steps=1).train()
    other = lora_trainer(tmp_path, lookbehind, targets=("q_proj", "k_proj", "v_proj", "o_proj"))
    with pytest.raises(
        ValueError, match=r"adapter_model\.safetensors was written for another"
    ) as e:
        other.train(resume_from_checkpoint=str(tmp_path / "checkpoint-1"))
    message = str(e.value)
    assert "missing: 8 (" in message and "and 3 more" in message
    assert message.count(".lora_") == 5


def test_a_checkpoint_without_a_readable_random_state_is_named_before_any_work(tmp_path, caplog):
    """With dropout the random state decides the resumed run: a truncated ``rng_state.pth`` is
    refused, naming the file, before any work; a missing one is said in a warning (the run
    does not continue exactly), where the Trainer logs it at the info level."""
    overrides = dict(MODES["same_batch"], save_strategy="steps", save_steps=2, max_steps=2)
    make_trainer(tmp_path / "run", **overrides).train()
    checkpoint = tmp_path / "run" / "checkpoint-2"
    rng = checkpoint / "rng_state.pth"
    saved = rng.read_bytes()
    rng.write_bytes(saved[:40])
    resumed = make_trainer(tmp_path / "resumed", **{**overrides, "max_steps": 4})
    before = [p.detach().clone() for p in resumed.model.parameters()]
    with pytest.raises(ValueError, match=r"rng_state\.pth is truncated or corrupt"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    assert all(torch.equal(p, b) for p, b in zip(resumed.model.parameters(), before))
    rng.unlink()
    with caplog.at_level(logging.WARNING, logger="hf_lookbehind"):
        make_trainer(tmp_path / "again", **{**overrides, "max_steps": 4}).train(
            resume_from_checkpoint=str(checkpoint)
        )
    assert "rng_state.pth is missing: the resumed run draws other dropout masks" in caplog.text
