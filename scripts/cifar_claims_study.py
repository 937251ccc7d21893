"""The paper's central CIFAR claims, measured on held-out data: SAM against Lookbehind-SAM
(k 2, alpha 0.5 and adaptive alpha) on a CIFAR-10 subset, with clean labels and with 40 %
symmetric label noise.

Protocol. ResNet-8 trains on a fixed random 2,000-image subset of the CIFAR-10 training set
(the first 2,000 rows of its seed-0 permutation, as ``scripts/cifar_subset.py``); the next 1,000
rows of that permutation are the validation split, carved from the training data (with the
same rate of label noise as the training labels in the noisy setting, as a user would have it);
the 10,000 test images are scored once per run, and nothing is chosen on them. Batch 32, SGD lr
0.05 (momentum 0.9, weight decay 5e-4), 40 epochs with the lr x0.1 at epochs 20 and 30, random
crop and flip. The rho grids cover matched perturbation distance: SAM at 0.05-0.4, Lookbehind-SAM
at half of each (its k ascents accumulate to about 2 rho). Every (method, rho) runs with seeds
0, 1 and 2; rho is then chosen per method on the mean final validation accuracy, and SAM at its
chosen rho also trains for 60 epochs (lr x0.1 at 30 and 45): Lookbehind-SAM's gradient
computations. After training, each run measures on the final (slow) weights, with the package's
analysis tools: the training loss (no augmentation, the labels it trained on), m-sharpness (eq. 5;
m 128, 4 training minibatches, 3 ascent steps) and the accuracy on the first 2,000 test images
under multiplicative weight noise (Sec. 4.4, 2 draws per sigma).

    python scripts/cifar_claims_study.py run      # one worker; start two for two cores
    python scripts/cifar_claims_study.py report   # tables and figures from the records

A run whose record exists is skipped, so the study resumes where it stopped; each worker takes
the next run no other live worker holds.

A run's record is ``results/cifar_claims/<setting>/<run>_seed<N>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "cifar10"
RECORDS = ROOT / "results" / "cifar_claims"
RUNS = ROOT / "outputs" / "cifar_claims"

TRAIN_ROWS, VALIDATION_ROWS = 2000, 1000
NOISE = {"clean": 0.0, "noisy40": 0.4}
SEEDS = (0, 1, 2)
SAM_RHOS = (0.05, 0.1, 0.2, 0.4)
LOOKBEHIND_RHOS = (0.025, 0.05, 0.1, 0.2)
EPOCHS, DECAYS = 40, (20, 30)
LONG_EPOCHS, LONG_DECAYS = 60, (30, 45)  # SAM at Lookbehind-SAM's gradient computations
SHARPNESS_RADII = (0.05, 0.1)
NOISE_SIGMAS = (0.0, 0.05, 0.1)
NOISE_TEST_ROWS = 2000  # the first 2,000 test images
COMMON = [
    "--model_name", "resnet8", "--per_device_train_batch_size", "32",
    "--learning_rate", "0.05", "--crop_padding", "4", "--eval_strategy", "epoch",
    "--save_strategy", "no", "--dataloader_num_workers", "0", "--report_to", "none",
    "--use_cpu", "--disable_tqdm", "true",
]  # fmt: skip
METHODS = {
    "sam": ["--lookbehind_method", "sam"],
    "lookbehind_a0.5": ["--lookbehind_method", "lookbehind", "--lookbehind_k", "2",
                        "--lookbehind_alpha", "0.5"],
    "lookbehind_adaptive": ["--lookbehind_method", "lookbehind", "--lookbehind_k", "2",
                            "--lookbehind_adaptive_alpha"],
}  # fmt: skip


@dataclass(frozen=True)
class Run:
    setting: str
    method: str
    rho: float
    seed: int
    epochs: int = EPOCHS

    @property
    def name(self) -> str:
        long = f"_{self.epochs}_epochs" if self.epochs != EPOCHS else ""
        return f"{self.method}{long}_rho{self.rho:g}_seed{self.seed}"

    @property
    def record(self) -> Path:
        return RECORDS / self.setting / f"{self.name}.json"

    def flags(self) -> list[str]:
        decays = DECAYS if self.epochs == EPOCHS else LONG_DECAYS
        return [
            *COMMON, *METHODS[self.method], "--rho", str(self.rho), "--seed", str(self.seed),
            "--num_train_epochs", str(self.epochs), "--lr_decay_epochs", *map(str, decays),
        ]  # fmt: skip


def load_records(setting: str) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((RECORDS / setting).glob("*.json"))]


def chosen_rho(records: list[dict], method: str) -> float | None:
    """The rho with the best mean final validation accuracy over seeds, once every seed of every
    rho of ``method`` has a record (40-epoch runs only)."""
    rhos = SAM_RHOS if method == "sam" else LOOKBEHIND_RHOS
    by_rho = {rho: [] for rho in rhos}
    for r in records:
        if r["method"] == method and r["epochs"] == EPOCHS and r["rho"] in by_rho:
            by_rho[r["rho"]].append(r["validation_accuracy"])
    if any(len(v) < len(SEEDS) for v in by_rho.values()):
        return None
    return max(rhos, key=lambda rho: statistics.fmean(by_rho[rho]))


def plan() -> list[Run]:
    """Every run of the study, in order: the grids seed by seed (clean first), then SAM for 60
    epochs at its chosen rho once its grid is complete."""
    runs = []
    for setting in NOISE:
        for seed in SEEDS:
            for method in METHODS:
                rhos = SAM_RHOS if method == "sam" else LOOKBEHIND_RHOS
                runs += [Run(setting, method, rho, seed) for rho in rhos]
        rho = chosen_rho(load_records(setting), "sam")
        if rho is not None:
            runs += [Run(setting, "sam", rho, seed, LONG_EPOCHS) for seed in SEEDS]
    return runs


# ------------------------------------------------------------------------------------- training


def load_splits(noise: float):
    """(train, validation, test) datasets of the recipe, the validation labels noised as the
    training labels are (another noise seed), and the corrupted training indices."""
    import numpy as np
    from datasets import load_dataset

    from hf_lookbehind_recipes.cifar import CifarDataArguments, cifar_dataset
    from hf_lookbehind_recipes.label_noise import symmetric_label_noise

    files = {"train": str(DATA / "train.parquet"), "test": str(DATA / "test.parquet")}
    raw = load_dataset("parquet", data_files=files)
    order = np.random.default_rng(0).permutation(len(raw["train"]))
    data_args = CifarDataArguments(train_path="-", validation_path="-", crop_padding=4)
    train = cifar_dataset(raw["train"].select(order[:TRAIN_ROWS]), data_args, 10, augment=True)
    validation = cifar_dataset(
        raw["train"].select(order[TRAIN_ROWS : TRAIN_ROWS + VALIDATION_ROWS]),
        data_args, 10, augment=False,
    )  # fmt: skip
    test = cifar_dataset(raw["test"], data_args, 10, augment=False)
    train.labels, corrupted = symmetric_label_noise(train.labels, noise, 10, seed=0)
    validation.labels, _ = symmetric_label_noise(validation.labels, noise, 10, seed=1)
    return train, validation, test, corrupted


def measure(model, train, test) -> dict:
    """Training loss, m-sharpness and test accuracy under weight noise of the final weights."""
    import torch
    from torch.utils.data import DataLoader, Subset

    from hf_lookbehind.analysis.classifier import evaluate
    from hf_lookbehind.analysis.noise import noisy_weight_robustness
    from hf_lookbehind.analysis.sharpness import m_sharpness

    plain = train.without_augmentation()
    train_loss, train_accuracy = evaluate(model, DataLoader(plain, batch_size=500))
    test_loss, test_accuracy = evaluate(model, DataLoader(test, batch_size=100))
    generator = torch.Generator().manual_seed(0)
    batches = DataLoader(plain, batch_size=128, shuffle=True, generator=generator)
    sharpness = m_sharpness(
        model, batches, SHARPNESS_RADII, num_batches=4, ascent_steps=3, progress=False
    )
    noise = noisy_weight_robustness(
        model,
        DataLoader(Subset(test, range(NOISE_TEST_ROWS)), batch_size=100),
        DataLoader(plain, batch_size=128, shuffle=True, generator=generator),
        NOISE_SIGMAS,
        draws=2,
        num_calibration_batches=10,
        progress=False,
    )
    return {
        "train_loss": train_loss,
        "train_accuracy": train_accuracy,
        "test_loss": test_loss,
        "test_accuracy": test_accuracy,
        "m_sharpness": dict(zip(map(str, SHARPNESS_RADII), sharpness.mean)),
        "noise_accuracy": dict(zip(map(str, NOISE_SIGMAS), noise.accuracy_mean)),
    }


def train_one(run: Run, splits) -> dict:
    from transformers import TrainerCallback

    from hf_lookbehind_recipes.cifar import CifarData, parse_arguments, train_cifar

    train, validation, test, corrupted = splits
    output = RUNS / run.setting / run.name
    args = parse_arguments([*run.flags(), "--output_dir", str(output),
                            "--train_path", "-", "--validation_path", "-"])  # fmt: skip
    trained = {}

    class KeepModel(TrainerCallback):
        def on_train_end(self, args, state, control, model=None, **kwargs):
            trained["model"], trained["log_history"] = model, state.log_history

    start = time.time()
    metrics = train_cifar(args, CifarData(train, validation, 10, corrupted), [KeepModel()])
    logs = trained["log_history"]
    distances = [e["perturbation_distance"] for e in logs if "perturbation_distance" in e]
    return {
        "setting": run.setting, "method": run.method, "rho": run.rho, "seed": run.seed,
        "epochs": run.epochs, "flags": run.flags(),
        "validation_accuracy": metrics["eval_accuracy"],
        "validation_loss": metrics["eval_loss"],
        "gradient_computations": metrics["gradient_computations"],
        "perturbation_distance": statistics.fmean(distances) if distances else None,
        "noise_fitted": metrics.get("noise_fitted"),
        **measure(trained["model"], train, test),
        "seconds": time.time() - start,
        "log_history": logs,
    }  # fmt: skip


def claim(run: Run) -> bool:
    """Take ``run`` for this process (a lock file holding its pid); False while another live
    process holds it. The lock of a process that died is taken over."""
    lock = RUNS / "locks" / f"{run.setting}_{run.name}"
    lock.parent.mkdir(parents=True, exist_ok=True)
    try:
        descriptor = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
        try:
            os.kill(int(lock.read_text() or 0), 0)
            return False
        except (ProcessLookupError, ValueError):
            lock.unlink(missing_ok=True)
            return claim(run)
    os.write(descriptor, str(os.getpid()).encode())
    os.close(descriptor)
    return True


def run_study(deadline: float | None) -> None:
    import torch

    torch.set_num_threads(1)
    splits: dict[str, tuple] = {}
    while deadline is None or time.time() < deadline:
        run = next((r for r in plan() if not r.record.exists() and claim(r)), None)
        if run is None:
            return
        if run.setting not in splits:
            splits[run.setting] = load_splits(NOISE[run.setting])
        print(f"{time.strftime('%H:%M:%S')} {run.setting} {run.name}", flush=True)
        record = train_one(run, splits[run.setting])
        run.record.parent.mkdir(parents=True, exist_ok=True)
        run.record.write_text(json.dumps(record, indent=1) + "\n")
        print(
            f"{time.strftime('%H:%M:%S')} {run.setting} {run.name}: validation "
            f"{record['validation_accuracy']:.3f}, test {record['test_accuracy']:.4f}, "
            f"{record['seconds']:.0f} s",
            flush=True,
        )


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="Train the runs without a record.")
    run.add_argument(
        "--stop_after_minutes",
        type=float,
        help="Start no run after this many minutes (default: run the whole plan).",
    )
    commands.add_parser("report", help="Tables and figures from the records.")
    args = parser.parse_args(argv)
    if args.command == "run":
        sys.path.insert(0, str(ROOT))
        deadline = None
        if args.stop_after_minutes is not None:
            deadline = time.time() + 60 * args.stop_after_minutes
        run_study(deadline)
    else:
        from cifar_claims_report import report

        report(RECORDS)


if __name__ == "__main__":
    main()
