"""LookbehindTrainer resumed from damaged checkpoints, in same-batch and switching mode, with and
without BatchNorm: a file missing, truncated, or written with another setup. Either the run
resumes exactly (as the uninterrupted run, or as the engine in a plain loop from the same state)
or it stops before training with an error that names the file and what to change."""

from __future__ import annotations

import logging
import re
import shutil
from pathlib import Path

import pytest
import torch
from helpers.trainer_harness import (
    engine_kwargs,
    make_model,
    make_trainer,
    model_and_sgd_from_checkpoint,
    sequential_closures,
)
from safetensors.torch import load_file
from torch import nn
from transformers import TrainerState

from hf_lookbehind import Lookbehind

STEPS, K, LR = 6, 2, 0.1
MODES = {
    "same_batch": dict(lookbehind_k=K),
    "switching": dict(lookbehind_k=K, minibatch_switching=True),
}
FILES = ("optimizer.pt", "scheduler.pt", "trainer_state.json", "model.safetensors")
CASES = [(mode, batchnorm) for mode in MODES for batchnorm in (False, True)]


def trainer_for(output_dir: Path, mode: str, batchnorm: bool, **overrides):
    """A run of STEPS steps with a linear learning-rate schedule, saved after every step."""
    settings = dict(
        MODES[mode],
        max_steps=STEPS,
        lr_scheduler_type="linear",
        save_strategy="steps",
        save_steps=1,
        logging_steps=STEPS,
    )
    return make_trainer(output_dir, model=make_model(batchnorm), **{**settings, **overrides})


@pytest.fixture(scope="module", params=CASES, ids=[f"{m}-bn{int(b)}" for m, b in CASES])
def run(request, tmp_path_factory):
    """The uninterrupted run: its checkpoints and its final model."""
    mode, batchnorm = request.param
    output_dir = tmp_path_factory.mktemp(f"{mode}-{batchnorm}")
    trainer = trainer_for(output_dir, mode, batchnorm)
    trainer.train()
    return mode, batchnorm, output_dir, trainer.model.state_dict()


def copy_checkpoints(run, tmp_path: Path, *steps: int) -> Path:
    """The run's checkpoints after ``steps`` in a new output folder; returns the folder."""
    _, _, source, _ = run
    output_dir = tmp_path / "run"
    for step in steps:
        shutil.copytree(source / f"checkpoint-{step}", output_dir / f"checkpoint-{step}")
    return output_dir


def resume(run, output_dir: Path, checkpoint: str | bool, **overrides) -> nn.Module:
    mode, batchnorm, _, _ = run
    trainer = trainer_for(output_dir, mode, batchnorm, **overrides)
    trainer.train(resume_from_checkpoint=checkpoint)
    return trainer.model


def assert_same_state(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    """Parameters and BatchNorm statistics, bit for bit."""
    for name, value in model.state_dict().items():
        assert torch.equal(value, expected[name]), name


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def continued_in_a_plain_loop(
    run, checkpoint: Path, first_step: int, *, momentum: bool, **engine_changes
) -> nn.Module:
    """The rest of the run as a plain loop from the checkpoint's model, on the Trainer's linear
    schedule and data order, with the checkpoint's momentum or a new base optimizer."""
    mode, batchnorm, _, _ = run
    model, base = model_and_sgd_from_checkpoint(checkpoint, batchnorm, momentum=momentum)
    engine = Lookbehind(base, model=model, **{**engine_kwargs(MODES[mode]), **engine_changes})
    closures = sequential_closures(model, 16, STEPS - first_step, first_step)
    for step, closure in enumerate(closures, start=first_step):
        for group in base.param_groups:
            group["lr"] = LR * (STEPS - step) / STEPS
        engine.step(closure)
    return model


def assert_close(model: nn.Module, expected: nn.Module) -> None:
    for a, b in zip(model.parameters(), expected.parameters()):
        assert (a - b).abs().max().item() < 1e-10


@pytest.mark.parametrize("step", [2, 3])
def test_an_intact_checkpoint_resumes_exactly(run, tmp_path, step):
    output_dir = copy_checkpoints(run, tmp_path, step)
    assert_same_state(resume(run, output_dir, str(output_dir / f"checkpoint-{step}")), run[3])


@pytest.mark.parametrize("step", [2, 3])
def test_a_missing_optimizer_file_refuses_an_open_cycle_and_warns_otherwise(
    run, tmp_path, caplog, step
):
    mode = run[0]
    output_dir = copy_checkpoints(run, tmp_path, step)
    checkpoint = output_dir / f"checkpoint-{step}"
    (checkpoint / "optimizer.pt").unlink()
    if mode == "switching" and step % K:
        with pytest.raises(ValueError, match=r"optimizer\.pt is missing.*1 of 2 inner steps"):
            resume(run, output_dir, str(checkpoint))
        return
    with caplog.at_level(logging.WARNING, logger="hf_lookbehind"):
        model = resume(run, output_dir, str(checkpoint))
    assert "optimizer.pt is missing" in caplog.text and "momentum" in caplog.text
    assert_close(model, continued_in_a_plain_loop(run, checkpoint, step, momentum=False))
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), run[3].values()))


