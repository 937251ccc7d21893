"""CIFAR-10 with 40 % symmetric label noise on one GPU: SGD, SAM and Lookbehind-SAM through the
CIFAR recipe (``examples/cifar/run_cifar.py``), sized to a wall-clock budget, in one table.

Every method trains the recipe's ResNet-18 in bf16 on the same noisy labels (``--label_noise
0.4``, noise seed 0; the test labels stay clean) with the same seed and the recipe's paper
defaults (batch 128, SGD lr 0.1, momentum 0.9, weight decay 5e-4, crop and flip) and a cosine
schedule; SAM with rho 0.1, Lookbehind-SAM with k = 2, adaptive alpha (eq. 7-8), rho 0.05.
The two rho are matched by the distance of the last gradient from the slow weights:
Lookbehind's k = 2 ascents accumulate to about 2 rho, and in the CPU comparison under the same
noise (the CIFAR README) SAM's best rho was twice Lookbehind-SAM's (0.2 against 0.1), and
adaptive alpha led alpha 0.5. The data is decoded once and shared by the runs.

SAM trains 3 epochs for every 2 of SGD and Lookbehind-SAM: Lookbehind-SAM's gradient
computations (3 passes per step against SAM's 2). Without ``--epochs``, each method first trains
``--probe_steps`` steps (the probe): its steady step time, its set-up and warm-up, and the cost
of one evaluation (test set and the training set scored for ``noise_fitted``). The runs then get
the most epochs (2E for SGD and Lookbehind-SAM, 3E for SAM) with which all three, evaluated
after every epoch, fit in what is left of ``--budget_seconds`` (counted from the start of the
process, imports included), with a margin.

The table: final test accuracy (the test set is the only evaluation set, so no best epoch is
shown), the final ``noise_fitted`` (share of the corrupted training examples predicted with
their noisy label) and ``clean_train_accuracy``, gradient computations, seconds of training per
epoch and their ratio to SGD's (the step-time ratio: every epoch has the same steps). It goes to
stdout and to ``summary.md``/``summary.json`` in ``--output_dir``, with each run's
``all_results.json``, ``trainer_state.json`` and ``label_noise.json`` (the models stay in a
temporary folder: only small files are written).

On a GPU machine without the package installed: ``bash scripts/prepare_device_check.sh`` writes
``.device_data`` (the CIFAR-10 parquet files) and ``.whl`` (the Python packages a bare GPU image
lacks); copy the checkout with both folders to the GPU machine and run there, from its root:

    python3 -m pip install -q --no-deps --target /tmp/site .whl/*.whl
    PYTHONPATH=/tmp/site:$PWD python3 scripts/cifar_noisy_labels_gpu.py \\
        --data_dir .device_data/cifar10 --output_dir out/cifar_noisy_labels

    python scripts/cifar_noisy_labels_gpu.py --tiny   # the same pipeline on the CPU, < 1 min
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import psutil
import torch
from summarize_runs import summarize
from transformers import TrainerCallback

from hf_lookbehind.analysis.sweep import read_metric
from hf_lookbehind_recipes.cifar import CifarData, load_cifar_data, parse_arguments, train_cifar
from hf_lookbehind_recipes.label_noise import CLEAN_TRAIN_ACCURACY, NOISE_FITTED
from hf_lookbehind_recipes.tables import markdown_table

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA_DIR = ROOT.parent / "shared" / "data" / "cifar10"
METHODS = {
    "SGD": ["--lookbehind_method", "none"],
    "SAM": ["--lookbehind_method", "sam", "--rho", "0.1"],
    "Lookbehind-SAM": ["--lookbehind_method", "lookbehind", "--lookbehind_k", "2",
                       "--lookbehind_adaptive_alpha", "--rho", "0.05"],
}  # fmt: skip
# Epochs per planned unit: SAM's 3 at 2 passes per step match Lookbehind-SAM's 2 at 3.
EPOCH_UNITS = {"SGD": 2, "SAM": 3, "Lookbehind-SAM": 2}
RUN_FILES = ("all_results.json", "trainer_state.json", "label_noise.json")
# Share of the remaining budget that the planned runs may take (the rest absorbs what the
# probe does not see: data-loader start-up each epoch, variation between epochs).
BUDGET_MARGIN = 0.9
NOISE_METRICS = (NOISE_FITTED, CLEAN_TRAIN_ACCURACY)
COLUMNS = ("method", "epochs", "final acc", "noise fitted", "clean train acc",
           "gradient computations", "s/epoch", "step time vs SGD")  # fmt: skip


def seconds_since_process_start() -> float:
    return time.time() - psutil.Process().create_time()


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class StepClock(TrainerCallback):
    """Wall time at the end of every optimizer step and of training, once the device is done."""

    def __init__(self) -> None:
        self.step_ends: list[float] = []
        self.train_end: float | None = None

    def on_step_end(self, args, state, control, **kwargs) -> None:
        synchronize()
        self.step_ends.append(time.perf_counter())

    def on_train_end(self, args, state, control, **kwargs) -> None:
        synchronize()
        self.train_end = time.perf_counter()

    def seconds_per_step(self) -> float:
        """Mean over the steps after the first third (warm-up)."""
        warm = max(1, len(self.step_ends) // 3)
        return (self.step_ends[-1] - self.step_ends[warm - 1]) / (len(self.step_ends) - warm)


@dataclass
class RunCost:
    """One method's probe: set-up and warm-up of a run, one epoch of training, one evaluation."""

    setup_seconds: float
    epoch_seconds: float
    eval_seconds: float


