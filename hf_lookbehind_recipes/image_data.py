"""Pieces shared by the image-classification recipes (``run_cifar.py`` and
``run_image_classification.py``): the data arguments and loading (hub name or local files), the
Trainer-facing classifier wrapper, top-k accuracy, the step-decay learning-rate schedule with
linear batch scaling, and the final metrics file."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from datasets import ClassLabel, Dataset, DatasetDict, load_dataset
from sklearn.metrics import top_k_accuracy_score
from torch import nn
from torch.optim.lr_scheduler import LRScheduler, MultiStepLR
from transformers import EvalPrediction, Trainer, TrainingArguments

from hf_lookbehind import EpochTimer, LookbehindTrainer
from hf_lookbehind.analysis.data import FILE_BUILDERS, column_of_type

LABEL_COLUMNS = ("label", "labels", "fine_label")


@dataclass
class DataArguments:
    """Where the images come from: a hub dataset by name, or local files/folders."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset name (ignored when --train_path/--validation_path are set)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub config name."})
    train_path: str | None = field(
        default=None,
        metadata={
            "help": "Local training data: a parquet/arrow/csv/json file in the hub schema, or an "
            "image folder (<class>/<image> layout)."
        },
    )
    validation_path: str | None = field(
        default=None, metadata={"help": "Local evaluation data, in the same form as --train_path."}
    )
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Hub split to evaluate on; default 'validation', else 'test'."},
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "Image column; default: the column of type Image."}
    )
    label_column_name: str | None = field(
        default=None,
        metadata={"help": f"Label column; default: the first of {', '.join(LABEL_COLUMNS)}."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on a random subset of this many examples."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on a random subset of this many examples."}
    )

    def __post_init__(self) -> None:
        if (self.train_path is None) != (self.validation_path is None):
            raise ValueError(
                "local data needs both --train_path and --validation_path, got "
                f"train_path={self.train_path!r}, validation_path={self.validation_path!r}"
            )
        if self.train_path is None and self.dataset_name is None:
            raise ValueError(
                "give --dataset_name (a hub dataset) or --train_path/--validation_path"
            )

    @property
    def is_local(self) -> bool:
        return self.train_path is not None


def _local_builder(paths: Sequence[str]) -> tuple[str, list[str]]:
    """The ``datasets`` builder for local paths and their data-file patterns."""
    kinds = set()
    for path in map(Path, paths):
        if path.is_dir():
            kinds.add("imagefolder")
        elif path.suffix in FILE_BUILDERS and path.is_file():
            kinds.add(FILE_BUILDERS[path.suffix])
        elif not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: give an image folder or a file ending in "
                f"{', '.join(FILE_BUILDERS)}"
            )
        else:
            raise ValueError(
                f"{path}: not an image folder or a file ending in {', '.join(FILE_BUILDERS)}"
            )
    if len(kinds) != 1:
        raise ValueError(f"train and validation data must be of one kind, got {sorted(kinds)}")
    builder = kinds.pop()
    patterns = [str(Path(p) / "**") if builder == "imagefolder" else p for p in paths]
    return builder, patterns


def load_image_splits(args: DataArguments, seed: int) -> tuple[Dataset, Dataset]:
    """The training and evaluation splits, subsampled to ``max_*_samples``. Local image folders
    are loaded in one call, so both splits share one class-index mapping (sorted folder names)."""
    if args.is_local:
        builder, (train, validation) = _local_builder([args.train_path, args.validation_path])
        splits = load_dataset(builder, data_files={"train": train, "validation": validation})
        eval_split = "validation"
    else:
        splits = load_dataset(args.dataset_name, args.dataset_config_name)
        eval_split = args.eval_split or ("validation" if "validation" in splits else "test")
    if not isinstance(splits, DatasetDict) or "train" not in splits or eval_split not in splits:
        raise ValueError(f"need a 'train' and a {eval_split!r} split, got {list(splits)}")
    subsets = []
    for split, limit in (("train", args.max_train_samples), (eval_split, args.max_eval_samples)):
        dataset = splits[split]
        if limit is not None:
            dataset = dataset.shuffle(seed=seed).select(range(min(limit, len(dataset))))
        subsets.append(dataset)
    return subsets[0], subsets[1]