@pytest.mark.parametrize("step", [2, 3])
def test_a_missing_scheduler_file_rebuilds_the_schedule_from_the_step_count(
    run, tmp_path, caplog, step
):
    output_dir = copy_checkpoints(run, tmp_path, step)
    (output_dir / f"checkpoint-{step}" / "scheduler.pt").unlink()
    with caplog.at_level(logging.WARNING, logger="hf_lookbehind"):
        model = resume(run, output_dir, str(output_dir / f"checkpoint-{step}"))
    assert "scheduler.pt is missing" in caplog.text
    assert_same_state(model, run[3])


def test_an_interrupted_checkpoint_is_taken_and_refused_naming_the_newest_complete_one(
    run, tmp_path
):
    """A kill while the Trainer saved checkpoint-3 leaves it without trainer_state.json (written
    last): resume_from_checkpoint=True takes it, as the Trainer does, and refuses it with the
    Trainer's exception, naming the checkpoint to resume from instead, which resumes exactly."""
    output_dir = copy_checkpoints(run, tmp_path, 2, 3)
    (output_dir / "checkpoint-3" / "trainer_state.json").unlink()
    with pytest.raises(
        FileNotFoundError,
        match=r"No such file or directory: '.*checkpoint-3/trainer_state\.json' .*did not "
        r"finish; resume from .*checkpoint-2, the newest complete",
    ):
        resume(run, output_dir, True)
    assert_same_state(resume(run, output_dir, str(output_dir / "checkpoint-2")), run[3])


def test_a_truncated_trainer_state_counts_as_an_interrupted_checkpoint(run, tmp_path):
    output_dir = copy_checkpoints(run, tmp_path, 2, 3)
    truncate(output_dir / "checkpoint-3" / "trainer_state.json")
    with pytest.raises(
        ValueError,  # json's JSONDecodeError, as the Trainer meets it
        match=r"checkpoint-3/trainer_state\.json is truncated or corrupt: .*checkpoint-2",
    ):
        resume(run, output_dir, True)


