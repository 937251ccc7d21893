"""Short runs of the lifelong recipe (examples/lifelong/run_lifelong.py) on the shared CIFAR-10
images: Split-CIFAR10 learns every task above chance and reports forgetting, and
Lookbehind-C-MAML runs over two seeds."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from lifelong_metrics import forgetting
from run_lifelong import main


@pytest.mark.slow
def test_split_cifar10_run_learns_every_task_and_measures_forgetting(shared_data, tmp_path):
    data = shared_data / "cifar10"
    test_images = 400
    results = main(
        [
            "--benchmark", "split_cifar10",
            "--train_path", str(data / "train.parquet"),
            "--validation_path", str(data / "test.parquet"),
            "--train_samples_per_task", "500", "--test_samples_per_task", str(test_images),
            "--epochs_per_task", "3", "--cnn_channels", "16",
            "--method", "sam", "--episodic_replay", "--seeds", "0",
            "--output_dir", str(tmp_path),
        ]
    )  # fmt: skip
    run = results["runs"][0]
    matrix = np.asarray(run["accuracy_matrix"])
    assert matrix.shape == (5, 5)
    # binary tasks: chance is 0.5; three binomial standard deviations above it
    above_chance = 0.5 + 3 * math.sqrt(0.25 / test_images)
    assert (np.diag(matrix) > above_chance).all(), matrix
    assert run["forgetting"] == pytest.approx(forgetting(matrix))
    assert run["average_accuracy"] == pytest.approx(matrix[-1].mean())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["task_classes"] == [saved["class_order"][2 * t : 2 * t + 2] for t in range(5)]
    assert saved["hyperparameters"] == {"learning_rate": 0.1, "rho": 0.05}
    assert saved["test_examples_per_task"] == [test_images] * 5
    assert (tmp_path / "accuracy_matrix_seed0.png").stat().st_size > 0


@pytest.mark.slow
def test_lookbehind_cmaml_runs_on_split_cifar10(shared_data, tmp_path):
    data = shared_data / "cifar10"
    results = main(
        [
            "--benchmark", "split_cifar10",
            "--train_path", str(data / "train.parquet"),
            "--validation_path", str(data / "test.parquet"),
            "--train_samples_per_task", "60", "--test_samples_per_task", "100",
            "--epochs_per_task", "1", "--cnn_channels", "8",
            "--method", "lookbehind_cmaml", "--seeds", "0", "1",
            "--output_dir", str(tmp_path),
        ]
    )  # fmt: skip
    assert [run["seed"] for run in results["runs"]] == [0, 1]
    for run in results["runs"]:
        assert np.isfinite(run["accuracy_matrix"]).all()
        assert run["forgetting"] == pytest.approx(forgetting(run["accuracy_matrix"]))
    summary = results["summary"]
    values = [run["average_accuracy"] for run in results["runs"]]
    assert summary["average_accuracy_mean"] == pytest.approx(np.mean(values))