def image_and_label_columns(dataset: Dataset, args: DataArguments) -> tuple[str, str]:
    """The image and label column names: the flags, or detected from the features."""
    image = column_of_type(dataset, "Image", args.image_column_name, ("img", "image"))
    label = column_of_type(dataset, "ClassLabel", args.label_column_name, LABEL_COLUMNS)
    return image, label


def num_classes(dataset: Dataset, label_column: str) -> int:
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        return feature.num_classes
    return int(max(dataset[label_column])) + 1


class ImageClassifier(nn.Module):
    """A logits model behind the Trainer's interface: ``pixel_values`` in; a dict with ``logits``,
    and the cross-entropy ``loss`` when ``labels`` are given, out. (With
    ``--label_smoothing_factor`` the Trainer withholds the labels and smooths the loss itself.)"""

    config = None  # read by the Trainer; None: not a transformers model

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = self.backbone(pixel_values)
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}


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


def top_k_accuracy(top_k: Sequence[int] = (1,)) -> Callable[[EvalPrediction], dict[str, float]]:
    """``compute_metrics`` for the Trainer: ``accuracy`` (top-1) and ``top{k}`` for each k > 1
    (with ``top1`` as well when any is asked for), as fractions in [0, 1]."""

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = np.asarray(prediction.predictions)
        labels = np.asarray(prediction.label_ids)
        classes = np.arange(logits.shape[-1])
        scores = {
            k: float(top_k_accuracy_score(labels, logits, k=k, labels=classes))
            for k in sorted({1, *top_k})
        }
        metrics = {"accuracy": scores[1]}
        if len(scores) > 1:
            metrics.update({f"top{k}": score for k, score in scores.items()})
        return metrics

    return compute_metrics


def track_best_accuracy(training_args: TrainingArguments, top_k: Sequence[int] = (1,)) -> None:
    """Let the Trainer keep the best evaluation accuracy in ``state.best_metric`` (it does so
    for ``metric_for_best_model`` at every evaluation), unless another metric was chosen.

    Settings that would fail only at the first evaluation or after training are rejected here,
    before it: ``--prediction_loss_only`` (no accuracy to report) and a
    ``--metric_for_best_model`` that the evaluation (loss and ``top_k_accuracy(top_k)``) does
    not report."""
    if training_args.prediction_loss_only:
        raise ValueError(
            "--prediction_loss_only leaves the evaluation without accuracy, which this recipe "
            "reports: drop --prediction_loss_only"
        )
    one_prediction = EvalPrediction(np.eye(max(top_k) + 2)[:1], np.zeros(1, dtype=int))
    reported = ("loss", *top_k_accuracy(top_k)(one_prediction))
    chosen = training_args.metric_for_best_model
    if chosen is not None and chosen.removeprefix("eval_") not in reported:
        raise ValueError(
            f"--metric_for_best_model {chosen} is not among the evaluation's metrics "
            f"({', '.join(reported)}): pick one of them"
        )
    if training_args.metric_for_best_model is None:
        training_args.metric_for_best_model = "accuracy"
        training_args.greater_is_better = True


def train_and_evaluate(trainer: Trainer, training_args: TrainingArguments) -> dict[str, float]:
    """Train (``--do_train``), evaluate the final (slow) weights (``--do_eval``) and write the
    metrics: ``all_results.json`` holds ``eval_accuracy`` (final), ``best_eval_accuracy``
    (best over the evaluations during training and the final one) and
    ``train_seconds_per_epoch`` (:class:`hf_lookbehind.EpochTimer`)."""
    metrics: dict[str, float] = {}
    if training_args.do_train:
        timer = EpochTimer()
        trainer.add_callback(timer)
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        train_metrics = {**result.metrics, "train_seconds_per_epoch": timer.seconds_per_epoch()}
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
        metrics.update(train_metrics)
    if training_args.do_eval:
        eval_metrics = trainer.evaluate()
        best_during_training = trainer.state.best_metric
        if training_args.metric_for_best_model != "accuracy" or best_during_training is None:
            best_during_training = -math.inf
        eval_metrics["best_eval_accuracy"] = max(
            best_during_training, eval_metrics["eval_accuracy"]
        )
        trainer.log_metrics("eval", eval_metrics)
        trainer.save_metrics("eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics
