"""Noisy-label benchmark: SGD vs SAM vs Lookbehind-SAM on digits with noisy training labels.

Trains a small network on scikit-learn's handwritten digits (1,797 8x8 images shipped with
scikit-learn: no download) with each method, evaluates on a held-out 30 % after every epoch
and prints a markdown table of, per method, the mean ± std over seeds of the final and the best
test accuracy, the test loss, the share of the mislabelled training images whose wrong label the
model has memorised ("noisy fit"), and the seconds of training.

By default 30 % of the training labels are replaced by a class drawn uniformly at random
(``--label_noise``; the test labels stay clean) and the models train long enough to memorise
them: the setting where sharpness-aware training is known to help, because it resists fitting
noisy labels. ``--label_noise 0`` trains on the clean labels. Every
``LookbehindTrainingArguments`` flag works; flags of Lookbehind alone (``--lookbehind_k``,
``--lookbehind_alpha``, ``--adaptive_alpha_scope``, ``--minibatch_switching``) apply to the
Lookbehind runs only, for example ``--lookbehind_k 5 --lookbehind_alpha 0.8``.

It prints one line per run (method, seed, result) under one progress bar for the whole job
(``--disable_tqdm true`` drops the bar), then the table; ``--verbose`` shows the Trainer's logs
and progress bars of every run instead. Launched in several processes (``accelerate launch``,
``torchrun``), only the main process prints.
"""

from __future__ import annotations

import dataclasses
import sys
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn
from torch.utils.data import Dataset
from tqdm.auto import tqdm
from transformers import HfArgumentParser, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from hf_lookbehind import LookbehindSettings, LookbehindTrainer, LookbehindTrainingArguments
from hf_lookbehind_recipes.classifier import ImageClassifier
from hf_lookbehind_recipes.evaluation import check_evaluation_flags, top_k_accuracy
from hf_lookbehind_recipes.label_noise import check_noise_fraction
from hf_lookbehind_recipes.methods import unread_flags
from hf_lookbehind_recipes.processes import end_process_group
from hf_lookbehind_recipes.tables import markdown_table
from hf_lookbehind_recipes.training import train_timed

NUM_CLASSES = 10

# Method name: the trainer flags it sets (the other flags come from the command line).
METHODS = {
    "sgd": {"lookbehind_method": "none"},
    "sam": {"lookbehind_method": "sam"},
    "lookbehind": {"lookbehind_method": "lookbehind"},
    "lookbehind_adaptive": {
        "lookbehind_method": "lookbehind",
        "lookbehind_alpha": None,
        "lookbehind_adaptive_alpha": True,
    },
}


@dataclass
class NoisyLabelsArguments:
    test_fraction: float = field(default=0.3, metadata={"help": "Held-out share of digits."})
    hidden_size: int = field(default=256, metadata={"help": "Width of the hidden layer."})
    label_noise: float = field(
        default=0.3,
        metadata={
            "help": "Share of the training labels replaced by a class drawn uniformly at random "
            "(fixed by --label_noise_seed; test labels stay clean). 0: the clean labels."
        },
    )
    label_noise_seed: int = field(default=0, metadata={"help": "Seed of the label noise."})
    seeds: int = field(
        default=3,
        metadata={"help": "Runs per method, with training seeds --seed, --seed + 1, ..."},
    )
    methods: list[str] = field(
        default_factory=lambda: list(METHODS),
        metadata={"help": f"Methods to compare, from {', '.join(METHODS)}."},
    )
    verbose: bool = field(
        default=False,
        metadata={
            "help": "Show the Trainer's logs and progress bars of every run (default: one line "
            "per run under one progress bar for the whole job)."
        },
    )

    def __post_init__(self) -> None:
        check_noise_fraction(self.label_noise)
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"--test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.seeds < 1:
            raise ValueError(f"--seeds must be at least 1, got {self.seeds}")
        unknown = [name for name in self.methods if name not in METHODS]
        if unknown or not self.methods:
            raise ValueError(
                f"--methods takes one or more of {', '.join(METHODS)}, got {self.methods}"
            )


class DigitsDataset(Dataset):
    def __init__(self, images: np.ndarray, labels: np.ndarray) -> None:
        self.images = torch.tensor(images, dtype=torch.float32) / 16.0
        self.labels = torch.tensor(labels)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"pixel_values": self.images[index], "labels": self.labels[index]}


