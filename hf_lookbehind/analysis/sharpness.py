"""m-sharpness (Foret et al. 2021; eq. 5 of the Lookbehind paper) and its ASAM form (eq. 6).

For ``n`` minibatches ``M`` of ``m`` examples and a radius ``r``::

    eq. 5 (SAM):   S(r) = 1/n sum_M  max_{||eps||_2 <= r}        L_M(w + eps) - L_M(w)
    eq. 6 (ASAM):  S(r) = 1/n sum_M  max_{||T_w^-1 eps||_2 <= r}  L_M(w + eps) - L_M(w),
                   T_w = |w| + eta   (element-wise, Kwon et al. 2021)

The inner maximum is approximated by projected normalised gradient ascent on ``delta``, with
``eps = T_w delta`` (``T_w = 1`` for SAM) so that both neighbourhoods are the ball
``||delta||_2 <= r``::

    delta_0 = 0
    g_t     = grad L_M(w + T delta_{t-1})
    delta_t = Proj_r(delta_{t-1} + step_size * r * T g_t / ||T g_t||_2)
    max ~= max_{t = 0..ascent_steps} L_M(w + T delta_t)

The first step is exactly the SAM (eq. 3) or ASAM (eq. 4) ascent step, so ``ascent_steps=1``
gives the first-order estimate and more steps can only raise it (the maximum over iterates is
kept). At an exact stationary point (``T g = 0``) the step takes a random direction from a
seeded generator. Every value is a lower bound on the true maximum.

The model is measured in eval mode: BatchNorm normalises with its running statistics and dropout
is off, so ``L_M`` is a deterministic function of the weights. Only trainable parameters are
perturbed; the model's weights and modes are restored on return.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Iterable, Sequence, Sized
from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..engine import asam_param_groups
from ..engine.multi_tensor import global_norm
from .classifier import LossFn, eval_mode, logits_of, model_device, split_batch, to_device

NEIGHBOURHOODS = ("sam", "asam")


@dataclass
class SharpnessResult:
    """m-sharpness per radius: ``mean`` and ``std`` (population) over the minibatches, whose
    values are ``per_batch[radius index][minibatch]``. ``base_loss`` is the mean of ``L_M(w)``,
    ``batch_size`` the largest minibatch (``m``)."""

    radii: list[float]
    mean: list[float]
    std: list[float]
    per_batch: list[list[float]]
    base_loss: float
    neighbourhood: str
    batch_size: int
    num_batches: int
    ascent_steps: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SharpnessResult:
        return cls(**data)


def _check_arguments(radii, neighbourhood, num_batches, ascent_steps, step_size, asam_eta) -> None:
    if neighbourhood not in NEIGHBOURHOODS:
        raise ValueError(f"unknown neighbourhood {neighbourhood!r}; allowed: {NEIGHBOURHOODS}")
    if not radii:
        raise ValueError("radii must hold at least one radius")
    if any(not (isinstance(r, (int, float)) and 0.0 <= r < math.inf) for r in radii):
        raise ValueError(f"radii must be finite numbers >= 0, got {list(radii)}")
    counts = {"ascent_steps": ascent_steps}
    if num_batches is not None:
        counts["num_batches"] = num_batches
    for name, value in counts.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    if not 0.0 < step_size < math.inf:
        raise ValueError(f"step_size must be a finite number > 0 (fraction of r), got {step_size}")
    if not 0.0 <= asam_eta < math.inf:
        raise ValueError(f"asam_eta must be a finite number >= 0, got {asam_eta}")


def _neighbourhood_scales(
    model: nn.Module, neighbourhood: str, asam_eta: float, asam_weights_only: bool
) -> tuple[list[torch.Tensor], list[torch.Tensor | None]]:
    """The trainable parameters and their ``T_w`` (``None`` where ``T_w = 1``)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters to perturb")
    if neighbourhood == "sam":
        return params, [None] * len(params)
    if asam_weights_only:
        scaled = {p for g in asam_param_groups(model) if g["asam_scale"] for p in g["params"]}
    else:
        scaled = set(params)
    return params, [p.detach().abs().add(asam_eta) if p in scaled else None for p in params]


def _place(params, origins, scales, delta) -> None:
    """``w <- w_0 + T delta``."""
    with torch.no_grad():
        for p, origin, scale, step in zip(params, origins, scales, delta, strict=True):
            p.copy_(origin).add_(step if scale is None else scale * step)


def _restore(params, origins) -> None:
    with torch.no_grad():
        torch._foreach_copy_(params, origins)


def _loss_and_gradients(model, params, inputs, labels, loss_fn) -> tuple[float, list]:
    loss = loss_fn(logits_of(model, inputs), labels)
    if not loss.requires_grad:  # the loss does not depend on any parameter
        return loss.item(), [torch.zeros_like(p) for p in params]
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]
    return loss.item(), grads


