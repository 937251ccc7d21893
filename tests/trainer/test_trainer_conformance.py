"""``LookbehindTrainer`` against ``transformers.Trainer`` on the Trainer's own contract: the same
scenarios run with the plain Trainer, with ``lookbehind_method="none"`` and with ``"sam"``, and
must agree. Each scenario ends in an exception (same type, and the message starts with the
Trainer's) or in a trained model: the same checkpoint folders and files, the same logged keys
apart from the package's documented ones, and with ``none`` the same final weights, bit for bit
(with SAM the optimizer differs, so its weights are not compared).

Covered: resuming from a missing folder, from ``True`` with nothing saved, from a newest
checkpoint whose saving did not finish (no ``trainer_state.json``, or a truncated one), from a
checkpoint without its model, optimizer or scheduler file or with a truncated one; resuming
with gradient accumulation, frozen parameters, another batch size and ``auto_find_batch_size``;
``save_total_limit`` rotation across a resume, ``load_best_model_at_end`` and
``save_only_model`` (resumed without optimizer and scheduler files).
"""

from __future__ import annotations

import gc
import shutil
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from helpers.trainer_harness import ToyDataset, make_model
from transformers import Trainer, TrainingArguments

from hf_lookbehind import LookbehindConfig, LookbehindTrainer

KINDS = ("none", "sam")
LOOKBEHIND = {
    "none": LookbehindConfig(lookbehind_method="none"),
    "sam": LookbehindConfig(lookbehind_method="sam", rho=0.05),
}
# What LookbehindTrainer logs besides the Trainer's keys (docs/trainer.md, "Logging").
OWN_LOG_KEYS = {
    "gradient_computations",
    "eval_gradient_computations",
    "lookbehind_alpha",
    "ascent_grad_norm",
    "perturbation_distance",
    "skipped_steps",
}


@dataclass
class Outcome:
    """How a scenario ended: its exception (type and message, with the run's folder written
    ``ROOT``) or its final weights, log keys and epoch (which tells the batch size it ended
    with); and the files it left."""

    error: tuple[type, str] | None
    weights: dict[str, torch.Tensor] | None
    log_keys: list[set[str]] | None
    files: dict[str, list[str]]
    epoch: float | None = None


def build(kind: str, output_dir: Path, model=None, **overrides) -> Trainer:
    """The plain Trainer (``kind="trainer"``) or LookbehindTrainer with the method ``kind``, on
    the same TrainingArguments (a linear schedule, so that a restarted schedule shows)."""
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=16,
        learning_rate=0.05,
        lr_scheduler_type="linear",
        max_steps=4,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        use_cpu=True,
        seed=0,
        disable_tqdm=True,
    )
    settings.update(overrides)
    args = TrainingArguments(**settings)
    model = model or make_model()
    data = dict(train_dataset=ToyDataset(), eval_dataset=ToyDataset(n=32, seed=4))
    if kind == "trainer":
        return Trainer(model=model, args=args, **data)
    return LookbehindTrainer(model=model, args=args, lookbehind=LOOKBEHIND[kind], **data)


# The package's own file beside the Trainer's (documented in docs/trainer.md): the engine's
# cycle position, written only with an engine.
OWN_FILES = ("lookbehind_cycle.json", "lookbehind_manifest.json")


def files_under(root: Path) -> dict[str, list[str]]:
    """The files the Trainer writes, in each folder (the package's own left out)."""
    return {
        str(folder.relative_to(root)): sorted(
            p.name for p in folder.iterdir() if p.is_file() and p.name not in OWN_FILES
        )
        for folder in sorted([root, *root.rglob("*")])
        if folder.is_dir()
    }


