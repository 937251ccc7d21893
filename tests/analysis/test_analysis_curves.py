"""Training curves from trainer_state.json, the loss-sharpness trade-off, and their figures."""

from __future__ import annotations

import json

import pytest
from helpers.trainer_harness import make_trainer

from hf_lookbehind.analysis import (
    SharpnessResult,
    load_log_history,
    plot_tradeoff,
    plot_training_curves,
    tradeoff_points,
    training_curves,
)
from hf_lookbehind.analysis.cli import curves_main, tradeoff_main

# The shape of a Trainer log_history: training logs, evaluation logs, the final summary.
LOG_HISTORY = [
    {"step": 10, "epoch": 0.5, "loss": 2.0, "lookbehind_alpha": 0.9, "ascent_grad_norm": 1.5},
    {"step": 20, "epoch": 1.0, "loss": 1.5, "lookbehind_alpha": 0.7, "ascent_grad_norm": 1.2},
    {"step": 20, "epoch": 1.0, "eval_loss": 1.4, "eval_accuracy": 0.55},
    {"step": 30, "epoch": 1.5, "loss": 1.1, "lookbehind_alpha": 0.6, "ascent_grad_norm": None},
    {"step": 40, "epoch": 2.0, "eval_loss": 1.2, "eval_accuracy": 0.61},
    {"step": 40, "epoch": 2.0, "train_loss": 1.5, "train_runtime": 3.0},
]


def write_state(directory, log_history=LOG_HISTORY):
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "trainer_state.json").write_text(json.dumps({"log_history": log_history}))
    return directory


def test_curves_hold_every_logged_key_and_skip_missing_ones():
    curves = training_curves(LOG_HISTORY)
    assert list(curves) == [
        "lookbehind_alpha",
        "loss",
        "eval_loss",
        "eval_accuracy",
        "ascent_grad_norm",
    ]
    assert curves["lookbehind_alpha"].steps == [10, 20, 30]
    assert curves["lookbehind_alpha"].values == [0.9, 0.7, 0.6]
    assert curves["eval_accuracy"].steps == [20, 40]
    assert curves["eval_accuracy"].values == [0.55, 0.61]
    assert curves["ascent_grad_norm"].steps == [10, 20]  # a null value is not a point
    assert "perturbation_distance" not in curves
    assert training_curves([{"step": 1, "learning_rate": 0.1}]) == {}


def test_log_history_from_output_dir_latest_checkpoint_or_file(tmp_path):
    assert load_log_history(write_state(tmp_path / "run")) == LOG_HISTORY
    write_state(tmp_path / "ckpt" / "checkpoint-9", LOG_HISTORY[:1])
    write_state(tmp_path / "ckpt" / "checkpoint-30", LOG_HISTORY[:3])
    assert load_log_history(tmp_path / "ckpt") == LOG_HISTORY[:3]
    assert load_log_history(tmp_path / "run" / "trainer_state.json") == LOG_HISTORY
    with pytest.raises(FileNotFoundError, match=r"no trainer_state\.json"):
        load_log_history(tmp_path / "empty")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="no 'log_history'"):
        load_log_history(tmp_path / "bad.json")