@dataclass
class _ProjectedAscent:
    """The inner maximisation of eq. 5/6 on one minibatch (see the module docstring)."""

    params: list[torch.Tensor]
    origins: list[torch.Tensor]
    scales: list[torch.Tensor | None]
    loss_fn: LossFn
    steps: int
    step_size: float
    generator: torch.Generator

    def _random_direction(self) -> list[torch.Tensor]:
        return [
            torch.randn(p.shape, generator=self.generator, dtype=p.dtype).to(p.device)
            for p in self.params
        ]

    def sharpness(self, model, inputs, labels, radius: float, base_loss: float) -> float:
        """``max_t L(w + T delta_t) - L(w)``; the weights are back at ``w`` on return."""
        delta = [torch.zeros_like(p) for p in self.params]
        best_loss = base_loss
        try:
            for _ in range(self.steps):
                loss, grads = _loss_and_gradients(model, self.params, inputs, labels, self.loss_fn)
                best_loss = max(best_loss, loss)
                direction = [g if s is None else s * g for g, s in zip(grads, self.scales)]
                norm = global_norm(direction).item()
                if norm == 0.0:
                    direction = self._random_direction()
                    norm = global_norm(direction).item()
                torch._foreach_add_(delta, direction, alpha=self.step_size * radius / norm)
                delta_norm = global_norm(delta).item()
                if delta_norm > radius:
                    torch._foreach_mul_(delta, radius / delta_norm)
                _place(self.params, self.origins, self.scales, delta)
            with torch.no_grad():
                best_loss = max(best_loss, self.loss_fn(logits_of(model, inputs), labels).item())
        finally:
            _restore(self.params, self.origins)
        return best_loss - base_loss


def m_sharpness(
    model: nn.Module,
    batches: Iterable[Any],
    radii: Sequence[float],
    *,
    neighbourhood: str = "sam",
    num_batches: int | None = None,
    ascent_steps: int = 10,
    step_size: float = 1.0,
    asam_eta: float = 0.01,
    asam_weights_only: bool = True,
    loss_fn: LossFn = F.cross_entropy,
    seed: int = 0,
    progress: bool = True,
) -> SharpnessResult:
    """m-sharpness of ``model`` (eq. 5, or eq. 6 with ``neighbourhood="asam"``) per radius.

    Args:
        model: a classifier (see :mod:`hf_lookbehind.analysis.classifier`).
        batches: minibatches of ``m`` examples (a ``DataLoader`` with ``batch_size=m``).
        radii: the radii ``r`` of the neighbourhoods.
        num_batches: ``n``, the number of minibatches to average over (default: all).
        ascent_steps: gradient evaluations of the projected ascent per minibatch and radius.
        step_size: ascent step length as a fraction of ``r``.
        asam_eta: ``eta`` of ``T_w = |w| + eta``.
        asam_weights_only: ASAM rescales only parameters named ``*weight*`` (as the public ASAM
            code and :func:`hf_lookbehind.asam_param_groups`); the others get ``T_w = 1``.
        loss_fn: ``loss_fn(logits, labels)``, averaged over the minibatch.
        seed: seeds the random direction taken at exact stationary points.
    """
    radii = [float(r) for r in radii]
    _check_arguments(radii, neighbourhood, num_batches, ascent_steps, step_size, asam_eta)
    params, scales = _neighbourhood_scales(model, neighbourhood, asam_eta, asam_weights_only)
    ascent = _ProjectedAscent(
        params=params,
        origins=[p.detach().clone() for p in params],
        scales=scales,
        loss_fn=loss_fn,
        steps=ascent_steps,
        step_size=step_size,
        generator=torch.Generator().manual_seed(seed),
    )
    device = model_device(model)
    total = (
        num_batches if num_batches is not None or not isinstance(batches, Sized) else len(batches)
    )
    per_batch: list[list[float]] = [[] for _ in radii]
    base_losses, batch_sizes = [], []
    with eval_mode(model), tqdm(total=total, desc="m-sharpness", disable=not progress) as bar:
        for batch in itertools.islice(batches, num_batches):
            inputs, labels = to_device(split_batch(batch), device)
            batch_sizes.append(labels.shape[0])
            with torch.no_grad():
                base_loss = loss_fn(logits_of(model, inputs), labels).item()
            base_losses.append(base_loss)
            for values, radius in zip(per_batch, radii, strict=True):
                values.append(ascent.sharpness(model, inputs, labels, radius, base_loss))
            bar.update()
    if not base_losses:
        raise ValueError("m_sharpness got no minibatches")
    return SharpnessResult(
        radii=radii,
        mean=[statistics.fmean(values) for values in per_batch],
        std=[statistics.pstdev(values) for values in per_batch],
        per_batch=per_batch,
        base_loss=statistics.fmean(base_losses),
        neighbourhood=neighbourhood,
        batch_size=max(batch_sizes),
        num_batches=len(base_losses),
        ascent_steps=ascent_steps,
    )
