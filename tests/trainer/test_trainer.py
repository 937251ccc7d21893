"""LookbehindTrainer against the core engine in a plain loop, gradient accumulation, DDP,
resume, mixed precision, logging and bad flags (CPU, float64 where exactness is asserted)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from helpers import HELPERS
from helpers.models import max_param_difference
from helpers.trainer_harness import (
    MODES,
    InOrderTrainer,
    ToyDataset,
    engine_kwargs,
    make_args,
    make_model,
    make_trainer,
    plain_loop,
)
from helpers.two_processes import run_two_processes
from safetensors.torch import load_file
from transformers import TrainingArguments

from hf_lookbehind import (
    Lookbehind,
    LookbehindTrainer,
    LookbehindTrainingArguments,
    asam_param_groups,
)
from hf_lookbehind.trainer.engine import TrainerEngine

HARNESS = HELPERS / "trainer_harness.py"


@pytest.mark.parametrize("mode", MODES)
def test_trainer_reproduces_the_engine_in_a_plain_loop(tmp_path, mode):
    trainer = make_trainer(tmp_path, **MODES[mode])
    trainer.train()
    expected = plain_loop(make_model(), 16, 6, **engine_kwargs(MODES[mode]))
    assert max_param_difference(trainer.model, expected) < 1e-10
    assert max_param_difference(trainer.model, make_model()) > 1e-3


def plain_adamw_loop(label_smoothing: float) -> torch.nn.Module:
    model = make_model()
    base = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.0, eps=1e-6)
    engine = Lookbehind(base, k=2, rho=0.1)
    dataset = ToyDataset()
    for step in range(6):
        start = (step % 4) * 16
        x, y = dataset.x[start : start + 16], dataset.y[start : start + 16]

        def closure(x=x, y=y):
            logits = model(x)["logits"]
            loss = torch.nn.functional.cross_entropy(logits, y, label_smoothing=label_smoothing)
            loss.backward()
            return loss

        engine.step(closure)
    return model


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
def test_trainer_built_optimizer_and_label_smoothing(tmp_path, label_smoothing):
    """``--optim adamw_torch`` (the Trainer builds the base optimizer) and
    ``--label_smoothing_factor`` (the Trainer's loss) go through the engine unchanged. The
    Trainer's label smoother sums log-probabilities in float32, so that case agrees to 1e-6
    instead of 1e-10. adam_epsilon 1e-6: Adam amplifies last-bit differences by lr/eps."""
    args = make_args(
        tmp_path,
        optim="adamw_torch",
        learning_rate=0.01,
        adam_epsilon=1e-6,
        label_smoothing_factor=label_smoothing,
    )
    model = make_model()
    model.config = SimpleNamespace()  # the Trainer's label smoothing reads model.config
    trainer = InOrderTrainer(model=model, args=args, train_dataset=ToyDataset())
    trainer.train()
    assert isinstance(trainer.lookbehind.base_optimizer, torch.optim.AdamW)
    tolerance = 1e-6 if label_smoothing else 1e-10
    assert max_param_difference(trainer.model, plain_adamw_loop(label_smoothing)) < tolerance
    assert max_param_difference(trainer.model, plain_adamw_loop(0.3 - label_smoothing)) > 1e-4


def test_asam_rescales_only_weights_by_default(tmp_path):
    """``--perturbation asam`` with the default ``--asam_weights_only`` splits the Trainer's
    parameter groups the way the public ASAM code does (names containing ``weight``)."""
    trainer = make_trainer(tmp_path, perturbation="asam", rho=0.5)
    trainer.train()
    flags = {
        name: group["asam_scale"]
        for group in trainer.lookbehind.param_groups
        for name, p in trainer.model.named_parameters()
        if any(p is q for q in group["params"])
    }
    assert flags == {"fc1.weight": True, "fc1.bias": False, "fc2.weight": True, "fc2.bias": False}
    model = make_model()
    engine = Lookbehind(
        torch.optim.SGD(asam_param_groups(model), lr=0.1, momentum=0.9),
        k=2,
        rho=0.5,
        perturbation="asam",
    )
    dataset = ToyDataset()
    for step in range(6):
        x, y = dataset.x[(step % 4) * 16 :][:16], dataset.y[(step % 4) * 16 :][:16]
        engine.step(lambda x=x, y=y: model(x, labels=y)["loss"].backward())
    assert max_param_difference(trainer.model, model) < 1e-10


def test_asam_regrouping_refuses_a_scheduler_built_on_the_old_groups(tmp_path):
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2)
    trainer = InOrderTrainer(
        model=model,
        args=make_args(tmp_path, perturbation="asam"),
        train_dataset=ToyDataset(),
        optimizers=(optimizer, scheduler),
    )
    with pytest.raises(ValueError, match="asam_param_groups"):
        trainer.train()


def test_training_step_outside_the_training_loop_trains(tmp_path):
    trainer = make_trainer(tmp_path)
    trainer.create_optimizer()
    trainer.current_gradient_accumulation_steps = 1  # what the Trainer's loop sets per step
    before = [p.detach().clone() for p in trainer.model.parameters()]
    batch = {"x": ToyDataset().x[:16], "labels": ToyDataset().y[:16]}
    loss = trainer.training_step(trainer.model, batch)
    assert loss > 0
    assert any(not torch.equal(a, b) for a, b in zip(before, trainer.model.parameters()))


@pytest.mark.parametrize("mode", ["same_batch", "switching"])
def test_gradient_accumulation_equals_the_large_batch(tmp_path, mode):
    large = make_trainer(tmp_path / "large", **MODES[mode])
    large.train()
    accumulated = make_trainer(
        tmp_path / "accumulated",
        per_device_train_batch_size=4,
        gradient_accumulation_steps=4,
        **MODES[mode],
    )
    accumulated.train()
    assert max_param_difference(large.model, accumulated.model) < 1e-10
    single_micro_batch = plain_loop(make_model(), 4, 6, **engine_kwargs(MODES[mode]))
    assert max_param_difference(accumulated.model, single_micro_batch) > 1e-4


def test_logs_carry_the_lookbehind_diagnostics(tmp_path):
    trainer = make_trainer(tmp_path, lookbehind_adaptive_alpha=True, lookbehind_k=3)
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logged) == 6
    for entry in logged:
        assert 0.0 <= entry["lookbehind_alpha"] <= 1.0
        assert entry["ascent_grad_norm"] > 0
        assert 0 < entry["perturbation_distance"] <= 3 * 0.1 + 1e-9  # k ascent steps of rho
        assert entry["skipped_steps"] == 0
        assert entry["grad_norm"] > 0


def test_method_none_is_the_plain_trainer(tmp_path):
    trainer = make_trainer(tmp_path, lookbehind_method="none")
    trainer.train()
    assert trainer.lookbehind is None
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    dataset = ToyDataset()
    for step in range(6):
        start = (step % 4) * 16
        optimizer.zero_grad()
        model(dataset.x[start : start + 16], labels=dataset.y[start : start + 16])[
            "loss"
        ].backward()
        optimizer.step()
    assert max_param_difference(trainer.model, model) < 1e-10


# ------------------------------------------------------------------------------------ DDP
def launch_two_processes(output_dir: Path, overrides: dict, launcher: str) -> list[dict]:
    """Run the harness in two gloo processes with ``torchrun`` or ``accelerate launch`` (with
    the repository's multi-GPU config); return each rank's final weights."""
    run_two_processes(
        HARNESS,
        [str(output_dir), json.dumps(overrides)],
        launcher,
    )
    return [json.loads((output_dir / f"weights_rank{rank}.json").read_text()) for rank in (0, 1)]


def weights_of(model: torch.nn.Module) -> dict:
    return {name: p.detach().tolist() for name, p in model.named_parameters()}


def largest_gap(a: dict, b: dict) -> float:
    def as_float64(values) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.float64)

    return max((as_float64(a[k]) - as_float64(b[k])).abs().max().item() for k in a)


@pytest.mark.slow
def test_two_processes_reproduce_one_process_on_the_global_batch(tmp_path):
    rank0, rank1 = launch_two_processes(
        tmp_path / "two", {"per_device_train_batch_size": 8}, "torchrun"
    )
    assert rank0 == rank1
    one = make_trainer(tmp_path / "one")
    one.train()
    assert largest_gap(rank0, weights_of(one.model)) < 1e-10
    half_batch = plain_loop(make_model(), 8, 6, **engine_kwargs({}))
    assert largest_gap(rank0, weights_of(half_batch)) > 1e-4


@pytest.mark.slow
def test_per_device_ascent_keeps_ranks_bit_identical(tmp_path):
    overrides = {"per_device_train_batch_size": 8, "max_steps": 20}
    per_device = launch_two_processes(
        tmp_path / "pd", {**overrides, "ascent_sync": "per_device"}, "accelerate"
    )
    assert per_device[0] == per_device[1]
    one = make_trainer(tmp_path / "one", max_steps=20)
    one.train()
    assert largest_gap(per_device[0], weights_of(one.model)) > 1e-6  # m-SAM differs


# --------------------------------------------------------------------------------- resume
@pytest.mark.parametrize("mode", ["same_batch", "switching", "switching_adaptive_asam"])
def test_resume_from_a_checkpoint_continues_bit_identically(tmp_path, mode):
    overrides = dict(MODES[mode], save_strategy="steps", save_steps=5, max_steps=7)
    uninterrupted = make_trainer(tmp_path / "full", **overrides)
    uninterrupted.train()

    interrupted = make_trainer(tmp_path / "part", **overrides)
    interrupted.train()
    checkpoint = tmp_path / "part" / "checkpoint-5"
    shutil.rmtree(tmp_path / "part" / "checkpoint-7", ignore_errors=True)
    resumed = make_trainer(tmp_path / "part", model=make_model(), **overrides)
    resumed.model.fc1.weight.data.zero_()  # the checkpoint must restore everything
    resumed.train(resume_from_checkpoint=str(checkpoint))
    for a, b in zip(uninterrupted.model.parameters(), resumed.model.parameters()):
        assert torch.equal(a, b)

    # The model file of the checkpoint holds the slow weights after 5 steps, also mid-cycle.
    five_steps = make_trainer(tmp_path / "five", **{**overrides, "max_steps": 5})
    five_steps.train()
    saved = load_file(checkpoint / "model.safetensors")
    for name, p in five_steps.model.named_parameters():
        assert torch.equal(saved[name], p.detach())
    if MODES[mode].get("minibatch_switching"):
        assert five_steps.lookbehind.cycle_position == 5 % MODES[mode]["lookbehind_k"] != 0
        engine = five_steps.lookbehind
        params = [p for group in engine.param_groups for p in group["params"]]
        index = next(i for i, p in enumerate(params) if p is five_steps.model.fc1.weight)
        fast = engine.state_dict()["state"][index]["lookbehind_fast"]
        assert not torch.equal(fast, saved["fc1.weight"])


def trainer_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("hf_lookbehind.trainer")]


@pytest.mark.parametrize("mode", ["switching", "lookahead_sam"])
def test_a_last_incomplete_cycle_is_announced_before_and_after_training(tmp_path, caplog, mode):
    """7 steps in cycles of k = 2 (switching) or 3 (lookahead): the last step never reaches the
    slow weights, so the final model is that of 6 steps; the run says so before training and
    at its end, and a run of 6 steps says nothing."""
    k = MODES[mode]["lookbehind_k"]
    seven = make_trainer(tmp_path / "seven", **{**MODES[mode], "max_steps": 7})
    with caplog.at_level(logging.WARNING, logger="hf_lookbehind"):
        seven.train()
    before, after = trainer_warnings(caplog)
    assert "max_steps=7" in before and f"k={k}" in before
    assert "the last 1 inner steps will not reach the slow weights" in before
    assert "the last 1 inner steps were not folded in" in after

    caplog.clear()
    six = make_trainer(tmp_path / "six", **{**MODES[mode], "max_steps": 6})
    with caplog.at_level(logging.WARNING, logger="hf_lookbehind"):
        six.train()
    assert not trainer_warnings(caplog)
    for a, b in zip(seven.model.parameters(), six.model.parameters()):
        assert torch.equal(a, b)


def test_same_batch_steps_say_nothing_of_cycles(tmp_path, caplog):
    trainer = make_trainer(tmp_path, **{**MODES["same_batch"], "max_steps": 7})
    with caplog.at_level(logging.WARNING, logger="hf_lookbehind"):
        trainer.train()
    assert not trainer_warnings(caplog)


class InterruptedTrainer(InOrderTrainer):
    """Raises KeyboardInterrupt from inside the loss computation of pass ``interrupt_at``
    (counted over the whole run), as Ctrl-C in the middle of a step."""

    interrupt_at = 0
    passes = 0

    def compute_loss(self, *args, **kwargs):
        type(self).passes += 1
        if type(self).passes == self.interrupt_at:
            raise KeyboardInterrupt
        return super().compute_loss(*args, **kwargs)


@pytest.mark.parametrize("batchnorm", [False, True])
@pytest.mark.parametrize("mode", ["same_batch", "switching"])
def test_an_interrupt_inside_a_step_leaves_the_slow_weights_of_the_step_before(
    tmp_path, mode, batchnorm
):
    """Ctrl-C in the last pass of step 4 (same-batch: 3 passes per step, switching: 2), caught
    around ``train()``, then ``save_model()``: the saved model is that of a run of 3 steps."""
    passes_per_step = 3 if mode == "same_batch" else 2
    InterruptedTrainer.passes, InterruptedTrainer.interrupt_at = 0, 4 * passes_per_step
    interrupted = make_trainer(
        tmp_path / "interrupted",
        model=make_model(batchnorm),
        trainer_class=InterruptedTrainer,
        **MODES[mode],
    )
    with pytest.raises(KeyboardInterrupt):
        interrupted.train()
    assert interrupted.state.global_step == 3
    interrupted.save_model(str(tmp_path / "saved"))

    three_steps = make_trainer(
        tmp_path / "three", model=make_model(batchnorm), **{**MODES[mode], "max_steps": 3}
    )
    three_steps.train()
    saved = load_file(tmp_path / "saved" / "model.safetensors")
    for name, value in three_steps.model.state_dict().items():
        assert torch.equal(saved[name], value), name


# -------------------------------------------------------------------------- mixed precision
def test_bf16_autocast_on_cpu_stays_finite(tmp_path):
    model = make_model().float()
    dataset = ToyDataset()
    dataset.x = dataset.x.float()
    trainer = make_trainer(
        tmp_path, model=model, dataset=dataset, bf16=True, lookbehind_adaptive_alpha=True
    )
    trainer.train()
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())
    assert max_param_difference(trainer.model, make_model().float()) > 1e-3
    assert all(
        entry["skipped_steps"] == 0 for entry in trainer.state.log_history if "loss" in entry
    )


def test_the_trainer_drives_the_accelerators_grad_scaler(tmp_path):
    """fp16 on a GPU gives the accelerator a GradScaler; the engine takes it over from the
    wrapped optimizer and unscales every pass. Scales are powers of two, so in float64 the
    trajectory equals the unscaled one exactly; the scale grows once per clean pass."""
    trainer = make_trainer(tmp_path)
    trainer.accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2)
    trainer.train()
    assert trainer.lookbehind.grad_scaler is trainer.accelerator.scaler
    assert trainer.optimizer.scaler is None  # accelerate's own scaler step is switched off
    assert trainer.accelerator.scaler.get_scale() == 2.0 ** (8 + 6 * 3 // 2)
    expected = plain_loop(make_model(), 16, 6, **engine_kwargs({}))
    assert max_param_difference(trainer.model, expected) < 1e-10


def test_grad_scaler_overflow_skips_the_step_and_lowers_the_scale():
    """The fp16 path on the CPU: every pass is unscaled and updates the scale; an injected inf
    in any pass leaves the slow weights untouched, and the scaler backs off."""
    model = make_model()
    engine = TrainerEngine(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    engine.grad_scaler = scaler  # as the Trainer hands it the accelerator's scaler
    dataset = ToyDataset()
    calls = [0]

    def closure(poison_call=-1):
        loss = model(dataset.x[:16], labels=dataset.y[:16])["loss"]
        if calls[0] == poison_call:
            loss = loss * float("inf")
        calls[0] += 1
        scaler.scale(loss).backward()
        return loss

    reference = make_model()
    plain_loop(reference, 16, 1, k=2, rho=0.05)
    engine.step(closure)  # a clean step equals the unscaled engine
    assert max_param_difference(model, reference) < 1e-12

    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    calls[0] = 0
    engine.step(lambda: closure(poison_call=1))
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), before))
    assert engine.stats().skipped_steps == 1
    assert scaler.get_scale() == scale / 2
    engine.step(closure)  # training goes on, no "unscale_() has already been called"
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert engine.stats().skipped_steps == 1


# ------------------------------------------------------------------------------ bad flags
@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(lookbehind_method="adam"), "unknown lookbehind_method 'adam'"),
        (dict(lookbehind_k=0), "k must be an integer >= 1"),
        (dict(lookbehind_alpha=1.5), r"alpha must be a number in \(0, 1\]"),
        (dict(lookbehind_alpha="fast"), r"alpha must be a number in \(0, 1\], got 'fast'"),
        (dict(rho=-1.0), "rho must be a finite number >= 0"),
        (dict(asam_eta=-1.0), "asam_eta must be a finite number >= 0"),
        (dict(perturbation="gsam"), "unknown perturbation 'gsam'"),
        (
            dict(ascent_sync="ring"),
            "unknown ascent_sync 'ring'; allowed: global, per_device, per_micro_batch",
        ),
        (dict(batchnorm_update="never"), "unknown batchnorm_update 'never'"),
        (dict(adaptive_alpha_scope="layer"), "unknown adaptive_alpha_scope 'layer'"),
        (
            dict(lookbehind_method="sam", lookbehind_k=3),
            "--lookbehind_method sam takes --lookbehind_k 1",
        ),
        (
            dict(minibatch_switching=True, lookbehind_method="multistep", lookbehind_k=2),
            "minibatch_switching",
        ),
        (dict(fsdp="full_shard", fsdp_config={"version": 1}), "FSDP2 only"),
        (dict(deepspeed="ds_config.json"), "FSDP2 only"),
    ],
)
def test_bad_flags_are_rejected_when_the_arguments_are_built(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_trainer_needs_lookbehind_arguments(tmp_path):
    with pytest.raises(TypeError, match="LookbehindTrainingArguments"):
        LookbehindTrainer(
            model=make_model(),
            args=TrainingArguments(output_dir=str(tmp_path), report_to=[], use_cpu=True),
            train_dataset=ToyDataset(),
        )


def test_a_launch_the_trainer_would_not_shard_is_rejected(tmp_path, monkeypatch):
    """``accelerate launch --multi_gpu`` on a machine without GPUs and without ``--use_cpu``:
    each process sets itself up alone (world size 1) and would train on everything."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    args = make_args(tmp_path, use_cpu=False)
    assert args.world_size == 1
    with pytest.raises(ValueError, match=r"launched as 2 processes .* pass --use_cpu"):
        LookbehindTrainer(model=make_model(), args=args, train_dataset=ToyDataset())


def parse_command_line(*flags: str) -> LookbehindTrainingArguments:
    from transformers import HfArgumentParser

    parser = HfArgumentParser(LookbehindTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(["--output_dir", "unused", *flags])
    return args


def built_engine(args: LookbehindTrainingArguments) -> Lookbehind:
    model = make_model()
    trainer = InOrderTrainer(model=model, args=args, train_dataset=ToyDataset())
    trainer.create_optimizer()
    return trainer.lookbehind


def test_arguments_parse_from_the_command_line():
    args = parse_command_line(
        "--lookbehind_k", "5", "--lookbehind_adaptive_alpha", "--minibatch_switching",
        "--perturbation", "asam", "--rho", "0.5",
    )  # fmt: skip
    engine = built_engine(args)
    settings = engine.settings
    assert (settings.k, settings.adaptive_alpha, settings.rho, settings.asam_eta) == (
        5, True, 0.5, 0.01
    )  # fmt: skip
    assert settings.minibatch_switching and settings.perturbation == "asam"
    assert all(
        (group["lookbehind_rho"], group["lookbehind_adaptive_alpha"]) == (0.5, True)
        for group in engine.param_groups
    )
    static = built_engine(parse_command_line("--lookbehind_alpha", "0.8"))
    assert static.settings.alpha == 0.8 and static.settings.adaptive_alpha is False
    assert all(group["lookbehind_alpha"] == 0.8 for group in static.param_groups)


def test_flags_not_given_take_the_engines_defaults():
    args = parse_command_line()
    assert (args.lookbehind_alpha, args.rho, args.asam_eta, args.adaptive_alpha_scope) == (
        (None,) * 4
    )
    assert args.lookbehind_adaptive_alpha is False
    engine = built_engine(args)
    settings = engine.settings
    assert (settings.k, settings.alpha, settings.rho, settings.batchnorm_update) == (
        2, 0.5, 0.05, "first_pass"
    )  # fmt: skip
    assert settings.adaptive_alpha is False
    # not read: SAM, static
    assert settings.asam_eta is None and settings.adaptive_alpha_scope is None


@pytest.mark.parametrize(
    "overrides,message",
    [
        # A bad value is named as such, whatever the method.
        (dict(lookbehind_method="none", rho=-1.0), "rho must be a finite number >= 0"),
        (dict(lookbehind_method="none", lookbehind_alpha=7.0), r"alpha must be a number in \(0"),
        (dict(lookbehind_method="none", asam_eta=-1.0), "asam_eta must be a finite number"),
        (
            dict(lookbehind_method="none", adaptive_alpha_scope="ring"),
            "unknown adaptive_alpha_scope",
        ),
        (dict(lookbehind_method="none", lookbehind_k=0), "k must be an integer >= 1"),
        (dict(lookbehind_method="none", perturbation="gsam"), "unknown perturbation 'gsam'"),
        # The base optimizer alone reads no Lookbehind flag, at its default value or not.
        (
            dict(lookbehind_method="none", rho=0.05, lookbehind_alpha=0.8),
            "--rho 0.05, --lookbehind_alpha 0.8: no effect with --lookbehind_method none",
        ),
        (dict(lookbehind_method="none", batchnorm_update="every_pass"), "--batchnorm_update"),
        (dict(lookbehind_method="none", minibatch_switching=True), "--minibatch_switching True"),
        (dict(lookbehind_method="none", perturbation="asam"), "--perturbation asam: no effect"),
        (dict(lookbehind_method="none", ascent_sync="per_device"), "--ascent_sync per_device"),
        (dict(lookbehind_method="none", asam_weights_only=False), "--asam_weights_only False"),
        # A method that does not read a flag given otherwise than at its default.
        (
            dict(lookbehind_method="sam", lookbehind_k=None, lookbehind_alpha=0.8),
            "--lookbehind_alpha 0.8 has no effect: --lookbehind_method sam",
        ),
        (dict(adaptive_alpha_scope="global"), "--adaptive_alpha_scope global has no effect"),
        (dict(asam_eta=0.1), "--asam_eta 0.1 has no effect"),
        (dict(asam_weights_only=False), "--asam_weights_only false has no effect: --perturbation"),
        (
            dict(lookbehind_method="lookahead", perturbation="none", ascent_sync="per_device"),
            "--ascent_sync per_device has no effect",
        ),
    ],
)
def test_flags_without_effect_are_refused(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


@pytest.mark.parametrize(
    "overrides,flag",
    [
        (dict(lookbehind_method="sam", lookbehind_k=None, lookbehind_alpha=0.5), "alpha 0.5"),
        (dict(adaptive_alpha_scope="per_tensor"), "--adaptive_alpha_scope per_tensor"),
        (dict(asam_eta=0.01), "--asam_eta 0.01"),
        (dict(baseline_method="multistep"), "--baseline_method multistep"),
    ],
)
def test_flags_given_at_their_harmless_default_without_effect_are_named(
    tmp_path, caplog, overrides, flag
):
    with caplog.at_level(logging.WARNING, logger="hf_lookbehind"):
        make_args(tmp_path, **overrides)
    assert f"{flag} has no effect" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_lookbehind"):
        make_args(tmp_path)
    assert "has no effect" not in caplog.text


# ------------------------------------------------------------- compile and checkpointing
def test_torch_compile_gives_the_same_trajectory(tmp_path):
    """``--torch_compile`` (the aot_eager backend: dynamo and AOTAutograd without code
    generation, so it runs fast on a CPU) with BatchNorm, whose statistics the engine freezes
    after the first pass by toggling ``track_running_stats``."""
    overrides = dict(MODES["switching"], torch_compile=True, torch_compile_backend="aot_eager")
    compiled = make_trainer(tmp_path / "compiled", model=make_model(batchnorm=True), **overrides)
    compiled.train()
    eager = make_trainer(tmp_path / "eager", model=make_model(batchnorm=True), **MODES["switching"])
    eager.train()
    assert max_param_difference(compiled.model, eager.model) < 1e-10
    for a, b in zip(compiled.model.buffers(), eager.model.buffers()):
        assert torch.allclose(a.double(), b.double(), rtol=0, atol=1e-10)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, n: int = 32, length: int = 6, vocab: int = 40) -> None:
        generator = torch.Generator().manual_seed(4)
        self.ids = torch.randint(0, vocab, (n, length), generator=generator)
        self.labels = torch.randint(0, 2, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"input_ids": self.ids[index], "labels": self.labels[index]}


def tiny_bert():
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
        num_labels=2,
    )
    return BertForSequenceClassification(config).double()


def test_activation_checkpointing_gives_the_same_trajectory(tmp_path):
    """A ``PreTrainedModel`` with ``--activation_checkpointing`` recomputes activations in every
    backward of every pass; the weights must not notice."""
    runs = []
    for checkpointing in (False, True):
        args = make_args(
            tmp_path / str(checkpointing),
            per_device_train_batch_size=8,
            max_steps=4,
            activation_checkpointing=checkpointing,
            lookbehind_adaptive_alpha=True,
        )
        model = tiny_bert()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
        trainer = InOrderTrainer(
            model=model, args=args, train_dataset=TokenDataset(), optimizers=(optimizer, None)
        )
        trainer.train()
        runs.append(trainer.model)
    assert runs[1].is_activation_checkpointing
    assert max_param_difference(*runs) < 1e-10
    assert max_param_difference(runs[0], tiny_bert()) > 1e-4