def digits_network(hidden_size: int) -> nn.Module:
    """An MLP with BatchNorm and dropout from the 64 pixels to the class logits."""
    return nn.Sequential(
        nn.Linear(64, hidden_size),
        nn.BatchNorm1d(hidden_size),
        nn.ReLU(),
        nn.Dropout(0.1),
        nn.Linear(hidden_size, NUM_CLASSES),
    )


def noisy_labels(labels: np.ndarray, fraction: float, seed: int) -> np.ndarray:
    """``labels`` with ``round(fraction * n)`` of them, chosen at random, replaced by a class
    drawn uniformly from all classes (so about one in ten keeps its label)."""
    rng = np.random.default_rng(seed)
    noisy = labels.copy()
    chosen = rng.choice(len(labels), size=round(fraction * len(labels)), replace=False)
    noisy[chosen] = rng.integers(NUM_CLASSES, size=len(chosen))
    return noisy


def method_arguments(args: LookbehindTrainingArguments, method: str) -> LookbehindTrainingArguments:
    """The command line's arguments with ``method``'s flags; each run leaves unset the flags its
    method does not read, so e.g. ``--lookbehind_adaptive_alpha`` reaches Lookbehind alone and
    ``--rho`` the SAM and Lookbehind runs."""
    flags = METHODS[method]
    defaults = {f.name: f.default for f in dataclasses.fields(LookbehindTrainingArguments)}
    unset = {name: defaults[name] for name in unread_flags(flags["lookbehind_method"])}
    return dataclasses.replace(args, **{**unset, **flags})


def method_label(method: str, args: LookbehindTrainingArguments) -> str:
    perturbation = "ASAM" if args.perturbation == "asam" else "SAM"
    if method == "sgd":
        return args.optim.split("_")[0].upper()
    if method == "sam":
        return perturbation
    alpha = (
        "adaptive α"
        if args.lookbehind_adaptive_alpha
        else f"α={LookbehindSettings(alpha=args.lookbehind_alpha).alpha}"
    )
    return f"Lookbehind-{perturbation} ({alpha})"


def default_training_arguments() -> list[str]:
    return [
        "--output_dir", "outputs/noisy_labels",
        "--num_train_epochs", "40",
        "--per_device_train_batch_size", "64",
        "--learning_rate", "0.05",
        "--optim", "sgd",
        "--optim_args", "momentum=0.9",
        "--weight_decay", "5e-4",
        "--lr_scheduler_type", "cosine",
        "--rho", "0.8",
        "--eval_strategy", "epoch",
        "--per_device_eval_batch_size", "1024",
        "--save_strategy", "no",
        "--logging_strategy", "epoch",
        "--report_to", "none",
        "--seed", "0",
        "--use_cpu",
        "--ddp_find_unused_parameters", "false",  # the network uses every parameter
    ]  # fmt: skip


class JobProgress(TrainerCallback):
    """One progress bar over the training steps of every run of the job, shown from the start
    of the first run (each run trains the same number of steps); lines go above it."""

    def __init__(self, runs: int, enabled: bool) -> None:
        self.runs, self.enabled = runs, enabled
        self.bar: tqdm | None = None

    def on_train_begin(self, args, state, control, **kwargs: Any) -> None:
        if self.bar is None and self.enabled:
            total = self.runs * state.max_steps
            self.bar = tqdm(total=total, desc="training", unit="step", dynamic_ncols=True)

    def on_step_end(self, args, state, control, **kwargs: Any) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def write(self, line: str) -> None:
        """Print ``line`` above the bar."""
        tqdm.write(line, file=sys.stdout)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def run_line(label: str, seed: int, run: dict[str, float], noisy: bool) -> str:
    noise = f", noisy fit {100 * run['noisy_fit']:.1f}%" if noisy else ""
    return (
        f"{label}, seed {seed}: test acc {100 * run['accuracy']:.2f}% (best "
        f"{100 * run['best_accuracy']:.2f}%){noise}, {run['seconds']:.1f} s training"
    )


