"""The CIFAR recipe (``examples/cifar/run_cifar.py``): its flags over the paper's setup, the
decoded data with optional label noise, and one training run. ``scripts/cifar_noisy_labels_gpu.py``
trains through the same functions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import HfArgumentParser, TrainerCallback, set_seed

from hf_lookbehind import LookbehindTrainingArguments

from .cifar_data import NORMALIZATIONS, CifarTensorDataset, decode_images
from .cifar_models import CIFAR_MODELS, create_cifar_model
from .classifier import ImageClassifier
from .evaluation import top_k_accuracy, track_best_accuracy
from .image_data import DataArguments, image_and_label_columns, load_image_splits, num_classes
from .label_noise import NoisyLabelMonitor, check_noise_fraction, symmetric_label_noise
from .learning_rate import LearningRateArguments, create_trainer, scale_learning_rate
from .training import train_and_evaluate

# The paper's training setup; every entry can be overridden on the command line.
PAPER_DEFAULTS = {
    "lr_schedule": "multistep",  # lr x0.1 at epochs 50/100/150
    "lr_decay_epochs": [50, 100, 150],
    "do_train": True,
    "do_eval": True,
    "num_train_epochs": 200,
    "per_device_train_batch_size": 128,
    "per_device_eval_batch_size": 512,
    "learning_rate": 0.1,
    "weight_decay": 5e-4,
    "decay_all_parameters": True,
    "max_grad_norm": 0.0,  # the public code does not clip (the Trainer's default clips at 1.0)
    "optim": "sgd",
    "optim_args": "momentum=0.9",
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 1,
    "logging_strategy": "epoch",
    "dataloader_num_workers": 2,
}


@dataclass
class ModelArguments:
    model_name: str = field(
        default="resnet34",
        metadata={"help": "CIFAR architecture.", "choices": list(CIFAR_MODELS)},
    )


@dataclass
class CifarDataArguments(DataArguments):
    dataset_name: str | None = field(
        default="uoft-cs/cifar10",
        metadata={
            "help": "Hub dataset (uoft-cs/cifar10 or uoft-cs/cifar100); ignored with local paths."
        },
    )
    normalization: str | None = field(
        default=None,
        metadata={
            "help": "Per-channel mean/std; default cifar10 for 10 classes, cifar100 for 100.",
            "choices": list(NORMALIZATIONS),
        },
    )
    crop_padding: int = field(default=4, metadata={"help": "Zero padding of the random crop."})
    label_noise: float = field(
        default=0.0,
        metadata={
            "help": "Fraction in [0, 1) of the training labels replaced by a different class "
            "drawn uniformly (symmetric noise; evaluation labels stay clean). Every evaluation "
            "then also logs noise_fitted (share of the corrupted training examples predicted "
            "with their noisy label) and clean_train_accuracy, without augmentation. With "
            "--max_train_samples the subset is drawn with --seed: to vary only the training "
            "seed, train on a fixed subset file (scripts/cifar_subset.py)."
        },
    )
    label_noise_seed: int = field(
        default=0, metadata={"help": "Seed of the label noise, independent of --seed."}
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_noise_fraction(self.label_noise)


def cifar_dataset(
    dataset: Dataset, data_args: CifarDataArguments, classes: int, augment: bool
) -> CifarTensorDataset:
    image_column, label_column = image_and_label_columns(dataset, data_args)
    normalization = data_args.normalization or ("cifar10" if classes <= 10 else "cifar100")
    return CifarTensorDataset(
        decode_images(dataset, image_column),
        torch.as_tensor(dataset[label_column]),
        NORMALIZATIONS[normalization],
        augment=augment,
        padding=data_args.crop_padding,
    )


def argument_parser() -> HfArgumentParser:
    """The recipe's flags (model, data, learning-rate schedule, Trainer and Lookbehind) with
    the paper's setup as defaults."""
    parser = HfArgumentParser(
        (ModelArguments, CifarDataArguments, LearningRateArguments, LookbehindTrainingArguments)
    )
    parser.set_defaults(**PAPER_DEFAULTS)
    return parser


RecipeArguments = tuple[
    ModelArguments, CifarDataArguments, LearningRateArguments, LookbehindTrainingArguments
]


def parse_arguments(argv: Sequence[str] | None = None) -> RecipeArguments:
    """The command line as the recipe's dataclasses, checked and with the learning rate
    scaled: every setting that would fail later fails here, before any data loads."""
    model_args, data_args, lr_args, training_args = argument_parser().parse_args_into_dataclasses(
        args=argv
    )
    scale_learning_rate(training_args, lr_args)
    track_best_accuracy(training_args)
    return model_args, data_args, lr_args, training_args


@dataclass
class CifarData:
    """What a run trains and evaluates on: ``train`` holds the labels as trained on (noisy at
    ``corrupted``, the indices of the corrupted examples; empty without label noise)."""

    train: CifarTensorDataset
    evaluation: CifarTensorDataset
    classes: int
    corrupted: torch.Tensor


def load_cifar_data(data_args: CifarDataArguments, seed: int) -> CifarData:
    """The decoded splits (``seed`` draws the ``--max_*_samples`` subsets) and the label noise
    (drawn with ``--label_noise_seed`` alone)."""
    train_split, eval_split = load_image_splits(data_args, seed=seed)
    classes = num_classes(train_split, image_and_label_columns(train_split, data_args)[1])
    train = cifar_dataset(train_split, data_args, classes, augment=True)
    train.labels, corrupted = symmetric_label_noise(
        train.labels, data_args.label_noise, classes, data_args.label_noise_seed
    )
    evaluation = cifar_dataset(eval_split, data_args, classes, augment=False)
    return CifarData(train, evaluation, classes, corrupted)


def write_label_noise_record(data_args: CifarDataArguments, data: CifarData, path: Path) -> None:
    """The noise a run trained with: fraction, seed and the corrupted training examples."""
    record = {
        "label_noise": data_args.label_noise,
        "label_noise_seed": data_args.label_noise_seed,
        "train_examples": len(data.train),
        "corrupted_examples": len(data.corrupted),
        "corrupted_indices": data.corrupted.tolist(),
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record) + "\n")


def train_cifar(
    args: RecipeArguments, data: CifarData, callbacks: Sequence[TrainerCallback] = ()
) -> dict[str, float]:
    """Train and evaluate one model on ``data``; the metrics of ``all_results.json``."""
    model_args, data_args, lr_args, training_args = args
    set_seed(training_args.seed)
    model = ImageClassifier(create_cifar_model(model_args.model_name, data.classes))
    trainer = create_trainer(
        lr_args,
        model=model,
        args=training_args,
        train_dataset=data.train,
        eval_dataset=data.evaluation,
        compute_metrics=top_k_accuracy(),
        callbacks=list(callbacks),
    )
    if len(data.corrupted):
        trainer.add_callback(NoisyLabelMonitor(trainer, data.train, data.corrupted))
        if trainer.is_world_process_zero():
            output = Path(training_args.output_dir) / "label_noise.json"
            write_label_noise_record(data_args, data, output)
    return train_and_evaluate(trainer)
