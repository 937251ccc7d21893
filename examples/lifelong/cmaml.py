"""Continual-MAML outer steps of the Lookbehind-SAM paper (Figure 12): Lookahead-C-MAML
(Algorithm 3, C-MAML of Gupta et al. 2020) and Lookbehind-C-MAML (Algorithm 4).

Both differentiate a meta-loss on ``b_m`` (a replay sample joined to the incoming batch) through
an inner trajectory on the incoming batch's pieces ``b[0..k-1]`` with
``torch.func.functional_call``, so the meta-gradient w.r.t. the initial weights is exact
(second order); ``first_order=True`` drops the inner gradients' dependence on the weights, so the
meta-gradient is the meta-loss gradient at the adapted weights (first-order MAML).

Reading of the pseudo-code (the La-MAML code's C-MAML where the paper is ambiguous):

- Algorithm 3: ``phi_{i+1} = phi_i - eta grad l(phi_i, b[i])`` for i < k, then
  ``phi_0 <- phi_0 - eta grad_{phi_0} L(phi_k(phi_0), b_m)``: the meta-loss is taken at the fast
  weights phi_k and differentiated w.r.t. phi_0 through the inner steps (the printed
  ``L_t(phi_0, b_m)`` would make the inner steps dead code).
- Algorithm 4: the inner loop is Lookbehind's (Algorithm 1) with a new piece per step: the
  perturbed point starts at phi_0 and accumulates the ascent steps,
  ``P_{i+1} = P_i + rho g/||g||`` with ``g = grad l(P_i, b[i])``, and the fast weights descend
  with the gradient there, ``F_{i+1} = F_i - eta grad l(P_{i+1}, b[i])``. The adapted weights
  are ``A(phi_0) = phi_0 + alpha (F_k - phi_0)`` and the meta-objective
  ``M(phi_0) = L(A(phi_0), b_m)``. The outer step is SAM on M:
  ``eps = rho grad M(phi_0) / ||grad M(phi_0)||``, ``phi_0 <- phi_0 - eta grad M(phi_0 + eps)``
  (the trajectory is run again from the perturbed initial weights).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from hf_lookbehind import NORM_EPS

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images, within-task labels, tasks
Params = dict[str, torch.Tensor]

ALGORITHMS = ("lookahead", "lookbehind")


def multitask_loss(model: nn.Module, params: Params, batch: Batch) -> torch.Tensor:
    """Mean cross-entropy of each example under its own task's head."""
    images, labels, tasks = batch
    return F.cross_entropy(functional_call(model, params, (images, tasks)), labels)


def _gradient(loss: torch.Tensor, params: Params, create_graph: bool) -> list[torch.Tensor]:
    """A parameter the loss does not use gets a zero gradient: without momentum or weight
    decay its step is zero, so it keeps its value, as ``torch.optim`` skips it."""
    return list(
        torch.autograd.grad(
            loss,
            list(params.values()),
            create_graph=create_graph,
            allow_unused=True,
            materialize_grads=True,
        )
    )


def _add(params: Params, scale: float | torch.Tensor, direction: list[torch.Tensor]) -> Params:
    return {name: p + scale * d for (name, p), d in zip(params.items(), direction)}


def _global_norm(tensors: list[torch.Tensor]) -> torch.Tensor:
    return torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t) for t in tensors]))


def _ascend(params: Params, rho: float, gradient: list[torch.Tensor]) -> Params:
    """SAM's ascent ``params + rho g / ||g||``; a zero gradient gives a zero step (the
    engine's ``NORM_EPS``)."""
    return _add(params, rho / (_global_norm(gradient) + NORM_EPS), gradient)


def _clamp(gradient: list[torch.Tensor], bound: float | None) -> list[torch.Tensor]:
    """La-MAML's inner-step clipping: every entry clamped to [-bound, bound]."""
    return gradient if bound is None else [g.clamp(-bound, bound) for g in gradient]


