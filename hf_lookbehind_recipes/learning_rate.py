"""The recipes' learning-rate schedules: step decay at given epochs (the paper's MultiStepLR) or
the Trainer's own, optionally scaled linearly with the global batch."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.optim.lr_scheduler import LRScheduler, MultiStepLR
from transformers import TrainingArguments

from hf_lookbehind import LookbehindTrainer

LR_SCHEDULES = ("multistep", "trainer")


@dataclass
class LearningRateArguments:
    """The learning-rate schedule: step decay at given epochs (the paper's MultiStepLR) or the
    Trainer's ``--lr_scheduler_type``; optionally scaled linearly with the global batch."""

    lr_schedule: str = field(
        default="trainer",
        metadata={
            "help": "multistep: lr x --lr_decay_factor at each of --lr_decay_epochs; trainer: the "
            "Trainer's --lr_scheduler_type (e.g. cosine).",
            "choices": list(LR_SCHEDULES),
        },
    )
    lr_decay_epochs: list[int] = field(
        default_factory=lambda: [30, 60],
        metadata={
            "help": "Epochs (of --num_train_epochs) at which multistep decays the lr; with "
            "--max_steps, the same fractions of the steps."
        },
    )
    lr_decay_factor: float = field(default=0.1, metadata={"help": "multistep decay factor."})
    lr_reference_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Linear scaling (Goyal et al., 2017): --learning_rate is the rate for a global "
            "batch of this size and is multiplied by global batch / this size (global batch = "
            "per-device batch x processes x gradient accumulation). Default: no scaling."
        },
    )

    def __post_init__(self) -> None:
        if self.lr_schedule not in LR_SCHEDULES:
            raise ValueError(
                f"--lr_schedule must be one of {', '.join(LR_SCHEDULES)}, got {self.lr_schedule!r}"
            )
        epochs = list(self.lr_decay_epochs)
        if any(e <= 0 for e in epochs) or epochs != sorted(set(epochs)):
            raise ValueError(
                f"--lr_decay_epochs must be positive and strictly increasing, got {epochs}"
            )
        if not self.lr_decay_factor > 0:
            raise ValueError(f"--lr_decay_factor must be positive, got {self.lr_decay_factor}")
        if self.lr_reference_batch_size is not None and self.lr_reference_batch_size <= 0:
            raise ValueError(
                "--lr_reference_batch_size must be a positive number of examples, got "
                f"{self.lr_reference_batch_size}"
            )


def global_batch_size(training_args: TrainingArguments) -> int:
    """Examples per optimizer step over all processes and accumulated micro-batches."""
    return (
        training_args.train_batch_size
        * training_args.world_size
        * training_args.gradient_accumulation_steps
    )


def scale_learning_rate(training_args: TrainingArguments, lr_args: LearningRateArguments) -> None:
    """Multiply ``--learning_rate`` by global batch / ``--lr_reference_batch_size`` (no change
    without a reference size)."""
    if lr_args.lr_reference_batch_size is not None:
        scale = global_batch_size(training_args) / lr_args.lr_reference_batch_size
        training_args.learning_rate *= scale


class MultiStepLRTrainer(LookbehindTrainer):
    """``LookbehindTrainer`` whose learning rate is multiplied by ``decay_factor`` at the given
    epochs (the paper's MultiStepLR). The Trainer steps its scheduler once per optimizer step,
    so the epochs become steps: ``epoch * num_training_steps / num_train_epochs``."""

    def __init__(
        self, *args: Any, decay_epochs: Sequence[int], decay_factor: float, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.decay_epochs = list(decay_epochs)
        self.decay_factor = decay_factor

    def create_scheduler(
        self, num_training_steps: int, optimizer: torch.optim.Optimizer | None = None
    ) -> LRScheduler:
        if self.lr_scheduler is None:
            steps_per_epoch = num_training_steps / self.args.num_train_epochs
            milestones = [round(epoch * steps_per_epoch) for epoch in self.decay_epochs]
            self.lr_scheduler = MultiStepLR(
                optimizer or self.optimizer, milestones, gamma=self.decay_factor
            )
        return self.lr_scheduler


def create_trainer(lr_args: LearningRateArguments, **trainer_kwargs: Any) -> LookbehindTrainer:
    """A ``MultiStepLRTrainer`` for ``--lr_schedule multistep``, else a ``LookbehindTrainer``."""
    if lr_args.lr_schedule == "multistep":
        return MultiStepLRTrainer(
            decay_epochs=lr_args.lr_decay_epochs,
            decay_factor=lr_args.lr_decay_factor,
            **trainer_kwargs,
        )
    return LookbehindTrainer(**trainer_kwargs)