def units_within_budget(costs: Sequence[RunCost], units: Sequence[int], seconds_left: float) -> int:
    """The most E (at least 1) with which every run, each costing set-up + ``units`` E (epoch +
    evaluation) + the final evaluation, fits in ``BUDGET_MARGIN * seconds_left``."""
    fixed = sum(cost.setup_seconds + cost.eval_seconds for cost in costs)
    per_unit = sum(n * (cost.epoch_seconds + cost.eval_seconds) for cost, n in zip(costs, units))
    return max(1, math.floor((BUDGET_MARGIN * seconds_left - fixed) / per_unit))


def recipe_flags(args: argparse.Namespace) -> list[str]:
    """The flags every run shares."""
    flags = [
        "--model_name", args.model_name,
        "--train_path", str(args.data_dir / "train.parquet"),
        "--validation_path", str(args.data_dir / "test.parquet"),
        "--label_noise", str(args.label_noise), "--label_noise_seed", "0", "--seed", "0",
        "--lr_schedule", "trainer", "--lr_scheduler_type", "cosine",
        "--save_strategy", "no", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    if args.tiny:
        return [
            *flags,
            "--max_train_samples", "256", "--max_eval_samples", "128",
            "--per_device_train_batch_size", "32", "--per_device_eval_batch_size", "128",
            "--dataloader_num_workers", "0", "--use_cpu", "true",
        ]  # fmt: skip
    return [*flags, "--bf16", "true"]


def probe(flags: list[str], data: CifarData, steps: int, output_dir: Path) -> RunCost:
    """Train ``steps`` steps and evaluate once; what one epoch and one evaluation cost."""
    run_flags = ["--max_steps", str(steps), "--eval_strategy", "no"]
    run_args = parse_arguments([*flags, *run_flags, "--output_dir", str(output_dir)])
    clock = StepClock()
    started = time.perf_counter()
    train_cifar(run_args, data, [clock])
    synchronize()
    finished = time.perf_counter()
    release_memory()
    step_seconds = clock.seconds_per_step()
    steps_per_epoch = math.ceil(len(data.train) / run_args[3].train_batch_size)
    return RunCost(
        setup_seconds=clock.train_end - started - steps * step_seconds,
        epoch_seconds=step_seconds * steps_per_epoch,
        eval_seconds=finished - clock.train_end,
    )


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tabulate(run_dirs: dict[str, str], epochs: dict[str, int]) -> list[dict]:
    """``scripts/summarize_runs.py``'s rows (final accuracy, seconds per epoch and their ratio
    to the first run's) with the epochs, the final noise metrics and the gradient computations."""
    metrics = (*NOISE_METRICS, "gradient_computations")
    return [
        row | {"epochs": epochs[method]} | {name: read_metric(run_dir, name) for name in metrics}
        for row, (method, run_dir) in zip(summarize(run_dirs), run_dirs.items())
    ]


def markdown(rows: list[dict]) -> str:
    return markdown_table(
        COLUMNS,
        [
            (r["run"], r["epochs"], f"{100 * r['eval_accuracy']:.2f}",
             f"{100 * r[NOISE_FITTED]:.2f}", f"{100 * r[CLEAN_TRAIN_ACCURACY]:.2f}",
             r["gradient_computations"], f"{r['train_seconds_per_epoch']:.2f}",
             f"{r['time_vs_first']:.2f}")
            for r in rows
        ],
    )  # fmt: skip


def parse(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--data_dir",
        type=Path,
        default=DEFAULT_DATA_DIR,
        help="Folder with CIFAR-10's train.parquet and test.parquet (hub schema).",
    )
    parser.add_argument("--output_dir", type=Path, default=Path("out/cifar_noisy_labels"))
    parser.add_argument(
        "--epochs",
        type=int,
        help="E: SGD and Lookbehind-SAM train 2E epochs, SAM 3E; default: the budget's.",
    )
    parser.add_argument(
        "--budget_seconds",
        type=float,
        help="Wall seconds from the process start (default 520, which leaves 20 s of 9 minutes "
        "to install the wheels; --tiny 45).",
    )
    parser.add_argument(
        "--probe_steps", type=int, help="Steps of each method's probe (default 30; --tiny 4)."
    )
    parser.add_argument("--model_name", help="Recipe model (default resnet18; --tiny resnet8).")
    parser.add_argument("--label_noise", type=float, default=0.4)
    parser.add_argument(
        "--tiny",
        action="store_true",
        help="ResNet-8 on 256 training and 128 test images, on the CPU in fp32.",
    )
    args = parser.parse_args(argv)
    tiny = {"model_name": "resnet8", "budget_seconds": 45.0, "probe_steps": 4}
    gpu = {"model_name": "resnet18", "budget_seconds": 520.0, "probe_steps": 30}
    for name, default in (tiny if args.tiny else gpu).items():
        if getattr(args, name) is None:
            setattr(args, name, default)
    if args.epochs is not None and args.epochs < 1:
        parser.error(f"--epochs must be a positive integer, got {args.epochs}")
    if args.probe_steps < 2:
        parser.error(f"--probe_steps must be at least 2 (one to warm up), got {args.probe_steps}")
    missing = [
        name for name in ("train.parquet", "test.parquet") if not (args.data_dir / name).is_file()
    ]
    if missing:
        parser.error(
            f"{args.data_dir} lacks {', '.join(missing)}: give --data_dir, a folder with "
            "CIFAR-10's train.parquet and test.parquet (scripts/prepare_device_check.sh writes "
            ".device_data/cifar10)"
        )
    if not args.tiny and not torch.cuda.is_available():
        parser.error("no CUDA device: this comparison is sized for one GPU; --tiny runs it on CPU")
    return args


def main(argv: Sequence[str] | None = None) -> list[dict]:
    args = parse(argv)
    if args.tiny:
        torch.set_num_threads(1)  # a tiny model: more threads only add overhead
    flags = recipe_flags(args)
    data_args = parse_arguments([*flags, "--output_dir", str(args.output_dir)])[1]  # all checked
    data = load_cifar_data(data_args, seed=0)
    costs = {}
    unit = args.epochs
    with tempfile.TemporaryDirectory() as runs:
        if unit is None:
            for method, method_flags in METHODS.items():
                costs[method] = probe(
                    [*flags, *method_flags], data, args.probe_steps, Path(runs) / "probe" / method
                )
            seconds_left = args.budget_seconds - seconds_since_process_start()
            unit = units_within_budget(
                list(costs.values()), list(EPOCH_UNITS.values()), seconds_left
            )
        epochs = {method: units * unit for method, units in EPOCH_UNITS.items()}
        print(
            f"{len(data.train)} training images, {len(data.corrupted)} with a wrong label; "
            + ", ".join(f"{method} {count} epochs" for method, count in epochs.items()),
            flush=True,
        )
        run_dirs = {method: str(Path(runs) / method.lower()) for method in METHODS}
        for method, method_flags in METHODS.items():
            run_flags = [
                "--num_train_epochs",
                str(epochs[method]),
                "--output_dir",
                run_dirs[method],
            ]
            train_cifar(parse_arguments([*flags, *method_flags, *run_flags]), data)
            release_memory()
        rows = tabulate(run_dirs, epochs)
        for method, run_dir in run_dirs.items():
            kept = args.output_dir / method.lower()
            kept.mkdir(parents=True, exist_ok=True)
            for name in RUN_FILES:
                shutil.copyfile(Path(run_dir) / name, kept / name)
    summary = markdown(rows)
    elapsed = seconds_since_process_start()
    print(
        f"\n{summary}\n\n{elapsed:.0f} s since the process started "
        f"(budget {args.budget_seconds:.0f} s)"
    )
    args.output_dir.mkdir(parents=True, exist_ok=True)
    (args.output_dir / "summary.md").write_text(summary + "\n")
    record = {
        "rows": rows,
        "recipe_flags": {
            method: [*flags, *method_flags] for method, method_flags in METHODS.items()
        },
        "train_examples": len(data.train),
        "corrupted_examples": len(data.corrupted),
        "probes": {method: asdict(cost) for method, cost in costs.items()},
        "budget_seconds": args.budget_seconds,
        "elapsed_seconds": elapsed,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
    }
    (args.output_dir / "summary.json").write_text(json.dumps(record, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
