"""The paper's analysis figures, drawn with matplotlib's object-oriented API (``Figure`` and
the Agg renderer, imported on first use; pyplot and the global backend are never touched).

Every function saves a PNG to ``path`` and returns the ``Figure`` so that callers and tests can
read back the plotted series. Axis labels are words, not log keys (:func:`readable`); a run keeps
one colour in every panel of a figure; counts (steps, gradient computations) get integer ticks;
the PNG is cropped to what was drawn, labels and legends included.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .compute import ComputeCurve, EqualPerformanceComparison
from .curves import Curve, TradeoffPoint
from .noise import NoiseRobustnessResult
from .sharpness import SharpnessResult
from .sweep import SweepGrid

if TYPE_CHECKING:
    from matplotlib.figure import Figure

DPI = 100
CURVE_TITLES = {
    "lookbehind_alpha": "alpha",
    "loss": "training loss",
    "eval_loss": "eval loss",
    "eval_accuracy": "eval accuracy",
    "ascent_grad_norm": "ascent gradient norm",
    "perturbation_distance": "perturbation distance",
}
LABELS = {
    **CURVE_TITLES,
    "base_loss": "loss L(w) on the sharpness minibatches",
    "train_loss": "training loss (mean over training)",
    "eval_top1": "eval top-1 accuracy",
    "eval_top5": "eval top-5 accuracy",
    "eval_bleu": "eval BLEU",
    "test_bleu": "test BLEU",
    "gradient_computations": "gradient computations",
}


def readable(key: str) -> str:
    """The words for a logged key: ``eval_accuracy`` -> ``eval accuracy``."""
    return LABELS.get(key, key.replace("_", " "))


def _colours(labels: Sequence[str]) -> dict[str, str]:
    """One colour per run, in order, from matplotlib's default cycle."""
    from matplotlib import rcParams

    cycle = rcParams["axes.prop_cycle"].by_key()["color"]
    return {label: cycle[index % len(cycle)] for index, label in enumerate(labels)}


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _figure(width: float, height: float) -> Figure:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=DPI, layout="constrained")


def _save(figure: Figure, path: str | Path) -> Figure:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.1)
    return figure


def _line_with_band(axes, x, mean, std, label: str) -> None:
    (line,) = axes.plot(x, mean, marker="o", markersize=3, label=label)
    low = [m - s for m, s in zip(mean, std)]
    high = [m + s for m, s in zip(mean, std)]
    axes.fill_between(x, low, high, color=line.get_color(), alpha=0.2, linewidth=0)


def plot_sharpness(results: Mapping[str, SharpnessResult], path: str | Path) -> Figure:
    """Figure 3 style: m-sharpness against the radius r, one line per model (band: +- std over
    minibatches)."""
    figure = _figure(5, 3.5)
    axes = figure.add_subplot()
    for label, result in results.items():
        _line_with_band(axes, result.radii, result.mean, result.std, label)
    equations = {result.neighbourhood for result in results.values()}
    name = {"sam": "eq. 5", "asam": "eq. 6 (ASAM)"}
    axes.set_xlabel("radius r")
    axes.set_ylabel(f"m-sharpness ({', '.join(name[e] for e in sorted(equations))})")
    axes.legend()
    return _save(figure, path)


def plot_noise_robustness(results: Mapping[str, NoiseRobustnessResult], path: str | Path) -> Figure:
    """Figure 4 style: accuracy against the noise level sigma, one line per model (band: +- std
    over noise draws)."""
    figure = _figure(5, 3.5)
    axes = figure.add_subplot()
    for label, result in results.items():
        _line_with_band(axes, result.sigmas, result.accuracy_mean, result.accuracy_std, label)
    axes.set_xlabel(r"noise level $\sigma$  ($w \leftarrow w \cdot \mathcal{N}(1, \sigma^2)$)")
    axes.set_ylabel("accuracy")
    axes.legend()
    return _save(figure, path)


def plot_training_curves(runs: Mapping[str, Mapping[str, Curve]], path: str | Path) -> Figure:
    """One panel per logged metric (alpha over training is Figure 10), one line per run in the
    same colour in every panel, and one legend for the figure."""
    keys = [key for key in CURVE_TITLES if any(key in curves for curves in runs.values())]
    keys += sorted({key for curves in runs.values() for key in curves} - set(keys))
    if not keys:
        raise ValueError("none of the runs logged a metric to plot")
    colours = _colours(list(runs))
    columns = min(3, len(keys))
    rows = math.ceil(len(keys) / columns)
    figure = _figure(4 * columns, 3 * rows + 0.4)
    for index, key in enumerate(keys):
        axes = figure.add_subplot(rows, columns, index + 1)
        for label, curves in runs.items():
            if key in curves:
                curve = curves[key]
                axes.plot(
                    curve.steps,
                    curve.values,
                    label=label,
                    color=colours[label],
                    marker="o" if len(curve.steps) <= 30 else None,  # few points: show each
                    markersize=3,
                )
        axes.set_title(readable(key))
        axes.set_xlabel("training step")
        axes.set_ylabel(readable(key))
        _integer_ticks(axes.xaxis)
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=colours[label], label=label) for label in runs]
    figure.legend(handles=handles, loc="outside upper center", ncols=min(len(runs), 4))
    return _save(figure, path)


