"""The alpha x k sweep (Figure 7): launching runs, collecting them, the heatmap vs a baseline."""

from __future__ import annotations

import json
import math
import shlex
import subprocess
import sys

import numpy as np
import pytest

from hf_lookbehind.analysis import collect_sweep, launch_sweep, plot_sweep_heatmap
from hf_lookbehind.analysis.cli import sweep_main

# A stand-in for a recipe: writes all_results.json with an accuracy made from alpha and k, and
# records the extra arguments and every launch.
FAKE_RECIPE = (
    "import json, pathlib, sys\n"
    "alpha, k, out, *extra = sys.argv[1:]\n"
    "out = pathlib.Path(out); out.mkdir(parents=True)\n"
    "accuracy = 0.9 + 0.01 * int(k) - 0.1 * float(alpha)\n"
    "(out / 'all_results.json').write_text(json.dumps({'eval_accuracy': accuracy}))\n"
    "(out / 'extra.json').write_text(json.dumps(extra))\n"
    "with open(out.parent / 'launches.txt', 'a') as log: log.write(out.name + '\\n')\n"
)
TEMPLATE = (
    f"{shlex.quote(sys.executable)} -c {shlex.quote(FAKE_RECIPE)} {{alpha}} {{k}} {{output_dir}}"
)


def accuracy(alpha: str, k: int) -> float:
    return 0.9 + 0.01 * k - 0.1 * float(alpha)


def write_results(directory, **results) -> None:
    directory.mkdir(parents=True)
    (directory / "all_results.json").write_text(json.dumps(results))


def test_launch_runs_each_cell_once_then_collect_relative_to_baseline(tmp_path):
    root = tmp_path / "sweep"
    run_dirs = launch_sweep(
        ["0.5", "0.8"], [2, 5], root, template=TEMPLATE, extra_args=["--seed", "1"], progress=False
    )
    assert [d.name for d in run_dirs] == [
        "alpha_0.5-k_2",
        "alpha_0.5-k_5",
        "alpha_0.8-k_2",
        "alpha_0.8-k_5",
    ]
    assert json.loads((run_dirs[0] / "extra.json").read_text()) == ["--seed", "1"]
    launch_sweep(["0.5", "0.8"], [2, 5, 10], root, template=TEMPLATE, progress=False)
    launches = (root / "launches.txt").read_text().split()
    assert sorted(launches) == sorted(
        [d.name for d in run_dirs] + ["alpha_0.5-k_10", "alpha_0.8-k_10"]
    )

    write_results(tmp_path / "sam", eval_accuracy=0.93)
    grid = collect_sweep(root, baseline_dir=tmp_path / "sam")
    assert grid.alphas == ["0.5", "0.8"] and grid.ks == [2, 5, 10]
    expected = [[accuracy(a, k) for k in (2, 5, 10)] for a in ("0.5", "0.8")]
    np.testing.assert_allclose(grid.values, expected)
    assert grid.baseline == 0.93
    relative = grid.relative()
    np.testing.assert_allclose(relative, [[v - 0.93 for v in row] for row in expected])

    figure = plot_sweep_heatmap(grid, tmp_path / "heatmap.png")
    assert (tmp_path / "heatmap.png").stat().st_size > 0
    heatmap = figure.axes[0]
    np.testing.assert_allclose(heatmap.images[0].get_array().tolist(), relative)
    assert [t.get_text() for t in heatmap.get_yticklabels()] == ["0.5", "0.8"]
    assert [t.get_text() for t in heatmap.get_xticklabels()] == ["2", "5", "10"]
    assert f"{relative[0][0]:+.4f}" in [text.get_text() for text in heatmap.texts]


def test_collect_finished_runs_with_missing_cells_and_named_alphas(tmp_path):
    write_results(tmp_path / "alpha_0.8-k_2", eval_accuracy=0.91)
    write_results(tmp_path / "alpha_0.2-k_5", eval_accuracy=0.92)
    write_results(tmp_path / "alpha_adaptive-k_2", eval_accuracy=0.95)
    (tmp_path / "alpha_0.2-k_2").mkdir()  # still running
    write_results(tmp_path / "unrelated", eval_accuracy=0.1)
    grid = collect_sweep(tmp_path)
    assert grid.alphas == ["0.2", "0.8", "adaptive"] and grid.ks == [2, 5]
    assert grid.values == [[None, 0.92], [0.91, None], [0.95, None]]
    assert grid.baseline is None
    with pytest.raises(ValueError, match="no baseline"):
        grid.relative()
    figure = plot_sweep_heatmap(grid, tmp_path / "absolute.png")
    cells = figure.axes[0].images[0].get_array().filled(math.nan).tolist()
    assert cells[1][0] == 0.91 and math.isnan(cells[0][0])


def test_errors_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="no alpha_<alpha>-k_<k> run directories"):
        collect_sweep(tmp_path)
    with pytest.raises(ValueError, match=r"must contain \{output_dir\}"):
        launch_sweep(["0.5"], [2], tmp_path, template="python run.py {alpha} {k}")
    failing = (
        f"{shlex.quote(sys.executable)} -c 'raise SystemExit(3)' {{alpha}} {{k}} {{output_dir}}"
    )
    with pytest.raises(subprocess.CalledProcessError):
        launch_sweep(["0.5"], [2], tmp_path, template=failing, progress=False)
    write_results(tmp_path / "alpha_0.5-k_2", train_loss=0.1)
    with pytest.raises(KeyError, match="has no 'eval_accuracy'"):
        collect_sweep(tmp_path)


def test_sweep_command_line_passes_extra_arguments(tmp_path):
    write_results(tmp_path / "base", eval_accuracy=0.9)
    root = tmp_path / "grid"
    sweep_main(
        ["--output_root", str(root), "--alphas", "0.5", "--ks", "2", "3", "--template", TEMPLATE,
         "--baseline_dir", str(tmp_path / "base"), "--", "--num_train_epochs", "1"]
    )  # fmt: skip
    expected = [[accuracy("0.5", 2), accuracy("0.5", 3)]]
    assert json.loads((root / "alpha_0.5-k_3" / "extra.json").read_text()) == [
        "--num_train_epochs",
        "1",
    ]
    written = json.loads((root / "sweep.json").read_text())
    assert written["alphas"] == ["0.5"] and written["ks"] == [2, 3] and written["baseline"] == 0.9
    np.testing.assert_allclose(written["values"], expected)
    np.testing.assert_allclose(written["relative"], [[v - 0.9 for v in expected[0]]])
    assert (root / "sweep.png").is_file()
    (root / "sweep.json").unlink()
    sweep_main(["--output_root", str(root), "--collect_only"])
    collected = json.loads((root / "sweep.json").read_text())
    assert collected["values"] == written["values"] and "relative" not in collected
    with pytest.raises(SystemExit):  # launching needs the command of a run
        sweep_main(["--output_root", str(tmp_path / "other"), "--alphas", "0.5", "--ks", "2"])
    assert not (tmp_path / "other").exists()
