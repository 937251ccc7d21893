"""The prepared GPU check, run on the CPU at a tiny size: ``scripts/cifar_subset.py`` writes a
subset that keeps the hub schema, ``scripts/device_check.sh`` trains SGD, SAM and
Lookbehind-SAM on it and tabulates what each run wrote (``scripts/summarize_runs.py``), and it
reports the operations of an outer step (``scripts/benchmark_ops.py``; CUDA kernel launches are
counted on a GPU only)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from helpers import ROOT

SCRIPTS = ROOT / "scripts"


def _subset(source: Path, destination: Path, rows: int) -> None:
    command = [sys.executable, str(SCRIPTS / "cifar_subset.py"), str(source), str(destination)]
    subprocess.run([*command, "--num_rows", str(rows)], check=True, capture_output=True)


def test_subset_keeps_the_schema_and_draws_distinct_source_rows(shared_data, tmp_path):
    source = shared_data / "cifar10" / "test.parquet"
    _subset(source, tmp_path / "subset.parquet", 300)
    original, subset = pq.read_table(source), pq.read_table(tmp_path / "subset.parquet")
    assert subset.schema == original.schema
    assert subset.schema.metadata == original.schema.metadata  # the hub features
    assert subset.num_rows == 300
    images = original.column("img").combine_chunks().field("bytes").to_pylist()
    labels = original.column("label").to_pylist()
    rows = {image: label for image, label in zip(images, labels)}
    drawn = subset.column("img").combine_chunks().field("bytes").to_pylist()
    assert len(set(drawn)) == 300
    assert [rows[image] for image in drawn] == subset.column("label").to_pylist()


@pytest.mark.slow
def test_device_check_trains_each_method_and_tabulates_the_runs(shared_data, tmp_path):
    data = tmp_path / "cifar10"
    _subset(shared_data / "cifar10" / "train.parquet", data / "train.parquet", 96)
    _subset(shared_data / "cifar10" / "test.parquet", data / "test.parquet", 64)
    out, runs = tmp_path / "out", tmp_path / "runs"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OUT": str(out),
        "RUNS_DIR": str(runs),
        "DATA": str(data),
        "WHEELS": "",
        "OPS": "0",
        "BENCHMARK": "0",
        "PRECISION": "",
        "MODEL": "resnet20",
        "EPOCHS": "2",
        "CIFAR_FLAGS": "--per_device_train_batch_size 32 --dataloader_num_workers 0 "
        "--logging_strategy steps --logging_steps 1",
    }
    result = subprocess.run(
        ["bash", str(SCRIPTS / "device_check.sh")],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    assert [row["run"] for row in summary] == ["sgd", "sam", "lookbehind"]
    for row in summary:
        written = json.loads((runs / row["run"] / "all_results.json").read_text())
        for key in ("eval_accuracy", "best_eval_accuracy", "train_seconds_per_epoch"):
            assert row[key] == written[key]
        assert 0.0 <= row["eval_accuracy"] <= row["best_eval_accuracy"] <= 1.0
        assert row["time_vs_first"] == pytest.approx(
            row["train_seconds_per_epoch"] / summary[0]["train_seconds_per_epoch"]
        )
    assert (out / "summary.md").read_text().startswith("| run | final acc |")

    # Each run trained with its own method's flags: 3 steps per epoch, two epochs; SAM ascends
    # every step, Lookbehind updates the slow weights with alpha 0.5, SGD does neither.
    for method in ("sgd", "sam", "lookbehind"):
        history = json.loads((runs / method / "trainer_state.json").read_text())["log_history"]
        steps = [entry for entry in history if "loss" in entry]
        assert len(steps) == 6
        ascended = [entry.get("ascent_grad_norm", 0.0) > 0 for entry in steps]
        assert all(ascended) == (method != "sgd")
        alphas = [entry["lookbehind_alpha"] for entry in steps if "lookbehind_alpha" in entry]
        assert (alphas == pytest.approx([0.5] * 6)) == (method == "lookbehind")


@pytest.mark.slow
def test_device_check_reports_the_operations_of_an_outer_step(tmp_path):
    """The check's first step alone (no training, no timing), on the CPU: the table, with the
    note that kernel launches are not counted here, and its JSON; a failing first step is
    reported and the check goes on."""
    out = tmp_path / "out"
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "OUT": str(out),
        "WHEELS": "",
        "CIFAR": "0",
        "BENCHMARK": "0",
        "OPS_FLAGS": "--tiny --device cpu --cases sam,asam",
    }
    command = ["bash", str(SCRIPTS / "device_check.sh")]
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    printed = (out / "ops.txt").read_text()
    assert "CUDA kernel launches: not counted" in printed and "every row meets" in printed
    report = json.loads((out / "ops.json").read_text())
    assert [row["case"] for row in report["rows"]] == ["sam", "asam"]
    assert all(
        count["launches"] is None and count["ops"] > 0
        for row in report["rows"]
        for count in row["counts"].values()
    )

    env["OPS_FLAGS"] = "--tiny --cases no_such_case"
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "failed (exit status 2); the check goes on" in (out / "ops.txt").read_text()
