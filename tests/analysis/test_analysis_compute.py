"""Accuracy per gradient computation (Table 10): curves and first-reach counts from hand-made log
histories whose answers are known exactly, the figure, the command line, and short real CIFAR
runs whose counts are known (SGD 1, SAM 2, Lookbehind k = 2 3 passes per step)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT

from hf_lookbehind.analysis import (
    ComputeCurve,
    compare_at_equal_performance,
    computations_to_reach,
    load_log_history,
    metric_against_computations,
    plot_metric_against_computations,
)
from hf_lookbehind.analysis.cli import compute_main


def history(per_step: int, accuracies: list[float], steps_per_eval: int = 10) -> list[dict]:
    """A Trainer log history: a training entry and an evaluation every ``steps_per_eval`` steps,
    ``per_step`` passes per step, the final summary, and the recipes' final evaluation."""
    entries = []
    for index, accuracy in enumerate(accuracies, start=1):
        step = index * steps_per_eval
        count = step * per_step
        entries.append({"step": step, "loss": 1.0 / index, "gradient_computations": count})
        entries.append(
            {"step": step, "eval_loss": 1.0 - accuracy, "eval_accuracy": accuracy,
             "eval_gradient_computations": count}
        )  # fmt: skip
    entries.append({"step": step, "train_loss": 0.5, "gradient_computations": count})
    entries.append(
        {"step": step, "eval_loss": 1.0 - accuracies[-1], "eval_accuracy": accuracies[-1],
         "eval_gradient_computations": count}
    )  # fmt: skip
    return entries


# Multistep-SAM (k = 2, 3 passes per step) peaks at 0.70 after 30 steps = 90 passes; Lookbehind
# (3 per step) passes 0.70 after 20 steps = 60 passes (2/3 of 90); SAM (2 per step) reaches 0.70
# after 40 steps = 80 passes (8/9); SGD (1 per step) never does.
RUNS = {
    "multistep": history(3, [0.50, 0.60, 0.70, 0.65]),
    "lookbehind": history(3, [0.55, 0.71, 0.72, 0.70]),
    "sam": history(2, [0.40, 0.55, 0.62, 0.70, 0.69]),
    "sgd": history(1, [0.30, 0.40, 0.50, 0.60, 0.61, 0.62, 0.63, 0.64]),
}


def test_curve_holds_the_evaluations_against_their_counts():
    curve = metric_against_computations(RUNS["sam"])
    assert curve.gradient_computations == [20, 40, 60, 80, 100, 100]
    assert curve.values == [0.40, 0.55, 0.62, 0.70, 0.69, 0.69]
    losses = metric_against_computations(RUNS["sam"], "loss")
    assert losses.gradient_computations == [20, 40, 60, 80, 100]
    # NaN and None are not points.
    entries = [
        *RUNS["sgd"][:2],
        {"step": 11, "eval_accuracy": math.nan, "gradient_computations": 11},
        {"step": 12, "eval_accuracy": None, "gradient_computations": 12},
    ]
    assert metric_against_computations(entries).gradient_computations == [10]


def test_a_metric_without_its_count_or_never_logged_is_an_error():
    with pytest.raises(ValueError, match="at step 10 has no 'gradient_computations'"):
        metric_against_computations([{"step": 10, "eval_accuracy": 0.5}])
    with pytest.raises(
        ValueError, match=r"'eval_top5' was never logged; the log has \[.*'eval_accuracy'"
    ):
        metric_against_computations(RUNS["sgd"], "eval_top5")


