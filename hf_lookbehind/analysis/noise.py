"""Robustness to noisy weights (Sec. 4.4 of the Lookbehind paper, after Joshi et al. 2020).

For every ``sigma`` of a grid and every noise draw ``d``::

    w <- w * delta,  delta ~ N(1, sigma^2)   (element-wise, every parameter)
    recompute the BatchNorm statistics on training batches (running statistics reset, then the
        cumulative average over ``calibration_batches`` minibatches: ``momentum=None``)
    evaluate

and report the mean and standard deviation of the accuracy over the draws. Draw ``d`` uses the
standard normal sample ``u_d`` (seeded by ``seed + d``) for every ``sigma``, ``delta = 1 +
sigma u_d`` (common random numbers: the curves are smooth in ``sigma`` and a value does not
depend on the rest of the grid). ``sigma = 0`` is the clean model itself, evaluated without
recalibration, so it reproduces the clean accuracy exactly. The model passed in is never
modified: the noise is applied to a copy.
"""

from __future__ import annotations

import copy
import itertools
import math
import statistics
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import update_bn
from tqdm.auto import tqdm

from .classifier import (
    LogitsOf,
    LossFn,
    eval_mode,
    evaluate,
    model_device,
    split_batch,
    to_device,
)


@dataclass
class NoiseRobustnessResult:
    """Accuracy and loss under multiplicative weight noise, per ``sigma`` (mean, std over
    draws; ``per_draw_accuracy[i][d]`` for ``sigmas[i]`` and draw ``d``)."""

    sigmas: list[float]
    accuracy_mean: list[float]
    accuracy_std: list[float]
    loss_mean: list[float]
    loss_std: list[float]
    per_draw_accuracy: list[list[float]]
    clean_accuracy: float
    clean_loss: float
    draws: int
    calibration_batches: int
    seed: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> NoiseRobustnessResult:
        return cls(**data)


def recalibrate_batchnorm(
    model: nn.Module, batches: Iterable[Any], num_batches: int | None = None
) -> None:
    """Reset the BatchNorm running statistics of ``model`` and recompute them as the cumulative
    average over ``num_batches`` minibatches (``torch.optim.swa_utils.update_bn``; labels are
    ignored; the forward passes run in train mode, so dropout is active as in training). A model
    without BatchNorm is left as it is; every module keeps its train/eval mode."""
    device = model_device(model)
    inputs = (to_device(split_batch(batch)[0], device) for batch in batches)
    with torch.no_grad(), eval_mode(model):
        update_bn(itertools.islice(inputs, num_batches), LogitsOf(model))


def add_weight_noise_(model: nn.Module, sigma: float, generator: torch.Generator) -> None:
    """``w <- w * (1 + sigma u)``, ``u ~ N(0, 1)`` drawn from ``generator`` (on the CPU, so a
    seed gives the same noise on every device), for every parameter of ``model``."""
    with torch.no_grad():
        for p in model.parameters():
            noise = torch.randn(p.shape, generator=generator, dtype=torch.float32)
            p.mul_(noise.to(device=p.device, dtype=p.dtype).mul_(sigma).add_(1.0))


def _check_arguments(sigmas, draws, calibration_batches) -> None:
    if not sigmas:
        raise ValueError("sigmas must hold at least one noise level")
    if any(not (isinstance(s, (int, float)) and 0.0 <= s < math.inf) for s in sigmas):
        raise ValueError(f"sigmas must be finite numbers >= 0, got {list(sigmas)}")
    for name, value in (("draws", draws), ("calibration_batches", calibration_batches)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")


def noisy_weight_robustness(
    model: nn.Module,
    eval_batches: Iterable[Any],
    calibration_batches: Iterable[Any],
    sigmas: Sequence[float],
    *,
    draws: int = 5,
    num_calibration_batches: int = 50,
    seed: int = 0,
    loss_fn: LossFn = F.cross_entropy,
    progress: bool = True,
) -> NoiseRobustnessResult:
    """Accuracy of ``model`` with noisy weights ``w * N(1, sigma^2)`` for each of ``sigmas``.

    Args:
        model: a classifier (see :mod:`hf_lookbehind.analysis.classifier`); not modified.
        eval_batches: the evaluation minibatches; iterated once per draw, so a ``DataLoader``
            or a list, not an iterator.
        calibration_batches: training minibatches for the BatchNorm statistics (re-iterable).
        sigmas: the noise levels.
        draws: noise draws per ``sigma > 0``.
        num_calibration_batches: minibatches of ``calibration_batches`` per recalibration.
        seed: draw ``d`` uses the noise seeded by ``seed + d``.
        loss_fn: ``loss_fn(logits, labels)``, averaged over the minibatch.
    """
    sigmas = [float(s) for s in sigmas]
    _check_arguments(sigmas, draws, num_calibration_batches)
    clean_loss, clean_accuracy = evaluate(model, eval_batches, loss_fn)
    noisy = copy.deepcopy(model)
    clean_state = model.state_dict()
    accuracies: list[list[float]] = []
    losses: list[list[float]] = []
    noisy_runs = draws * sum(sigma > 0 for sigma in sigmas)
    with tqdm(total=noisy_runs, desc="noisy weights", disable=not progress) as bar:
        for sigma in sigmas:
            if sigma == 0.0:
                accuracies.append([clean_accuracy] * draws)
                losses.append([clean_loss] * draws)
                continue
            sigma_accuracies, sigma_losses = [], []
            for draw in range(draws):
                noisy.load_state_dict(clean_state)
                add_weight_noise_(noisy, sigma, torch.Generator().manual_seed(seed + draw))
                recalibrate_batchnorm(noisy, calibration_batches, num_calibration_batches)
                loss, accuracy = evaluate(noisy, eval_batches, loss_fn)
                sigma_accuracies.append(accuracy)
                sigma_losses.append(loss)
                bar.update()
            accuracies.append(sigma_accuracies)
            losses.append(sigma_losses)
    return NoiseRobustnessResult(
        sigmas=sigmas,
        accuracy_mean=[statistics.fmean(values) for values in accuracies],
        accuracy_std=[statistics.pstdev(values) for values in accuracies],
        loss_mean=[statistics.fmean(values) for values in losses],
        loss_std=[statistics.pstdev(values) for values in losses],
        per_draw_accuracy=accuracies,
        clean_accuracy=clean_accuracy,
        clean_loss=clean_loss,
        draws=draws,
        calibration_batches=num_calibration_batches,
        seed=seed,
    )