def outcome(root: Path, action) -> Outcome:
    """Run ``action()`` (which returns the trainer it trained) and record how it ended."""
    root.mkdir(parents=True, exist_ok=True)
    try:
        trainer = action()
    except Exception as error:  # the exception is what is compared
        message = str(error).replace(str(root), "ROOT")
        return Outcome((type(error), message), None, None, files_under(root))
    weights = {name: value.detach().clone() for name, value in trainer.model.state_dict().items()}
    keys = [set(entry) - OWN_LOG_KEYS for entry in trainer.state.log_history]
    return Outcome(None, weights, keys, files_under(root), trainer.state.epoch)


def assert_agree(expected: Outcome, got: Outcome, kind: str) -> None:
    if expected.error is not None:
        assert got.error is not None, f"the Trainer raised {expected.error}, {kind} trained"
        assert got.error[0] is expected.error[0], (got.error, expected.error)
        assert got.error[1].startswith(expected.error[1]), (got.error[1], expected.error[1])
    else:
        assert got.error is None, f"the Trainer trained, {kind} raised {got.error}"
        assert got.log_keys == expected.log_keys
        assert got.epoch == expected.epoch
        if kind == "none":
            assert got.weights.keys() == expected.weights.keys()
            for name, value in expected.weights.items():
                assert torch.equal(got.weights[name], value), name
    assert got.files == expected.files


def train(kind: str, output_dir: Path, resume=None, model=None, **overrides) -> Trainer:
    trainer = build(kind, output_dir, model=model, **overrides)
    trainer.train(resume_from_checkpoint=resume)
    return trainer


def resumed_from_step_2(kind: str, root: Path, model_factory=None, later=None, **overrides):
    """A run of 4 steps saved at step 2; its checkpoint-2 copied to a new folder and resumed
    there to step 4 (with ``later`` settings changed)."""
    factory = model_factory or make_model
    train(kind, root / "first", model=factory(), **overrides)
    shutil.copytree(root / "first" / "checkpoint-2", root / "resumed" / "checkpoint-2")
    checkpoint = str(root / "resumed" / "checkpoint-2")
    return train(
        kind, root / "resumed", checkpoint, model=factory(), **{**overrides, **(later or {})}
    )


def frozen_first_layer():
    model = make_model()
    model.fc1.requires_grad_(False)
    return model


def checkpoints_then(prepare, resume: str | bool):
    """A run saved at steps 2 and 4, ``prepare(root)`` applied to its folder, then a run of 6
    steps resumed from ``resume`` (a checkpoint's name, or True)."""

    def scenario(kind: str, root: Path):
        train(kind, root)
        prepare(root)
        where = resume if resume is True else str(root / resume)
        return train(kind, root, where, max_steps=6)

    return scenario


def rotated_across_a_resume(kind: str, root: Path):
    """Saved every step, two checkpoints kept, before and after ``resume_from_checkpoint=True``."""
    train(kind, root, save_steps=1, save_total_limit=2)
    return train(kind, root, True, max_steps=6, save_steps=1, save_total_limit=2)


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