def test_table_10_fractions_are_exact():
    curves = {label: metric_against_computations(log) for label, log in RUNS.items()}
    comparison = compare_at_equal_performance(curves, "multistep")
    assert (comparison.target, comparison.reference_computations) == (0.70, 90)
    reached = {label: (run.computations, run.fraction) for label, run in comparison.runs.items()}
    assert reached == {
        "multistep": (90, 1.0),
        "lookbehind": (60, 60 / 90),
        "sam": (80, 80 / 90),
        "sgd": (None, None),
    }
    # A given target: 0.6 is first reached at 60 passes by multistep, Lookbehind and SAM, at 40
    # by SGD.
    comparison = compare_at_equal_performance(curves, "multistep", target=0.6)
    reached = {label: run.computations for label, run in comparison.runs.items()}
    assert reached == {"multistep": 60, "lookbehind": 60, "sam": 60, "sgd": 40}
    assert comparison.runs["sgd"].fraction == 40 / 60
    # Lower is better: eval_loss, the reference's best (lowest) is 0.30 at 90 passes.
    losses = {label: metric_against_computations(log, "eval_loss") for label, log in RUNS.items()}
    comparison = compare_at_equal_performance(
        losses, "multistep", metric="eval_loss", greater_is_better=False
    )
    assert comparison.target == pytest.approx(0.30)
    assert comparison.runs["lookbehind"].computations == 60
    assert computations_to_reach(losses["sgd"], 0.30, greater_is_better=False) is None


def test_bad_references_are_errors():
    curves = {label: metric_against_computations(log) for label, log in RUNS.items()}
    with pytest.raises(ValueError, match="reference run 'adam' is not among the runs"):
        compare_at_equal_performance(curves, "adam")
    with pytest.raises(
        ValueError, match=r"'sgd' never reached eval_accuracy = 0.7 \(its best: 0.64\)"
    ):
        compare_at_equal_performance(curves, "sgd", target=0.7)
    before_training = {"ref": ComputeCurve(gradient_computations=[0, 5], values=[0.2, 0.1])}
    with pytest.raises(ValueError, match="before any gradient computation"):
        compare_at_equal_performance(before_training, "ref")


def test_figure_plots_metric_against_counts_and_marks_the_first_reach(tmp_path):
    curves = {label: metric_against_computations(log) for label, log in RUNS.items()}
    comparison = compare_at_equal_performance(curves, "multistep")
    figure = plot_metric_against_computations(
        curves, tmp_path / "compute.png", comparison=comparison
    )
    assert (tmp_path / "compute.png").stat().st_size > 0
    (axes,) = figure.axes
    lines = {line.get_label(): line for line in axes.get_lines()}
    assert set(lines) >= {
        "multistep (100% of multistep)",
        "lookbehind (67% of multistep)",
        "sam (89% of multistep)",
        f"sgd (never reaches {comparison.target:.4g})",
    }
    sam = lines["sam (89% of multistep)"]
    assert list(sam.get_xdata()) == [20, 40, 60, 80, 100, 100]
    assert list(sam.get_ydata()) == [0.40, 0.55, 0.62, 0.70, 0.69, 0.69]
    crosses = [(list(line.get_xdata()), list(line.get_ydata())) for line in axes.get_lines()
               if line.get_marker() == "x"]  # fmt: skip
    assert crosses == [([90], [0.70]), ([60], [0.71]), ([80], [0.70])]  # sgd never reaches it
    targets = [line for line in axes.get_lines() if line.get_linestyle() == "--"]
    assert [list(line.get_ydata()) for line in targets] == [[0.70, 0.70]]


def write_state(directory: Path, log_history: list[dict]) -> Path:
    directory.mkdir(parents=True)
    (directory / "trainer_state.json").write_text(json.dumps({"log_history": log_history}))
    return directory


