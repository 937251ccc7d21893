"""Symmetric label noise for the CIFAR recipe, and what a run logs about it.

``--label_noise F`` replaces ``round(F * n)`` of the ``n`` training labels, chosen uniformly
without replacement, by a class drawn uniformly from the other ``C - 1`` classes (symmetric
noise: every corrupted label is wrong). The draw has its own generator, seeded by
``--label_noise_seed``, so it depends on the training labels and these two flags only, never on
the training seed. Evaluation labels stay clean.

At every evaluation :class:`NoisyLabelMonitor` also scores the training set without
augmentation, through the trainer's own ``predict`` and ``compute_metrics``:

- ``noise_fitted``: the share of the corrupted training examples predicted with their *noisy*
  label (memorisation of the noise; chance is about 1 / C);
- ``clean_train_accuracy``: the accuracy on the training examples whose label was kept.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Subset
from transformers import Trainer, TrainerCallback, TrainerControl, TrainerState, TrainingArguments

if TYPE_CHECKING:  # the CIFAR input pipeline needs datasets and torchvision; the main job neither
    from .cifar_data import CifarTensorDataset

NOISE_FITTED = "noise_fitted"
CLEAN_TRAIN_ACCURACY = "clean_train_accuracy"


def check_noise_fraction(fraction: float) -> None:
    if not 0.0 <= fraction < 1.0:  # NaN fails too
        raise ValueError(
            f"--label_noise is the fraction of training labels to corrupt, in [0, 1), "
            f"got {fraction}"
        )


def symmetric_label_noise(
    labels: torch.Tensor, fraction: float, num_classes: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The labels with ``round(fraction * len(labels))`` of them replaced by another class drawn
    uniformly, and the sorted indices of those (the corrupted examples)."""
    check_noise_fraction(fraction)
    corrupted_count = round(fraction * len(labels))
    if corrupted_count == 0:
        return labels.clone(), torch.zeros(0, dtype=torch.long)
    if num_classes < 2:
        raise ValueError(f"label noise needs at least 2 classes, got {num_classes}")
    generator = torch.Generator().manual_seed(seed)
    corrupted = torch.randperm(len(labels), generator=generator)[:corrupted_count].sort().values
    shift = torch.randint(1, num_classes, (corrupted_count,), generator=generator)
    noisy = labels.clone()
    noisy[corrupted] = (labels[corrupted] + shift) % num_classes
    return noisy, corrupted


class NoisyLabelMonitor(TrainerCallback):
    """After every evaluation, scores the training set (its labels as trained on, noisy where
    corrupted) without augmentation: ``noise_fitted`` on the corrupted examples,
    ``clean_train_accuracy`` on the others. Both are logged as an entry of their own (at the
    evaluation's epoch and step) and added to the evaluation's metrics, so the final
    evaluation writes them to ``eval_results.json``/``all_results.json``."""

    def __init__(
        self, trainer: Trainer, train_set: CifarTensorDataset, corrupted: torch.Tensor
    ) -> None:
        self.trainer = trainer
        unaugmented = train_set.without_augmentation()
        kept = torch.ones(len(train_set), dtype=torch.bool)
        kept[corrupted] = False
        self.subsets = {
            NOISE_FITTED: Subset(unaugmented, corrupted.tolist()),
            CLEAN_TRAIN_ACCURACY: Subset(unaugmented, kept.nonzero().flatten().tolist()),
        }

    def scores(self) -> dict[str, float]:
        """The accuracy of the current model on each subset (NaN for an empty one)."""
        return {
            name: self.trainer.predict(subset, metric_key_prefix=name).metrics[f"{name}_accuracy"]
            if len(subset)
            else math.nan
            for name, subset in self.subsets.items()
        }

    def on_evaluate(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        metrics: dict[str, float] | None = None,
        **kwargs,
    ) -> None:
        scores = self.scores()
        self.trainer.log(dict(scores))
        if metrics is not None:
            metrics.update(scores)
