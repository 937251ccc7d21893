"""Train a CIFAR-10/100 classifier with Lookbehind-SAM/ASAM or any baseline of the paper.

Defaults are the paper's setup (Mordido et al., ICML 2024, Sec. 4.2): 200 epochs, batch 128,
SGD (lr 0.1, momentum 0.9, weight decay 5e-4) with the learning rate multiplied by 0.1 at epochs
50/100/150, random crop (padding 4) and horizontal flip, per-dataset normalisation, and an
evaluation of the slow weights after every epoch. ``--lr_schedule trainer
--lr_scheduler_type cosine --label_smoothing_factor 0.1`` gives the ASAM-style setup of Table 8.

    accelerate launch examples/cifar/run_cifar.py --model_name resnet34 \\
        --dataset_name uoft-cs/cifar10 --lookbehind_method lookbehind --rho 0.05 \\
        --lookbehind_k 2 --lookbehind_alpha 0.5 --output_dir out/c10_r34_lb --do_train --do_eval
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from datasets import Dataset
from transformers import HfArgumentParser, set_seed

from hf_lookbehind import LookbehindTrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "image_classification"))

from cifar_data import NORMALIZATIONS, CifarTensorDataset, decode_images
from cifar_models import CIFAR_MODELS, create_cifar_model
from image_classification_utils import (
    DataArguments,
    ImageClassifier,
    LearningRateArguments,
    create_trainer,
    image_and_label_columns,
    load_image_splits,
    num_classes,
    scale_learning_rate,
    top_k_accuracy,
    track_best_accuracy,
    train_and_evaluate,
)

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


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = argument_parser()
    model_args, data_args, lr_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    scale_learning_rate(training_args, lr_args)
    set_seed(training_args.seed)
    track_best_accuracy(training_args)

    train_split, eval_split = load_image_splits(data_args, seed=training_args.seed)
    classes = num_classes(train_split, image_and_label_columns(train_split, data_args)[1])
    model = ImageClassifier(create_cifar_model(model_args.model_name, classes))

    trainer_kwargs = {
        "model": model,
        "args": training_args,
        "train_dataset": cifar_dataset(train_split, data_args, classes, augment=True),
        "eval_dataset": cifar_dataset(eval_split, data_args, classes, augment=False),
        "compute_metrics": top_k_accuracy(),
    }
    return train_and_evaluate(create_trainer(lr_args, **trainer_kwargs), training_args)


if __name__ == "__main__":
    main()
