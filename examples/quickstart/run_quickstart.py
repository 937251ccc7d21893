"""Trainer quickstart: SGD vs SAM vs Lookbehind-SAM through ``LookbehindTrainer``.

Trains a small network on scikit-learn's handwritten digits (1,797 8x8 images shipped with
scikit-learn: no download) with each method, evaluates on a held-out 30 %, and prints test
accuracy, test loss and wall time per method. Every ``LookbehindTrainingArguments`` flag works,
for example ``--num_train_epochs 30 --rho 0.1 --lookbehind_k 5 --lookbehind_alpha adaptive``.
"""

from __future__ import annotations

import dataclasses
import sys
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import Dataset
from transformers import EvalPrediction, HfArgumentParser

from hf_lookbehind import LookbehindTrainer, LookbehindTrainingArguments

# (label, trainer flags) of the methods compared; the other flags come from the command line.
METHODS = (
    ("SGD", {"lookbehind_method": "none"}),
    ("SAM", {"lookbehind_method": "sam", "lookbehind_k": None}),
    ("Lookbehind-SAM", {"lookbehind_method": "lookbehind"}),
)


@dataclass
class QuickstartArguments:
    test_fraction: float = field(default=0.3, metadata={"help": "Held-out share of digits."})
    hidden_size: int = field(default=128, metadata={"help": "Width of the hidden layer."})


class DigitsDataset(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.tensor(images, dtype=torch.float32) / 16.0
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


class DigitsClassifier(nn.Module):
    """An MLP with BatchNorm and dropout that returns ``{"loss", "logits"}`` like a
    transformers model."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(64, hidden_size),
            nn.BatchNorm1d(hidden_size),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(hidden_size, 10),
        )

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.layers(pixel_values)
        if labels is None:
            return {"logits": logits}
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


def accuracy(prediction: EvalPrediction) -> dict[str, float]:
    return {"accuracy": float((prediction.predictions.argmax(-1) == prediction.label_ids).mean())}


def default_training_arguments() -> list[str]:
    return [
        "--output_dir", "outputs/quickstart",
        "--num_train_epochs", "10",
        "--per_device_train_batch_size", "32",
        "--learning_rate", "0.05",
        "--optim", "sgd",
        "--optim_args", "momentum=0.9",
        "--weight_decay", "5e-4",
        "--lr_scheduler_type", "cosine",
        "--rho", "0.05",
        "--eval_strategy", "no",
        "--save_strategy", "no",
        "--logging_strategy", "epoch",
        "--report_to", "none",
        "--seed", "0",
        "--use_cpu",
    ]  # fmt: skip


def main(argv: list[str] | None = None) -> dict[str, dict[str, float]]:
    parser = HfArgumentParser((QuickstartArguments, LookbehindTrainingArguments))
    argv = default_training_arguments() + list(sys.argv[1:] if argv is None else argv)
    quickstart, args = parser.parse_args_into_dataclasses(argv)
    torch.set_num_threads(1)  # a 10k-parameter network: more threads only add overhead
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=quickstart.test_fraction, random_state=0,
        stratify=digits.target,
    )  # fmt: skip
    train_set, test_set = DigitsDataset(x_train, y_train), DigitsDataset(x_test, y_test)
    results = {}
    for label, flags in METHODS:
        run_args = dataclasses.replace(args, **flags)
        torch.manual_seed(args.seed)
        trainer = LookbehindTrainer(
            model=DigitsClassifier(quickstart.hidden_size),
            args=run_args,
            train_dataset=train_set,
            eval_dataset=test_set,
            compute_metrics=accuracy,
        )
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        metrics = trainer.evaluate()
        results[label] = {
            "accuracy": metrics["eval_accuracy"],
            "loss": metrics["eval_loss"],
            "seconds": seconds,
        }
    print(f"\n{'method':<16}{'test acc':>10}{'test loss':>11}{'train s':>9}")
    for label, row in results.items():
        print(
            f"{label:<16}{100 * row['accuracy']:>9.2f}%{row['loss']:>11.4f}{row['seconds']:>9.1f}"
        )
    return results


if __name__ == "__main__":
    main()
