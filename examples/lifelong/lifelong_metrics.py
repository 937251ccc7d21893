"""Lifelong-learning metrics of the paper (Sec. 4.5, after Chaudhry et al. 2018/2019) on the
accuracy matrix ``a[t][tau]``: the test accuracy on task ``tau`` after training task ``t``
(0-based here; every task is evaluated after every task, so the matrix is full).

- average accuracy after the last task T:  (1/T) sum_tau a[T][tau]
- forgetting after the last task T:  (1/(T-1)) sum_{tau < T} max_{t' < T} (a[t'][tau] - a[T][tau])
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from hf_lookbehind_recipes.tables import markdown_table


def average_accuracy(matrix: Sequence[Sequence[float]]) -> float:
    """Mean accuracy over all tasks after the last one (the matrix's last row)."""
    return float(np.mean(np.asarray(matrix, dtype=float)[-1]))


def forgetting(matrix: Sequence[Sequence[float]]) -> float:
    """Mean over the tasks before the last of the largest drop from an earlier row to the last
    row; 0 for a single task."""
    accuracies = np.asarray(matrix, dtype=float)
    last = len(accuracies) - 1
    if last == 0:
        return 0.0
    drops = accuracies[:last, :last].max(axis=0) - accuracies[last, :last]
    return float(drops.mean())


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (numpy's ``std``, ddof = 0) over seeds."""
    return float(np.mean(values)), float(np.std(values))


def summarize_seeds(runs: Sequence[dict]) -> dict[str, float]:
    """Mean ± std over seeds of each run's ``average_accuracy`` and ``forgetting``."""
    summary = {}
    for metric in ("average_accuracy", "forgetting"):
        summary[f"{metric}_mean"], summary[f"{metric}_std"] = mean_and_std(
            [run[metric] for run in runs]
        )
    return summary


def format_table(rows: Sequence[tuple[str, dict]]) -> str:
    """A markdown table: one row per (label, summary), accuracies in percent."""
    header = ("method", "avg. accuracy (%)", "forgetting (%)", "seeds", "wall s / seed",
              "CPU s / seed")  # fmt: skip
    lines = []
    for label, result in rows:
        summary = result["summary"]
        walls = [run["wall_seconds"] for run in result["runs"]]
        cpu = [run.get("cpu_seconds", math.nan) for run in result["runs"]]
        lines.append(
            (
                label,
                f"{100 * summary['average_accuracy_mean']:.2f} ± "
                f"{100 * summary['average_accuracy_std']:.2f}",
                f"{100 * summary['forgetting_mean']:.2f} ± {100 * summary['forgetting_std']:.2f}",
                ", ".join(str(run["seed"]) for run in result["runs"]),
                f"{np.mean(walls):.0f}",
                f"{np.mean(cpu):.0f}",
            )
        )
    return markdown_table(header, lines)


def plot_accuracy_matrix(matrix: Sequence[Sequence[float]], title: str, path: Path) -> None:
    """A heatmap of ``a[t][tau]`` (rows: after training task t; columns: task tau), in %."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    accuracies = 100 * np.asarray(matrix, dtype=float)
    size = max(4.0, 0.35 * len(accuracies) + 2)
    figure, axes = plt.subplots(figsize=(size + 1, size))
    image = axes.imshow(accuracies, vmin=0, vmax=100, cmap="viridis")
    if len(accuracies) <= 10:
        for (row, column), value in np.ndenumerate(accuracies):
            axes.text(column, row, f"{value:.0f}", ha="center", va="center", color="w", fontsize=8)
    axes.set_xlabel("evaluated task τ")
    axes.set_ylabel("after training task t")
    axes.set_title(title)
    figure.colorbar(image, ax=axes, label="test accuracy (%)")
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def load_results(paths: Sequence[str | Path]) -> list[tuple[str, dict]]:
    """(label, results) for each ``results.json`` written by ``run_lifelong.py``."""
    rows = []
    for path in paths:
        result = json.loads(Path(path).read_text())
        rows.append((result["label"], result))
    return rows