def sgd_trajectory(
    model: nn.Module,
    start: Params,
    pieces: list[Batch],
    lr: float,
    create_graph: bool,
    clamp: float | None = None,
) -> Params:
    """Algorithm 3's inner loop: one SGD step per piece at the current fast weights."""
    fast = start
    for piece in pieces:
        gradient = _gradient(multitask_loss(model, fast, piece), fast, create_graph)
        fast = _add(fast, -lr, _clamp(gradient, clamp))
    return fast


def lookbehind_trajectory(
    model: nn.Module,
    start: Params,
    pieces: list[Batch],
    lr: float,
    rho: float,
    alpha: float,
    create_graph: bool,
    clamp: float | None = None,
) -> Params:
    """Algorithm 4's inner loop and interpolation: ``phi_0 + alpha (F_k - phi_0)``."""
    perturbed, fast = start, start
    for piece in pieces:
        ascent = _gradient(multitask_loss(model, perturbed, piece), perturbed, create_graph)
        perturbed = _ascend(perturbed, rho, ascent)
        descent = _gradient(multitask_loss(model, perturbed, piece), perturbed, create_graph)
        fast = _add(fast, -lr, _clamp(descent, clamp))
    return {name: p + alpha * (fast[name] - p) for name, p in start.items()}


def meta_gradient(
    model: nn.Module,
    start: Params,
    pieces: list[Batch],
    meta_batch: Batch,
    *,
    algorithm: str,
    lr: float,
    rho: float,
    alpha: float,
    first_order: bool,
    grad_clip: float | None = None,
) -> list[torch.Tensor]:
    """``grad_{phi_0} L(adapted(phi_0), b_m)`` at ``start``."""
    start = {name: p.detach().requires_grad_() for name, p in start.items()}
    with torch.enable_grad():
        if algorithm == "lookahead":
            adapted = sgd_trajectory(model, start, pieces, lr, not first_order, grad_clip)
        else:
            adapted = lookbehind_trajectory(
                model, start, pieces, lr, rho, alpha, not first_order, grad_clip
            )
        return _gradient(multitask_loss(model, adapted, meta_batch), start, False)


@torch.no_grad()
def cmaml_outer_step(
    model: nn.Module,
    pieces: list[Batch],
    meta_batch: Batch,
    *,
    algorithm: str,
    lr: float,
    rho: float = 0.0,
    alpha: float = 1.0,
    first_order: bool = False,
    grad_clip: float | None = None,
) -> None:
    """One outer step of Algorithm 3 (``algorithm="lookahead"``) or 4 (``"lookbehind"``) on the
    model's trainable parameters, in place. ``pieces`` are b[0..k-1]; ``meta_batch`` is b_m.

    ``grad_clip`` (La-MAML's ``grad_clip_norm``; ``None`` in the paper's algorithms): clamp
    every entry of each inner descent gradient to [-grad_clip, grad_clip] and clip the global
    norm of the meta-gradient of the descent to grad_clip, as ``clip_grad_norm_``."""
    if algorithm not in ALGORITHMS:
        raise ValueError(f"unknown C-MAML algorithm {algorithm!r}; allowed: {ALGORITHMS}")
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    settings = {
        "algorithm": algorithm,
        "lr": lr,
        "rho": rho,
        "alpha": alpha,
        "grad_clip": grad_clip,
    }
    gradient = meta_gradient(model, params, pieces, meta_batch, first_order=first_order, **settings)
    if algorithm == "lookbehind":
        perturbed = _ascend(params, rho, gradient)
        gradient = meta_gradient(
            model, perturbed, pieces, meta_batch, first_order=first_order, **settings
        )
    if grad_clip is not None:
        scale = (grad_clip / (_global_norm(gradient) + 1e-6)).clamp(max=1.0)  # clip_grad_norm_
        torch._foreach_mul_(gradient, scale)
    torch._foreach_add_(list(params.values()), gradient, alpha=-lr)