def test_a_checkpoint_without_its_state_is_refused_by_name(run, tmp_path):
    output_dir = copy_checkpoints(run, tmp_path, 3)
    (output_dir / "checkpoint-3" / "trainer_state.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"checkpoint-3/trainer_state\.json'.*earlier"):
        resume(run, output_dir, str(output_dir / "checkpoint-3"))


def test_a_checkpoint_without_its_model_is_refused_as_the_trainer_refuses_it(run, tmp_path):
    output_dir = copy_checkpoints(run, tmp_path, 3)
    (output_dir / "checkpoint-3" / "model.safetensors").unlink()
    with pytest.raises(
        ValueError, match=r"^Can't find a valid checkpoint at .*checkpoint-3: .*model\.safetensors"
    ):
        resume(run, output_dir, str(output_dir / "checkpoint-3"))


def reader_error(path: Path) -> Exception:
    """What the Trainer meets reading ``path``."""
    try:
        if path.suffix == ".json":
            TrainerState.load_from_json(str(path))
        elif path.suffix == ".safetensors":
            load_file(path)
        else:
            torch.load(path, weights_only=True)
    except Exception as error:  # the exception is what is compared
        return error
    raise AssertionError(f"{path} reads")


@pytest.mark.parametrize("name", FILES)
def test_a_truncated_file_is_named(run, tmp_path, name):
    """With the exception its reader raises (the Trainer's, and its message first), before any
    work."""
    output_dir = copy_checkpoints(run, tmp_path, 3)
    path = output_dir / "checkpoint-3" / name
    truncate(path)
    expected = reader_error(path)
    with pytest.raises(Exception, match=rf"checkpoint-3/{name} is truncated or corrupt") as raised:
        resume(run, output_dir, str(path.parent))
    assert type(raised.value) is type(expected)
    assert str(raised.value).startswith(str(expected))


@pytest.mark.parametrize(
    ("setup", "difference"),
    [
        (dict(lookbehind_k=3), "k=2 .now 3."),
        (
            dict(lookbehind_method="lookahead", minibatch_switching=False),
            "method='lookbehind' .now 'lookahead'.",
        ),
    ],
)
def test_a_checkpoint_of_another_setup_is_refused_by_name(run, tmp_path, setup, difference):
    output_dir = copy_checkpoints(run, tmp_path, 3)
    with pytest.raises(ValueError, match=rf"checkpoint-3/optimizer\.pt.*{difference}"):
        resume(run, output_dir, str(output_dir / "checkpoint-3"), **setup)


def test_a_checkpoint_of_the_other_mode_is_refused_by_name(run, tmp_path):
    mode = run[0]
    other = {"minibatch_switching": mode == "same_batch"}
    output_dir = copy_checkpoints(run, tmp_path, 3)
    with pytest.raises(ValueError, match=r"checkpoint-3/optimizer\.pt.*minibatch_switching"):
        resume(run, output_dir, str(output_dir / "checkpoint-3"), **other)


@pytest.mark.parametrize("step", [2, 3])
def test_a_changed_rho_resumes_at_a_cycle_boundary_and_is_refused_inside_a_cycle(
    run, tmp_path, caplog, step
):
    """rho 0.2 instead of 0.1: at a cycle boundary (every same-batch step) the run goes on with
    the new rho and the checkpoint's momentum, and the engine says so; a switching checkpoint
    cut mid-cycle holds buffers of the old rho and is refused."""
    output_dir = copy_checkpoints(run, tmp_path, step)
    checkpoint = output_dir / f"checkpoint-{step}"
    if run[0] == "switching" and step % K:
        with pytest.raises(ValueError, match=r"checkpoint-3/optimizer\.pt.*rho=0\.1 \(now 0\.2\)"):
            resume(run, output_dir, str(checkpoint), rho=0.2)
        return
    with caplog.at_level(logging.WARNING, logger="hf_lookbehind"):
        model = resume(run, output_dir, str(checkpoint), rho=0.2)
    assert "rho=0.2" in caplog.text
    assert_close(model, continued_in_a_plain_loop(run, checkpoint, step, momentum=True, rho=0.2))


def test_a_checkpoint_of_another_model_is_refused_by_name(run, tmp_path):
    """A checkpoint of the model with BatchNorm resumed without it, or the reverse."""
    mode, batchnorm, _, _ = run
    output_dir = copy_checkpoints(run, tmp_path, 3)
    other = trainer_for(output_dir, mode, not batchnorm)
    with pytest.raises(
        ValueError, match=r"checkpoint-3/model\.safetensors was written for another"
    ):
        other.train(resume_from_checkpoint=str(output_dir / "checkpoint-3"))


def test_a_missing_optimizer_file_is_judged_by_the_recorded_cycle_position(tmp_path):
    """Trained with the base optimizer alone for 3 steps, then with minibatch switching (k = 2)
    from that checkpoint: checkpoint-4 is 1 inner step into a cycle, though 4 is a multiple of
    k. Without its optimizer file it is refused, by the position recorded beside it."""
    switching = dict(lookbehind_k=2, minibatch_switching=True)
    plain = make_trainer(
        tmp_path, lookbehind_method="none", save_strategy="steps", save_steps=1, max_steps=3
    )
    plain.train()
    resumed = make_trainer(tmp_path, **switching, save_strategy="steps", save_steps=1, max_steps=4)
    resumed.train(resume_from_checkpoint=str(tmp_path / "checkpoint-3"))
    assert resumed.lookbehind.cycle_position == 1
    checkpoint = tmp_path / "checkpoint-4"
    (checkpoint / "optimizer.pt").unlink()
    again = make_trainer(tmp_path, **switching, max_steps=6)
    with pytest.raises(ValueError, match=r"optimizer\.pt is missing.*1 of 2 inner steps"):
        again.train(resume_from_checkpoint=str(checkpoint))


def test_a_full_disk_while_saving_names_the_file_and_the_cause(tmp_path, monkeypatch):
    """torch.save on a full disk raises "[enforce fail at inline_container.cc:672] . unexpected
    pos 64 vs 0", which names neither the file nor the cause: the error the run ends with
    names both (same exception type)."""
    from collections import namedtuple

    from hf_lookbehind.trainer import checkpoint_files

    plain_save = torch.save

    def full_disk_save(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):
            with open(path, "wb") as file:
                file.write(b"PK\x03\x04")
            raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")
        return plain_save(obj, path, *args, **kwargs)

    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(torch, "save", full_disk_save)
    monkeypatch.setattr(checkpoint_files.shutil, "disk_usage", lambda folder: usage(1, 1, 0))
    trainer = make_trainer(tmp_path, save_strategy="steps", save_steps=1, max_steps=1)
    with pytest.raises(RuntimeError, match=r"writing .*checkpoint-1/optimizer\.pt failed") as info:
        trainer.train()
    assert "unexpected pos 64 vs 0" in str(info.value)
    assert "0 bytes are left on the disk" in str(info.value) and "the disk is full" in str(
        info.value
    )


@pytest.mark.parametrize("damage", ["flipped_bytes", "copied_from_another_checkpoint"])
@pytest.mark.parametrize("name", ["optimizer.pt", "model.safetensors"])
def test_damage_nothing_else_detects_is_refused_by_the_manifest(tmp_path, damage, name):
    """64 flipped bytes inside a file, or a file copied in from another checkpoint of the same
    run, load without complaint and end far from the uninterrupted run; the manifest written
    last with each file's size and CRC-32 refuses them, naming the file, before any work. An
    intact checkpoint resumes as before."""
    switching = dict(lookbehind_k=2, minibatch_switching=True)
    run = tmp_path / "run"
    make_trainer(run, **switching, save_strategy="steps", save_steps=1, max_steps=3).train()
    checkpoint = run / "checkpoint-3"
    assert (checkpoint / "lookbehind_manifest.json").is_file()
    path = checkpoint / name
    if damage == "flipped_bytes":
        data = bytearray(path.read_bytes())
        middle = len(data) // 2
        data[middle : middle + 64] = bytes(b ^ 0xFF for b in data[middle : middle + 64])
        path.write_bytes(bytes(data))
    else:
        shutil.copy(run / "checkpoint-1" / name, path)
    resumed = make_trainer(tmp_path / "resumed", **switching, max_steps=5)
    with pytest.raises(ValueError, match=rf"{re.escape(name)} differs from the file saved"):
        resumed.train(resume_from_checkpoint=str(checkpoint))
    intact = run / "checkpoint-2"
    make_trainer(tmp_path / "intact", **switching, max_steps=4).train(
        resume_from_checkpoint=str(intact)
    )
