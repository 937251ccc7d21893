"""What a reader of the analysis tools sees: ``--help`` gives every option's default, every
command says what it wrote and sums the result up in one line, and the figures keep a run's
colour across panels, count steps in integers, label their axes and colour bars in words, keep
their labels inside the picture and say when a run never reaches the target."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import ClassLabel, Dataset, Features, Image
from test_analysis_compute import RUNS
from test_analysis_curves import LOG_HISTORY, sharpness_result, write_state

from hf_lookbehind.analysis import (
    SweepGrid,
    arguments,
    cli,
    compare_at_equal_performance,
    metric_against_computations,
    plot_metric_against_computations,
    plot_noise_robustness,
    plot_sharpness,
    plot_sweep_heatmap,
    plot_tradeoff,
    plot_training_curves,
    tradeoff_points,
    training_curves,
)
from hf_lookbehind.analysis.noise import NoiseRobustnessResult

TOOLS = ("sharpness", "noise", "curves", "tradeoff", "sweep", "compute")


def help_entries(text: str) -> dict[str, str]:
    """``--help`` output as ``{option: its whole entry}`` (option line and continuation lines)."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^  (-[-\w]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current is not None and line.startswith("    "):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


@pytest.mark.parametrize("tool", TOOLS)
def test_help_shows_a_default_for_every_option(tool, capsys):
    main = getattr(cli, f"{tool}_main")
    with pytest.raises(SystemExit) as exited:
        main(["--help"])
    assert exited.value.code == 0
    entries = help_entries(capsys.readouterr().out)
    parser = arguments.PARSERS[tool]()
    options = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    assert options
    for action in options:
        entry = re.sub(r"\s+", " ", entries[action.option_strings[0]])
        assert action.help, f"{tool} {action.option_strings[0]} has no help"
        if action.required:
            continue
        assert "default" in entry.lower(), f"{tool}: {entry!r} names no default"
        if action.default is not None:
            assert f"(default: {action.default})" in entry, entry


def test_help_of_the_options_that_had_none(capsys):
    for tool, option, default in [
        ("sharpness", "--radii", "[0.01, 0.02, 0.05, 0.1, 0.2]"),
        ("sharpness", "--batch_size", "128"),
        ("sharpness", "--seed", "0"),
        ("noise", "--sigmas", "[0.0, 0.02, 0.04, 0.06, 0.08, 0.1]"),
        ("noise", "--draws", "5"),
        ("noise", "--batch_size", "256"),
    ]:
        with pytest.raises(SystemExit):
            getattr(cli, f"{tool}_main")(["--help"])
        entry = re.sub(r"\s+", " ", help_entries(capsys.readouterr().out)[option])
        assert f"(default: {default})" in entry
    with pytest.raises(SystemExit):
        cli.tradeoff_main(["--help"])
    assert "--radius" in capsys.readouterr().out


def printed_lines(capsys) -> list[str]:
    return [line for line in capsys.readouterr().out.splitlines() if line.strip()]


def assert_reported(lines: list[str], tool: str, *paths: Path) -> str:
    """The last two lines: ``wrote`` with every path, then ``<tool>: ...``; the summary."""
    wrote, summary = lines[-2:]
    assert wrote.startswith("wrote ")
    for path in paths:
        assert str(path) in wrote and path.is_file()
    assert summary.startswith(f"{tool}: ")
    return summary


def test_curves_tradeoff_compute_and_sweep_report_what_they_wrote(tmp_path, capsys):
    run_a = write_state(tmp_path / "a")
    (run_a / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.61}))
    run_b = write_state(tmp_path / "b", LOG_HISTORY[:2])
    (run_b / "all_results.json").write_text(json.dumps({"eval_accuracy": 0.58}))

    out = tmp_path / "curves"
    cli.curves_main([f"lb={run_a}", f"sam={run_b}", "--output_dir", str(out)])
    summary = assert_reported(
        printed_lines(capsys), "curves", out / "curves.json", out / "curves.png"
    )
    logged = set(training_curves(LOG_HISTORY))
    assert f"{len(logged)} metric(s)" in summary and "2 run(s)" in summary
    last = max(entry["step"] for entry in LOG_HISTORY if set(entry) & logged)
    assert f"lb {last}" in summary

    sharpness = {"lb": sharpness_result([0.1], [0.4], 0.25).to_dict()}
    sharpness["sam"] = sharpness_result([0.1], [0.9], 0.2).to_dict()
    (tmp_path / "sharpness.json").write_text(json.dumps(sharpness))
    out = tmp_path / "tradeoff"
    cli.tradeoff_main(
        ["--sharpness_json", str(tmp_path / "sharpness.json"), "--radius", "0.1",
         "--output_dir", str(out)]
    )  # fmt: skip
    summary = assert_reported(
        printed_lines(capsys), "tradeoff", out / "tradeoff.json", out / "tradeoff.png"
    )
    assert "lb (0.4, 0.25)" in summary and "sam (0.9, 0.2)" in summary

    dirs = {}
    for label, log in RUNS.items():
        dirs[label] = write_state(tmp_path / "compute_runs" / label, log)
    out = tmp_path / "compute"
    cli.compute_main(
        [f"{label}={path}" for label, path in dirs.items()] + ["--output_dir", str(out)]
    )
    summary = assert_reported(
        printed_lines(capsys), "compute", out / "compute.json", out / "compute.png"
    )
    written = json.loads((out / "compute.json").read_text())
    assert f"after {written['reference_computations']} gradient computations" in summary
    for label, run in written["runs"].items():
        shown = "never" if run["fraction"] is None else f"{run['fraction']:.0%}"
        assert f"{label} {shown}" in summary

    root = tmp_path / "sweep"
    for alpha, k, accuracy in [("0.5", 2, 0.91), ("0.8", 2, 0.95), ("0.5", 5, 0.93)]:
        cell = root / f"alpha_{alpha}-k_{k}"
        cell.mkdir(parents=True)
        (cell / "all_results.json").write_text(json.dumps({"eval_accuracy": accuracy}))
    cli.sweep_main(["--output_root", str(root), "--collect_only"])
    summary = assert_reported(
        printed_lines(capsys), "sweep", root / "sweep.json", root / "sweep.png"
    )
    assert "3 of 4 cells finished" in summary and "0.95 at alpha 0.8, k 2" in summary


