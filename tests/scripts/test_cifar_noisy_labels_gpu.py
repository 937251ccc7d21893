"""The noisy-label GPU comparison (``scripts/cifar_noisy_labels_gpu.py``): its epochs sized to
the budget, its refusals, and the whole pipeline at ``--tiny`` size on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from cifar_noisy_labels_gpu import BUDGET_MARGIN, RunCost, main, units_within_budget
from helpers import ROOT

SCRIPT = ROOT / "scripts" / "cifar_noisy_labels_gpu.py"
HEADER = (
    "| method | epochs | final acc | noise fitted | clean train acc | gradient computations "
    "| s/epoch | step time vs SGD |"
)


def test_epochs_fill_the_budget_after_set_up_and_final_evaluations():
    costs = [RunCost(2.0, 10.0, 1.0), RunCost(3.0, 20.0, 1.0), RunCost(4.0, 30.0, 2.0)]
    units = [2, 3, 2]
    # fixed: set-ups 9 + final evaluations 4 = 13; per unit: 2 * 11 + 3 * 21 + 2 * 32 = 149
    assert units_within_budget(costs, units, (13.0 + 149.0 * 7 + 0.5) / BUDGET_MARGIN) == 7
    assert units_within_budget(costs, units, (13.0 + 149.0 * 7 - 0.5) / BUDGET_MARGIN) == 6
    assert units_within_budget(costs, units, 5.0) == 1  # at least one unit, even over the budget


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--epochs", "0"], "--epochs must be a positive integer"),
        (["--probe_steps", "1"], "--probe_steps must be at least 2"),
        (["--data_dir", "/nonexistent"], "lacks train.parquet, test.parquet: give --data_dir"),
    ],
)
def test_bad_settings_are_refused_before_any_work(flags, message, capsys):
    with pytest.raises(SystemExit):
        main(["--tiny", *flags])
    assert message in capsys.readouterr().err


@pytest.mark.slow
def test_tiny_run_tabulates_every_method(shared_data, tmp_path):
    """Probes, epochs sized to a 25 s budget, three runs and the table, on 256 images."""
    out = tmp_path / "out"
    command = [sys.executable, str(SCRIPT), "--tiny", "--budget_seconds", "25",
               "--data_dir", str(shared_data / "cifar10"), "--output_dir", str(out)]  # fmt: skip
    result = subprocess.run(
        command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
        timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]

    summary = json.loads((out / "summary.json").read_text())
    rows = summary["rows"]
    assert [row["run"] for row in rows] == ["SGD", "SAM", "Lookbehind-SAM"]
    assert summary["train_examples"] == 256 and summary["corrupted_examples"] == round(0.4 * 256)
    assert set(summary["probes"]) == {"SGD", "SAM", "Lookbehind-SAM"}
    unit = rows[0]["epochs"] // 2
    assert [row["epochs"] for row in rows] == [2 * unit, 3 * unit, 2 * unit]
    sgd, sam, lookbehind = (row["gradient_computations"] for row in rows)
    assert sam == lookbehind == 3 * sgd  # SAM gets Lookbehind-SAM's gradient computations
    assert not [p for p in out.rglob("*") if p.is_file() and p.stat().st_size > 1_000_000]
    for row in rows:
        run_dir = out / row["run"].lower()
        written = json.loads((run_dir / "all_results.json").read_text())
        for key in ("eval_accuracy", "noise_fitted", "clean_train_accuracy",
                    "gradient_computations", "train_seconds_per_epoch"):  # fmt: skip
            assert row[key] == written[key]
        assert 0.0 <= row["eval_accuracy"] <= 1.0
        assert 0.0 <= row["noise_fitted"] <= 1.0 and 0.0 <= row["clean_train_accuracy"] <= 1.0
        assert row["time_vs_first"] == pytest.approx(
            row["train_seconds_per_epoch"] / rows[0]["train_seconds_per_epoch"]
        )
        history = json.loads((run_dir / "trainer_state.json").read_text())["log_history"]
        assert row["epochs"] == sum("noise_fitted" in entry for entry in history)
        noise = json.loads((run_dir / "label_noise.json").read_text())
        assert noise["label_noise"] == 0.4 and noise["corrupted_examples"] == 102

    table = (out / "summary.md").read_text().splitlines()
    assert table[0] == HEADER
    assert len(table) == 2 + 3
    for line, row in zip(table[2:], rows):
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert len(cells) == 8
        assert cells[0] == row["run"] and cells[1] == str(row["epochs"])
        assert float(cells[3]) == pytest.approx(100 * row["noise_fitted"], abs=0.005)
        assert cells[5] == str(row["gradient_computations"])
    assert table[2].endswith("| 1.00 |")  # SGD against itself
    assert "\n".join(table) in result.stdout
