"""Accuracy per gradient computation (the paper's Table 10, Sec. A.9): compare methods at equal
compute rather than at equal steps.

``LookbehindTrainer`` writes the count into every entry of the Trainer's ``log_history``
(``trainer_state.json``): ``gradient_computations``, or ``eval_gradient_computations`` in an
evaluation's entry (a metric ``<prefix>_x`` is read with ``<prefix>_gradient_computations``
where the entry has it): the forward/backward passes over
the global batch so far (SGD 1 per step, SAM 2, Multistep-SAM and same-batch Lookbehind k + 1,
Lookbehind with minibatch switching 2; the micro-batches of gradient accumulation count as one
pass). A metric's curve is then its evaluations against that count, and Table 10's number is the
count at which a run first reaches a reference run's best value, as a fraction of the count the
reference needed for it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

GRADIENT_COMPUTATIONS = "gradient_computations"


@dataclass
class ComputeCurve:
    """One metric over training: ``values[i]`` was measured after ``gradient_computations[i]``
    forward/backward passes."""

    gradient_computations: list[int]
    values: list[float]


def metric_against_computations(
    log_history: Iterable[Mapping[str, Any]], metric: str = "eval_accuracy"
) -> ComputeCurve:
    """The entries of ``log_history`` that logged ``metric`` with a finite value, against their
    ``gradient_computations``. Raises ``ValueError`` if ``metric`` was never logged, or was logged
    without the count (a run of a Trainer that does not log it)."""
    curve = ComputeCurve(gradient_computations=[], values=[])
    logged: set[str] = set()
    for entry in log_history:
        logged.update(entry)
        value = entry.get(metric)
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            continue
        count = entry.get(f"{metric.partition('_')[0]}_{GRADIENT_COMPUTATIONS}")
        count = entry.get(GRADIENT_COMPUTATIONS) if count is None else count
        if not isinstance(count, int):
            raise ValueError(
                f"the entry that logged {metric} at step {entry.get('step')} has no "
                f"{GRADIENT_COMPUTATIONS!r}; only LookbehindTrainer runs log the count"
            )
        curve.gradient_computations.append(count)
        curve.values.append(float(value))
    if not curve.values:
        raise ValueError(f"{metric!r} was never logged; the log has {sorted(logged)}")
    return curve


def computations_to_reach(
    curve: ComputeCurve, target: float, *, greater_is_better: bool = True
) -> int | None:
    """The first count at which ``curve`` reaches ``target`` (at least it, or at most it when
    lower is better); ``None`` if it never does."""
    for count, value in zip(curve.gradient_computations, curve.values):
        if (value >= target) if greater_is_better else (value <= target):
            return count
    return None


@dataclass
class RunAtTarget:
    """Where one run reached the target: ``computations`` (``None``: never) and their
    ``fraction`` of the reference's."""

    computations: int | None
    fraction: float | None


@dataclass
class EqualPerformanceComparison:
    """Table 10: the gradient computations each run needed to reach ``target`` (the reference's
    best ``metric`` unless given), as a fraction of ``reference_computations``."""

    metric: str
    reference: str
    target: float
    reference_computations: int
    greater_is_better: bool
    runs: dict[str, RunAtTarget] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def compare_at_equal_performance(
    curves: Mapping[str, ComputeCurve],
    reference: str,
    *,
    metric: str = "eval_accuracy",
    target: float | None = None,
    greater_is_better: bool = True,
) -> EqualPerformanceComparison:
    """For each run of ``curves``: the first count at which it reaches ``target`` (default: the
    best value of the ``reference`` run) and that count divided by the count at which the
    reference first reached it. The reference's own fraction is 1."""
    if reference not in curves:
        raise ValueError(f"reference run {reference!r} is not among the runs {list(curves)}")
    reference_curve = curves[reference]
    if target is None:
        target = (max if greater_is_better else min)(reference_curve.values)
    reference_computations = computations_to_reach(
        reference_curve, target, greater_is_better=greater_is_better
    )
    if reference_computations is None:
        best = (max if greater_is_better else min)(reference_curve.values)
        raise ValueError(
            f"the reference run {reference!r} never reached {metric} = {target} (its best: {best})"
        )
    if reference_computations <= 0:
        raise ValueError(
            f"the reference run {reference!r} reached {metric} = {target} before any gradient "
            "computation; pick a target it reaches by training"
        )
    comparison = EqualPerformanceComparison(
        metric=metric,
        reference=reference,
        target=target,
        reference_computations=reference_computations,
        greater_is_better=greater_is_better,
    )
    for label, curve in curves.items():
        count = computations_to_reach(curve, target, greater_is_better=greater_is_better)
        fraction = None if count is None else count / reference_computations
        comparison.runs[label] = RunAtTarget(computations=count, fraction=fraction)
    return comparison


def compute_curves_to_dict(curves: Mapping[str, ComputeCurve]) -> dict[str, Any]:
    """``{run: {"gradient_computations", "values"}}``, for JSON."""
    return {label: asdict(curve) for label, curve in curves.items()}