SCENARIOS = {
    "missing_folder": lambda kind, root: train(kind, root, str(root / "checkpoint-9")),
    "true_with_none_saved": lambda kind, root: train(kind, root, True),
    "true_with_an_incomplete_newest": checkpoints_then(
        lambda root: (root / "checkpoint-4" / "trainer_state.json").unlink(), True
    ),
    "named_incomplete": checkpoints_then(
        lambda root: (root / "checkpoint-4" / "trainer_state.json").unlink(), "checkpoint-4"
    ),
    "true_with_a_truncated_newest_state": checkpoints_then(
        lambda root: (root / "checkpoint-4" / "trainer_state.json").write_text('{"epoch": 1.0,'),
        True,
    ),
    "named_without_model_file": checkpoints_then(
        lambda root: (root / "checkpoint-4" / "model.safetensors").unlink(), "checkpoint-4"
    ),
    "named_without_optimizer_file": checkpoints_then(
        lambda root: (root / "checkpoint-4" / "optimizer.pt").unlink(), "checkpoint-4"
    ),
    "named_without_scheduler_file": checkpoints_then(
        lambda root: (root / "checkpoint-4" / "scheduler.pt").unlink(), "checkpoint-4"
    ),
    "named_with_a_truncated_optimizer_file": checkpoints_then(
        lambda root: truncate(root / "checkpoint-4" / "optimizer.pt"), "checkpoint-4"
    ),
    "named_with_a_truncated_model_file": checkpoints_then(
        lambda root: truncate(root / "checkpoint-4" / "model.safetensors"), "checkpoint-4"
    ),
    "gradient_accumulation": lambda kind, root: resumed_from_step_2(
        kind, root, per_device_train_batch_size=8, gradient_accumulation_steps=2
    ),
    "frozen_parameters": lambda kind, root: resumed_from_step_2(kind, root, frozen_first_layer),
    "another_batch_size": lambda kind, root: resumed_from_step_2(
        kind, root, later=dict(per_device_train_batch_size=8)
    ),
    # The Trainer takes the batch size of the checkpoint back with auto_find_batch_size.
    "auto_find_batch_size": lambda kind, root: resumed_from_step_2(
        kind, root, later=dict(auto_find_batch_size=True, per_device_train_batch_size=8)
    ),
    "save_total_limit_rotation": rotated_across_a_resume,
    # The metric made "higher is better" so that the best checkpoint is not the last.
    "load_best_model_at_end": lambda kind, root: train(
        kind,
        root,
        save_steps=1,
        eval_strategy="steps",
        eval_steps=1,
        save_total_limit=2,
        load_best_model_at_end=True,
        metric_for_best_model="loss",
        greater_is_better=True,
    ),
    "save_only_model": lambda kind, root: resumed_from_step_2(kind, root, save_only_model=True),
}


@pytest.fixture(scope="module", autouse=True)
def quick_garbage_collection():
    """Every ``train()`` starts with a full ``gc.collect()`` (accelerate's ``free_memory``):
    with the objects of the imported libraries frozen out of its reach, it takes milliseconds
    instead of a third of a second."""
    gc.freeze()
    yield
    gc.unfreeze()


@pytest.fixture(scope="module")
def trainer_outcomes(tmp_path_factory):
    """The plain Trainer's outcome of each scenario, computed once."""
    outcomes: dict[str, Outcome] = {}

    def of(name: str) -> Outcome:
        if name not in outcomes:
            root = tmp_path_factory.mktemp(f"trainer-{name}")
            outcomes[name] = outcome(root, lambda: SCENARIOS[name]("trainer", root))
        return outcomes[name]

    return of


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", SCENARIOS)
def test_lookbehind_trainer_agrees_with_the_trainer(trainer_outcomes, tmp_path, name, kind):
    expected = trainer_outcomes(name)
    root = tmp_path / "run"
    assert_agree(expected, outcome(root, lambda: SCENARIOS[name](kind, root)), kind)


def test_the_scenarios_exercise_what_they_name(trainer_outcomes):
    """The Trainer's own outcomes: what each scenario is about happened."""
    assert trainer_outcomes("missing_folder").error[0] is ValueError
    assert trainer_outcomes("true_with_an_incomplete_newest").error[0] is FileNotFoundError
    # 4 steps of 64 samples: at batch 8 half an epoch, at the checkpoint's 16 one epoch.
    assert trainer_outcomes("another_batch_size").epoch == 0.5
    assert trainer_outcomes("auto_find_batch_size").epoch == 1.0
    rotated = trainer_outcomes("save_total_limit_rotation").files
    assert sorted(name for name in rotated if name != ".") == ["checkpoint-5", "checkpoint-6"]
    best = trainer_outcomes("load_best_model_at_end")
    assert sorted(name for name in best.files if name != ".") == ["checkpoint-1", "checkpoint-4"]
    only_model = trainer_outcomes("save_only_model").files["resumed/checkpoint-4"]
    assert "optimizer.pt" not in only_model and "model.safetensors" in only_model