def plot_metric_against_computations(
    curves: Mapping[str, ComputeCurve],
    path: str | Path,
    *,
    metric: str = "eval_accuracy",
    comparison: EqualPerformanceComparison | None = None,
) -> Figure:
    """Table 10 as a figure: ``metric`` against the gradient computations, one line per run.
    With a ``comparison``, a dashed line marks its target, a cross the first point at which each
    run reaches it, and the legend gives that count as a fraction of the reference's."""
    figure = _figure(6, 4)
    axes = figure.add_subplot()
    for label, curve in curves.items():
        name = label
        reached = comparison.runs.get(label) if comparison is not None else None
        if reached is not None and reached.fraction is not None:
            name = f"{label} ({reached.fraction:.0%} of {comparison.reference})"
        elif reached is not None:
            name = f"{label} (never reaches {comparison.target:.4g})"
        (line,) = axes.plot(
            curve.gradient_computations, curve.values, marker="o", markersize=3, label=name
        )
        if reached is not None and reached.computations is not None:
            axes.plot(
                [reached.computations],
                [curve.values[curve.gradient_computations.index(reached.computations)]],
                marker="x",
                markersize=10,
                color=line.get_color(),
                linestyle="none",
            )
    if comparison is not None:
        axes.axhline(comparison.target, color="grey", linestyle="--", linewidth=1)
    axes.set_xlabel("gradient computations (forward/backward passes over the batch)")
    axes.set_ylabel(readable(metric))
    _integer_ticks(axes.xaxis)
    axes.legend(fontsize="small")
    return _save(figure, path)


def plot_tradeoff(
    points: Sequence[TradeoffPoint], path: str | Path, *, xlabel: str, ylabel: str
) -> Figure:
    """Figure 1 style: one labelled point per run, x = sharpness, y = loss or accuracy. Each
    label sits on the side of its point that faces the middle of the plot, inside the axes."""
    figure = _figure(5, 4)
    axes = figure.add_subplot()
    xs, ys = [p.sharpness for p in points], [p.value for p in points]
    axes.scatter(xs, ys)
    axes.margins(x=0.2, y=0.15)
    middle = (min(xs) + max(xs)) / 2 if points else 0.0
    for point in points:
        right = point.sharpness <= middle
        axes.annotate(
            point.label,
            (point.sharpness, point.value),
            xytext=(5 if right else -5, 5),
            textcoords="offset points",
            ha="left" if right else "right",
        )
    axes.set_xlabel(xlabel)
    axes.set_ylabel(ylabel)
    return _save(figure, path)


def plot_sweep_heatmap(grid: SweepGrid, path: str | Path) -> Figure:
    """Figure 7 style: alpha (rows) x k (columns); the difference to the baseline when the grid
    has one (diverging colours centred on 0), else the values themselves. Missing runs are
    blank."""
    from matplotlib.colors import TwoSlopeNorm

    relative = grid.baseline is not None
    cells = grid.relative() if relative else grid.values
    data = [[math.nan if v is None else v for v in row] for row in cells]
    finite = [v for row in data for v in row if math.isfinite(v)]
    figure = _figure(1.2 * len(grid.ks) + 2.5, 0.8 * len(grid.alphas) + 1.5)
    axes = figure.add_subplot()
    if relative and finite:
        bound = max(abs(v) for v in finite) or 1.0
        image = axes.imshow(
            data, cmap="RdBu", norm=TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)
        )
    else:
        image = axes.imshow(data, cmap="viridis")
    for i, row in enumerate(data):
        for j, value in enumerate(row):
            if not math.isfinite(value):
                axes.text(j, i, "not run", ha="center", va="center", color="grey")
                continue
            red, green, blue, _ = image.cmap(image.norm(value))
            dark = 0.299 * red + 0.587 * green + 0.114 * blue < 0.5
            axes.text(
                j,
                i,
                f"{value:+.4f}" if relative else f"{value:.4f}",
                ha="center",
                va="center",
                fontsize="small",
                color="white" if dark else "black",
            )
    axes.set_xticks(range(len(grid.ks)), [str(k) for k in grid.ks])
    axes.set_yticks(range(len(grid.alphas)), grid.alphas)
    axes.set_xlabel("k (fast steps per slow step)")
    axes.set_ylabel("alpha (slow-weight step size)")
    name = readable(grid.metric)
    if relative:
        axes.set_title(f"{name} minus the baseline's ({grid.baseline:.4f})")
        bar_label = f"{name} - baseline"
    else:
        axes.set_title(name)
        bar_label = name
    figure.colorbar(image, ax=axes, label=bar_label)
    return _save(figure, path)