def mean_std(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    mean = scale * float(np.mean(values))
    if len(values) < 2:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {scale * float(np.std(values, ddof=1)):.{digits}f}"


def format_table(results: dict[str, list[dict[str, float]]], noisy: bool) -> str:
    header = ("method", "test acc %", "best test acc %", "test loss", "noisy fit %", "train s")
    rows = []
    for label, runs in results.items():
        column = {key: [run[key] for run in runs] for key in runs[0]}
        rows.append(
            (
                label,
                mean_std(column["accuracy"], 100),
                mean_std(column["best_accuracy"], 100),
                mean_std(column["loss"], digits=3),
                mean_std(column["noisy_fit"], 100) if noisy else "-",
                mean_std(column["seconds"], digits=1),
            )
        )
    return markdown_table(header, rows)


def main(argv: list[str] | None = None) -> dict[str, list[dict[str, float]]]:
    """Train every method ``--seeds`` times; print the table and return each run's metrics by
    method label: final and best (over the evaluations after each epoch) test ``accuracy`` and
    ``best_accuracy``, test ``loss``, ``noisy_fit`` (share of the mislabelled training images
    predicted with their wrong label) and ``seconds`` of training (evaluations excluded)."""
    parser = HfArgumentParser((NoisyLabelsArguments, LookbehindTrainingArguments))
    argv = default_training_arguments() + list(sys.argv[1:] if argv is None else argv)
    benchmark, args = parser.parse_args_into_dataclasses(argv)
    check_evaluation_flags(args, ("loss", "accuracy"), "the test accuracy")
    torch.set_num_threads(1)  # a small MLP: more threads only add overhead
    main_process = args.process_index == 0
    say = print if main_process else lambda *_, **__: None
    digits = load_digits()
    x_train, x_test, y_train, y_test = train_test_split(
        digits.data, digits.target, test_size=benchmark.test_fraction, random_state=0,
        stratify=digits.target,
    )  # fmt: skip
    y_noisy = noisy_labels(y_train, benchmark.label_noise, benchmark.label_noise_seed)
    mislabelled = y_noisy != y_train
    noisy = bool(mislabelled.any())
    train_set, test_set = DigitsDataset(x_train, y_noisy), DigitsDataset(x_test, y_test)
    say(
        f"digits: {len(y_train)} training images ({int(mislabelled.sum())} with a wrong label, "
        f"--label_noise {benchmark.label_noise}), {len(y_test)} test images (clean labels)",
        flush=True,
    )
    runs: dict[str, LookbehindTrainingArguments] = {}
    for method in benchmark.methods:
        run_args = method_arguments(args, method)
        # e.g. --lookbehind_adaptive_alpha makes both Lookbehind rows one
        runs.setdefault(method_label(method, run_args), run_args)
    quiet = not benchmark.verbose
    progress = JobProgress(
        len(runs) * benchmark.seeds, enabled=quiet and main_process and not args.disable_tqdm
    )
    results: dict[str, list[dict[str, float]]] = {}
    for label, run_args in runs.items():
        results[label] = []
        for seed in range(args.seed, args.seed + benchmark.seeds):
            seed_args = dataclasses.replace(run_args, seed=seed)
            if quiet:  # no per-run bars; the Trainer's log dicts are not printed
                seed_args = dataclasses.replace(seed_args, disable_tqdm=True)
            torch.manual_seed(seed)
            trainer = LookbehindTrainer(
                model=ImageClassifier(digits_network(benchmark.hidden_size)),
                args=seed_args,
                train_dataset=train_set,
                eval_dataset=test_set,
                compute_metrics=top_k_accuracy(),
            )
            if quiet:
                trainer.remove_callback(PrinterCallback)
                trainer.add_callback(progress)
            seconds = train_timed(trainer)["train_seconds"]
            metrics = trainer.evaluate()
            during = [e["eval_accuracy"] for e in trainer.state.log_history if "eval_accuracy" in e]
            train_predictions = trainer.predict(train_set).predictions.argmax(-1)
            fit = train_predictions[mislabelled] == y_noisy[mislabelled]
            run = {
                "accuracy": metrics["eval_accuracy"],
                "best_accuracy": max([*during, metrics["eval_accuracy"]]),
                "loss": metrics["eval_loss"],
                "noisy_fit": float(fit.mean()) if fit.size else float("nan"),
                "seconds": seconds,
            }
            results[label].append(run)
            if main_process:
                progress.write(run_line(label, seed, run, noisy))
    progress.close()
    say(f"\nmean ± std over {benchmark.seeds} seed(s) (training seeds from {args.seed}):")
    say(format_table(results, noisy=noisy))
    return results


if __name__ == "__main__":
    main()
    end_process_group()