def test_curves_figure_has_one_panel_per_metric_and_one_line_per_run(tmp_path):
    runs = {"adaptive": training_curves(LOG_HISTORY), "static": training_curves(LOG_HISTORY[:2])}
    figure = plot_training_curves(runs, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0
    panels = {axes.get_title(): axes for axes in figure.axes}
    assert set(panels) == {
        "alpha",
        "training loss",
        "eval loss",
        "eval accuracy",
        "ascent gradient norm",
    }
    alpha_lines = {line.get_label(): line for line in panels["alpha"].get_lines()}
    assert set(alpha_lines) == {"adaptive", "static"}
    assert list(alpha_lines["adaptive"].get_xdata()) == [10, 20, 30]
    assert list(alpha_lines["static"].get_ydata()) == [0.9, 0.7]
    assert [line.get_label() for line in panels["eval accuracy"].get_lines()] == ["adaptive"]


def sharpness_result(radii, mean, base_loss) -> SharpnessResult:
    return SharpnessResult(
        radii=radii,
        mean=mean,
        std=[0.0] * len(radii),
        per_batch=[[m] for m in mean],
        base_loss=base_loss,
        neighbourhood="sam",
        batch_size=8,
        num_batches=1,
        ascent_steps=3,
    )


def test_tradeoff_points_and_figure(tmp_path):
    sharpness = {
        "sam": sharpness_result([0.05, 0.1], [0.3, 0.9], 0.2),
        "lookbehind": sharpness_result([0.05, 0.1], [0.1, 0.4], 0.25),
    }
    points = tradeoff_points(sharpness, 0.1, {"lookbehind": 0.93, "sam": 0.92})
    assert [(p.label, p.sharpness, p.value) for p in points] == [
        ("sam", 0.9, 0.92),
        ("lookbehind", 0.4, 0.93),
    ]
    figure = plot_tradeoff(points, tmp_path / "t.png", xlabel="sharpness", ylabel="accuracy")
    (axes,) = figure.axes
    assert axes.collections[0].get_offsets().tolist() == [[0.9, 0.92], [0.4, 0.93]]
    assert [text.get_text() for text in axes.texts] == ["sam", "lookbehind"]
    assert (tmp_path / "t.png").stat().st_size > 0
    with pytest.raises(ValueError, match=r"radii \[0.05, 0.1\], not 0.2"):
        tradeoff_points(sharpness, 0.2, {"lookbehind": 0.93, "sam": 0.92})
    with pytest.raises(ValueError, match="without both a sharpness and a value: \\['sam'\\]"):
        tradeoff_points(sharpness, 0.1, {"lookbehind": 0.93})


def test_curves_and_tradeoff_command_lines(tmp_path):
    run_a = write_state(tmp_path / "a")
    (run_a / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.61}))
    run_b = write_state(tmp_path / "b", LOG_HISTORY[:2])
    (run_b / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.58}))
    curves_main([f"lb={run_a}", str(run_b), "--output_dir", str(tmp_path / "out")])
    written = json.loads((tmp_path / "out" / "curves.json").read_text())
    assert set(written) == {"lb", "b"}
    assert written["lb"]["lookbehind_alpha"] == {"steps": [10, 20, 30], "values": [0.9, 0.7, 0.6]}
    assert (tmp_path / "out" / "curves.png").is_file()

    sharpness = {
        "lb": sharpness_result([0.1], [0.4], 0.25).to_dict(),
        "b": sharpness_result([0.1], [0.9], 0.2).to_dict(),
    }
    (tmp_path / "sharpness.json").write_text(json.dumps(sharpness))
    common = ["--sharpness_json", str(tmp_path / "sharpness.json"), "--radius", "0.1"]
    tradeoff_main([*common, "--output_dir", str(tmp_path / "loss")])
    assert json.loads((tmp_path / "loss" / "tradeoff.json").read_text()) == [
        {"label": "lb", "sharpness": 0.4, "value": 0.25},
        {"label": "b", "sharpness": 0.9, "value": 0.2},
    ]
    tradeoff_main(
        [
            *common,
            "--metric",
            "eval_accuracy",
            f"--run_dir=lb={run_a}",
            f"--run_dir=b={run_b}",
            "--output_dir",
            str(tmp_path / "acc"),
        ]
    )
    written = json.loads((tmp_path / "acc" / "tradeoff.json").read_text())
    assert written == [
        {"label": "lb", "sharpness": 0.4, "value": 0.61},
        {"label": "b", "sharpness": 0.9, "value": 0.58},
    ]
    assert (tmp_path / "acc" / "tradeoff.png").is_file()


def test_curves_of_a_lookbehind_trainer_run(tmp_path):
    """End to end: the keys LookbehindTrainer logs reach the curves."""
    trainer = make_trainer(tmp_path, lookbehind_adaptive_alpha=True, max_steps=4)
    trainer.train()
    trainer.save_state()
    curves = training_curves(load_log_history(tmp_path))
    logged = [entry for entry in trainer.state.log_history if "lookbehind_alpha" in entry]
    assert curves["lookbehind_alpha"].steps == [1, 2, 3, 4]
    assert curves["lookbehind_alpha"].values == [entry["lookbehind_alpha"] for entry in logged]
    assert all(0.0 < alpha <= 1.0 for alpha in curves["lookbehind_alpha"].values)
    assert curves["loss"].steps == [1, 2, 3, 4]
    assert len(curves["perturbation_distance"].values) == 4