def test_command_line_and_module_entry_point(tmp_path):
    dirs = {label: write_state(tmp_path / label, log) for label, log in RUNS.items()}
    compute_main(
        [f"ms={dirs['multistep']}", f"lb={dirs['lookbehind']}", str(dirs["sgd"]),
         "--output_dir", str(tmp_path / "out")]
    )  # fmt: skip
    written = json.loads((tmp_path / "out" / "compute.json").read_text())
    assert (written["reference"], written["target"], written["reference_computations"]) == (
        "ms",
        0.70,
        90,
    )
    assert written["runs"] == {
        "ms": {"computations": 90, "fraction": 1.0},
        "lb": {"computations": 60, "fraction": 60 / 90},
        "sgd": {"computations": None, "fraction": None},
    }
    assert written["curves"]["lb"]["gradient_computations"] == [30, 60, 90, 120, 120]
    assert (tmp_path / "out" / "compute.png").stat().st_size > 0

    # python -m hf_lookbehind.analysis compute, and the console script's target.
    subprocess.run(
        [sys.executable, "-m", "hf_lookbehind.analysis", "compute",
         f"sam={dirs['sam']}", f"ms={dirs['multistep']}", "--reference", "ms",
         "--metric", "eval_loss", "--lower_is_better", "--target", "0.35",
         "--output_dir", str(tmp_path / "module")],
        check=True,
    )  # fmt: skip
    written = json.loads((tmp_path / "module" / "compute.json").read_text())
    assert written["reference_computations"] == 90  # eval_loss 0.30 <= 0.35 first at 90
    assert written["runs"]["sam"] == {"computations": 80, "fraction": 80 / 90}
    script = 'lookbehind-compute = "hf_lookbehind.analysis.cli:compute_main"'
    assert script in (ROOT / "pyproject.toml").read_text().splitlines()


@pytest.mark.slow
def test_real_cifar_runs_count_one_two_and_three_passes_per_step(shared_data, tmp_path):
    """SGD, SAM and Lookbehind-SAM (k = 2) for 4 steps (2 epochs of 2 batches, an evaluation
    after each): the evaluations carry 2/4, 4/8 and 6/12 passes; SAM with 2 accumulated
    micro-batches per step still counts 2 per step."""
    from run_cifar import main

    cifar = shared_data / "cifar10"
    methods = {
        "sgd": ["--lookbehind_method", "none"],
        "sam": ["--lookbehind_method", "sam"],
        "sam_accumulated": ["--lookbehind_method", "sam", "--per_device_train_batch_size", "8",
                            "--gradient_accumulation_steps", "2"],
        "lookbehind": ["--lookbehind_method", "lookbehind", "--lookbehind_k", "2"],
    }  # fmt: skip
    for label, flags in methods.items():
        main(
            ["--model_name", "resnet8",
             "--train_path", str(cifar / "train.parquet"),
             "--validation_path", str(cifar / "test.parquet"),
             "--max_train_samples", "32", "--max_eval_samples", "16",
             "--num_train_epochs", "2", "--per_device_train_batch_size", "16",
             "--learning_rate", "0.05", "--save_strategy", "no",
             "--dataloader_num_workers", "0", "--report_to", "none", "--seed", "0",
             "--output_dir", str(tmp_path / label), *flags]
        )  # fmt: skip
    passes_per_step = {"sgd": 1, "sam": 2, "sam_accumulated": 2, "lookbehind": 3}
    curves = {}
    for label, per_step in passes_per_step.items():
        curves[label] = metric_against_computations(load_log_history(tmp_path / label))
        assert curves[label].gradient_computations == [2 * per_step, 4 * per_step]

    compute_main(
        [*(f"{label}={tmp_path / label}" for label in methods), "--reference", "sam",
         "--output_dir", str(tmp_path / "out")]
    )  # fmt: skip
    written = json.loads((tmp_path / "out" / "compute.json").read_text())
    sam = curves["sam"]
    assert written["target"] == max(sam.values)
    # The reference reaches its best where it first logs it; every run the first time it logs
    # the target or more, if ever.
    best_at = sam.gradient_computations[sam.values.index(max(sam.values))]
    assert written["reference_computations"] == best_at
    for label, curve in curves.items():
        assert written["curves"][label] == {
            "gradient_computations": curve.gradient_computations,
            "values": curve.values,
        }
        logged = zip(curve.gradient_computations, curve.values)
        reached = [count for count, value in logged if value >= written["target"]]
        assert written["runs"][label]["computations"] == (reached[0] if reached else None)