class TinyNet(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
            torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(4, 3),
        )  # fmt: skip

    def forward(self, x):
        return self.net(x)


def build(path: str) -> torch.nn.Module:
    torch.manual_seed(int(path))
    return TinyNet()


def test_sharpness_and_noise_report_what_they_wrote(tmp_path, capsys):
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(24)]
    features = Features({"img": Image(), "label": ClassLabel(names=["a", "b", "c"])})
    data = Dataset.from_dict({"img": images, "label": [i % 3 for i in range(24)]}, features)
    data.to_parquet(tmp_path / "data.parquet")
    data.to_parquet(tmp_path / "calibration.parquet")
    common = ["--model", "one=1", "--model", "two=2", "--dataset", str(tmp_path / "data.parquet"),
              "--model_factory", f"{__file__}:build", "--device", "cpu"]  # fmt: skip

    out = tmp_path / "sharpness"
    cli.sharpness_main(
        [*common, "--batch_size", "8", "--num_batches", "2", "--radii", "0.01", "0.05",
         "--ascent_steps", "1", "--output_dir", str(out)]
    )  # fmt: skip
    summary = assert_reported(
        printed_lines(capsys), "sharpness", out / "sharpness.json", out / "sharpness.png"
    )
    written = json.loads((out / "sharpness.json").read_text())
    assert "2 model(s) at 2 radii" in summary
    for label in ("one", "two"):
        assert f"{label} {written[label]['mean'][-1]:.4g}" in summary

    out = tmp_path / "noise"
    cli.noise_main(
        [*common, "--calibration_dataset", str(tmp_path / "calibration.parquet"),
         "--calibration_batches", "1", "--calibration_batch_size", "8", "--sigmas", "0", "0.5",
         "--draws", "2", "--output_dir", str(out)]
    )  # fmt: skip
    summary = assert_reported(printed_lines(capsys), "noise", out / "noise.json", out / "noise.png")
    written = json.loads((out / "noise.json").read_text())
    for label in ("one", "two"):
        result = written[label]
        expected = f"{result['clean_accuracy']:.4g} -> {result['accuracy_mean'][-1]:.4g}"
        assert f"{label} {expected}" in summary


