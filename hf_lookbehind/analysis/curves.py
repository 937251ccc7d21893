"""Training curves from a Trainer output directory and the loss-sharpness trade-off.

``trainer_state.json`` (written by ``transformers.Trainer`` at every checkpoint and at the end of
``train()``) holds ``log_history``: one dict per logging or evaluation event, with ``step`` and
whichever metrics that event logged. ``LookbehindTrainer`` adds ``lookbehind_alpha`` (Figure 10
of the paper for adaptive alpha), ``ascent_grad_norm`` and ``perturbation_distance``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .sharpness import SharpnessResult

TRAINER_STATE = "trainer_state.json"
CURVE_KEYS = (
    "lookbehind_alpha",
    "loss",
    "eval_loss",
    "eval_accuracy",
    "ascent_grad_norm",
    "perturbation_distance",
)


@dataclass
class Curve:
    """One logged metric over training: ``values[i]`` was logged at ``steps[i]``."""

    steps: list[int]
    values: list[float]


def trainer_state_path(run: str | Path) -> Path:
    """``run`` itself if it is a file, else ``run/trainer_state.json``, else the one of the
    latest ``run/checkpoint-<step>``."""
    run = Path(run)
    if run.is_file():
        return run
    if (run / TRAINER_STATE).is_file():
        return run / TRAINER_STATE
    checkpoints = [
        path.parent
        for path in run.glob(f"checkpoint-*/{TRAINER_STATE}")
        if path.parent.name.removeprefix("checkpoint-").isdigit()
    ]
    if not checkpoints:
        raise FileNotFoundError(
            f"no {TRAINER_STATE} in {run} or in a checkpoint-<step> folder inside it"
        )
    latest = max(checkpoints, key=lambda path: int(path.name.removeprefix("checkpoint-")))
    return latest / TRAINER_STATE


def load_log_history(run: str | Path) -> list[dict[str, Any]]:
    """The ``log_history`` of a Trainer run (output directory or ``trainer_state.json``)."""
    path = trainer_state_path(run)
    state = json.loads(path.read_text())
    if "log_history" not in state:
        raise ValueError(f"{path} has no 'log_history'; is it a Trainer state file?")
    return state["log_history"]


def training_curves(
    log_history: Iterable[Mapping[str, Any]], keys: Sequence[str] = CURVE_KEYS
) -> dict[str, Curve]:
    """The curve of every key of ``keys`` that the history logged (at least once) with a finite
    value; keys it never logged are absent from the result."""
    curves: dict[str, Curve] = {}
    for entry in log_history:
        for key in keys:
            value = entry.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                curve = curves.setdefault(key, Curve(steps=[], values=[]))
                curve.steps.append(int(entry.get("step", len(curve.steps))))
                curve.values.append(float(value))
    return {key: curves[key] for key in keys if key in curves}


def curves_to_dict(curves: Mapping[str, Mapping[str, Curve]]) -> dict[str, Any]:
    """``{run: {key: {"steps", "values"}}}``, for JSON."""
    return {run: {key: asdict(c) for key, c in by_key.items()} for run, by_key in curves.items()}


@dataclass
class TradeoffPoint:
    """One run of the loss-sharpness trade-off (Figure 1 of the paper)."""

    label: str
    sharpness: float
    value: float


def tradeoff_points(
    sharpness: Mapping[str, SharpnessResult], radius: float, values: Mapping[str, float]
) -> list[TradeoffPoint]:
    """One point per run: its m-sharpness at ``radius`` against ``values[run]`` (a loss or an
    accuracy), in the order of ``sharpness``."""
    missing = sorted(set(sharpness) ^ set(values))
    if missing:
        raise ValueError(f"runs without both a sharpness and a value: {missing}")
    points = []
    for label, result in sharpness.items():
        index = next(
            (i for i, r in enumerate(result.radii) if math.isclose(r, radius, rel_tol=1e-9)), None
        )
        if index is None:
            raise ValueError(f"{label}: sharpness measured at radii {result.radii}, not {radius}")
        points.append(TradeoffPoint(label, result.mean[index], float(values[label])))
    return points