def drawn(figure):
    """Draw ``figure`` as it is saved (Agg, the layout done); the renderer."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(figure)
    canvas.draw()
    return canvas.get_renderer()


def axis_labels(figure) -> list[str]:
    labels = []
    for axes in figure.axes:
        labels += [axes.get_xlabel(), axes.get_ylabel()]
    return [label for label in labels if label]


def test_curves_figure_keeps_each_run_in_one_colour_with_integer_steps(tmp_path):
    runs = {
        "adaptive": training_curves(LOG_HISTORY),
        "static": training_curves(LOG_HISTORY[:2]),
        "sam": training_curves(LOG_HISTORY[2:5]),
    }
    figure = plot_training_curves(runs, tmp_path / "curves.png")
    colours: dict[str, set] = {}
    for axes in figure.axes:
        for line in axes.get_lines():
            colours.setdefault(line.get_label(), set()).add(line.get_color())
    assert set(colours) == set(runs)
    assert all(len(seen) == 1 for seen in colours.values()), colours
    assert len({next(iter(seen)) for seen in colours.values()}) == len(runs)  # runs differ
    drawn(figure)
    for axes in figure.axes:
        ticks = axes.get_xticks()
        assert np.array_equal(ticks, np.round(ticks)), (axes.get_title(), ticks)
    assert all("_" not in label for label in axis_labels(figure))
    legend = figure.legends[0]  # one legend for the figure, in the runs' colours
    assert [text.get_text() for text in legend.get_texts()] == list(runs)
    assert [h.get_color() for h in legend.legend_handles] == [
        next(iter(colours[label])) for label in runs
    ]


def test_compute_figure_says_which_run_never_reaches_the_target(tmp_path):
    curves = {label: metric_against_computations(log) for label, log in RUNS.items()}
    comparison = compare_at_equal_performance(curves, "multistep")
    never = [label for label, run in comparison.runs.items() if run.computations is None]
    assert never == ["sgd"]  # RUNS: SGD's best accuracy stays below multistep's best
    figure = plot_metric_against_computations(
        curves, tmp_path / "compute.png", comparison=comparison
    )
    (axes,) = figure.axes
    legend = [text.get_text() for text in axes.get_legend().get_texts()]
    assert legend[list(curves).index("sgd")] == f"sgd (never reaches {comparison.target:.4g})"
    drawn(figure)
    ticks = axes.get_xticks()
    assert np.array_equal(ticks, np.round(ticks))
    assert axes.get_ylabel() == "eval accuracy"


def test_tradeoff_labels_stay_inside_the_axes_and_the_axes_are_in_words(tmp_path):
    sharpness = {
        "Lookbehind-SAM": sharpness_result([0.1], [0.4], 0.25),
        "SAM": sharpness_result([0.1], [0.9], 0.2),
        "SGD": sharpness_result([0.1], [1.3], 0.18),
    }
    points = tradeoff_points(sharpness, 0.1, {k: r.base_loss for k, r in sharpness.items()})
    figure = plot_tradeoff(
        points,
        tmp_path / "t.png",
        xlabel="m-sharpness at r = 0.1",
        ylabel="loss on the minibatches",
    )
    (axes,) = figure.axes
    renderer = drawn(figure)
    frame = axes.get_window_extent(renderer)
    for text in axes.texts:
        box = text.get_window_extent(renderer)
        assert frame.x0 <= box.x0 and box.x1 <= frame.x1, text.get_text()
        assert frame.y0 <= box.y0 and box.y1 <= frame.y1, text.get_text()
    assert "_" not in axes.get_ylabel()


@pytest.mark.parametrize("baseline", [0.93, None])
def test_sweep_colour_bar_is_labelled(tmp_path, baseline):
    grid = SweepGrid(
        alphas=["0.2", "0.5"],
        ks=[2, 5],
        values=[[0.91, 0.92], [0.95, None]],
        metric="eval_accuracy",
        baseline=baseline,
    )
    figure = plot_sweep_heatmap(grid, tmp_path / "sweep.png")
    heatmap, colour_bar = figure.axes
    assert colour_bar.get_ylabel() == ("eval accuracy - baseline" if baseline else "eval accuracy")
    assert all("_" not in label for label in axis_labels(figure))
    assert "not run" in [text.get_text() for text in heatmap.texts]


def test_sharpness_and_noise_figures_label_their_axes_in_words(tmp_path):
    result = sharpness_result([0.05, 0.1], [0.3, 0.9], 0.2)
    figure = plot_sharpness({"a": result}, tmp_path / "s.png")
    assert axis_labels(figure) and all("_" not in label for label in axis_labels(figure))
    noise = NoiseRobustnessResult(
        sigmas=[0.0, 0.1], accuracy_mean=[0.9, 0.8], accuracy_std=[0.0, 0.01],
        loss_mean=[0.3, 0.5], loss_std=[0.0, 0.02], per_draw_accuracy=[[0.9], [0.8]],
        clean_accuracy=0.9, clean_loss=0.3, draws=1, calibration_batches=1, seed=0,
    )  # fmt: skip
    figure = plot_noise_robustness({"a": noise}, tmp_path / "n.png")
    assert axis_labels(figure) and all("_" not in label for label in axis_labels(figure))


def test_the_docs_give_the_statistics_a_cifar_recipe_model_needs():
    """--model_factory models default to ImageNet statistics; docs/analysis.md says so and gives
    the flags of the statistics run_cifar.py trains with (its NORMALIZATIONS)."""
    from helpers import ROOT

    from hf_lookbehind_recipes.cifar_data import NORMALIZATIONS

    parser = arguments.PARSERS["sharpness"]()
    defaults = {
        a.dest: tuple(a.default) for a in parser._actions if a.dest in ("image_mean", "image_std")
    }
    assert (defaults["image_mean"], defaults["image_std"]) == NORMALIZATIONS["imagenet"]
    text = re.sub(r"\s+", " ", (ROOT / "docs" / "analysis.md").read_text())
    mean, std = NORMALIZATIONS["cifar10"]
    flags = f"--image_mean {' '.join(map(str, mean))} --image_std {' '.join(map(str, std))}"
    assert flags in text
    assert "ImageNet statistics" in text and "run_cifar.py" in text
