"""Ascent steps of the SAM family: the ``eps(g, w)`` of Algorithm 1's ``P <- P + eps``.

A variant is a small :class:`Perturbation` object: :meth:`~Perturbation.direction_` turns the
gradients (and the parameters, and the variant's own state) into an ascent direction ``d`` and
the norm it is measured in, and the step is ``eps = rho * d / norm``. The engine calls it for
every ascent of every method (SAM, Multistep, Lookahead, Lookbehind, m-SAM), so a new variant
works everywhere without touching the engine. Shipped:

SAM:   d = g,                 norm = ||g||_2                        (Foret et al.; eq. 3)
ASAM:  d = T^2 g,             norm = ||T g||_2,  T = |w| + eta      (Kwon et al.; eq. 4), for
       the tensors whose parameter group has ``asam_scale=True`` (T = 1 for the others)
Fisher-SAM: d = f^-1 g,       norm = sqrt(g^T f^-1 g),  f = 1 + eta g^2 (element-wise: the
       diagonal empirical Fisher; Kim et al., "Fisher SAM: Information Geometry and Sharpness
       Aware Minimisation", ICML 2022): the steepest ascent in the ellipsoid
       ``eps^T f eps <= rho^2``.

The step is applied in place, ``w <- w + eps``, and consumes the gradients: on return they
hold ``eps``. FSDP2 parameters (``DTensor`` shards) move shard by shard, and every norm is that
of the whole tensors (:func:`~hf_lookbehind.multi_tensor.global_norm`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .multi_tensor import global_norm, in_parts, local_square_sums
from .sharding import any_sharded, local_shards, sum_over_shards

# Added to the ascent norm, as in the public SAM/ASAM/Lookbehind code, so that a zero
# gradient gives a zero perturbation instead of 0/0.
NORM_EPS = 1e-16


class Perturbation:
    """The ascent step of a SAM variant. Subclasses implement :meth:`direction_` and may keep
    state of their own; ``name`` is what checkpoints record of the variant (a checkpoint is
    resumed only with the same name)."""

    name = "custom"

    def direction_(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        scaled: Sequence[bool],
    ) -> torch.Tensor:
        """Overwrite ``grads`` with the ascent direction ``d`` and return the norm that ``rho``
        is measured in (a 0-d device tensor; never read it on the host). ``scaled`` is each
        tensor's ``asam_scale`` group flag. Under FSDP2 the tensors are ``DTensor`` shards: do
        element-wise work on ``hf_lookbehind.sharding.local_shards(...)`` and take norms with
        :func:`~hf_lookbehind.multi_tensor.global_norm` (whole tensors)."""
        raise NotImplementedError

    def ascend_(
        self,
        params: Sequence[torch.Tensor],
        grads: Sequence[torch.Tensor],
        *,
        rho: float | Sequence[float],
        scaled: Sequence[bool],
        grad_norm: torch.Tensor | None = None,
    ) -> None:
        """``w <- w + rho d / (norm + NORM_EPS)``; ``grads`` hold ``eps`` afterwards. ``rho``
        is one radius, or one per tensor (the parameter groups' ``lookbehind_rho``): each
        tensor's step is then its own rho times its share of the direction, the norm still
        that of all tensors. ``grad_norm`` is ``||g||`` when the caller has it (SAM uses it,
        others ignore it)."""
        if not params:
            return
        norm = self._direction(params, grads, scaled, grad_norm)
        local_grads = local_shards(grads)
        if isinstance(rho, (int, float)):
            torch._foreach_mul_(local_grads, rho / (norm + NORM_EPS))
        else:
            rho = list(rho)
            for radius in dict.fromkeys(rho):  # one kernel per distinct radius
                group = [g for g, r in zip(local_grads, rho, strict=True) if r == radius]
                torch._foreach_mul_(group, radius / (norm + NORM_EPS))
        torch._foreach_add_(local_shards(params), local_grads)

    def _direction(self, params, grads, scaled, grad_norm) -> torch.Tensor:
        return self.direction_(params, grads, scaled)

    def __repr__(self) -> str:
        settings = ", ".join(f"{key}={value!r}" for key, value in vars(self).items())
        return f"{type(self).__name__}({settings})"


class SAM(Perturbation):
    """``d = g``, measured in ``||g||_2`` (eq. 3)."""

    name = "sam"

    def direction_(self, params, grads, scaled) -> torch.Tensor:
        return global_norm(grads)

    def _direction(self, params, grads, scaled, grad_norm) -> torch.Tensor:
        return global_norm(grads) if grad_norm is None else grad_norm


class ASAM(Perturbation):
    """``d = T^2 g``, measured in ``||T g||_2``, ``T = |w| + eta`` (eq. 4)."""

    name = "asam"

    def __init__(self, eta: float = 0.01) -> None:
        self.eta = eta

    def direction_(self, params, grads, scaled) -> torch.Tensor:
        local_params, local_grads = local_shards(params), local_shards(grads)
        _scale_by_asam_factor_(local_params, local_grads, scaled, self.eta)
        norm = global_norm(grads)
        _scale_by_asam_factor_(local_params, local_grads, scaled, self.eta)
        return norm


class FisherSAM(Perturbation):
    """``d = g / f``, measured in ``sqrt(g^T f^-1 g)``, ``f = 1 + eta g^2`` (Kim et al. 2022)."""

    name = "fisher"

    def __init__(self, eta: float = 1.0) -> None:
        self.eta = eta

    def direction_(self, params, grads, scaled) -> torch.Tensor:
        local = local_shards(grads)
        sums: list[torch.Tensor] = []
        for part in in_parts(local):  # a temporary holds one part at a time
            pieces = local[part]
            fisher = torch._foreach_mul(pieces, pieces)
            torch._foreach_mul_(fisher, self.eta)
            torch._foreach_add_(fisher, 1.0)
            torch._foreach_div_(pieces, fisher)  # d = g / f
            torch._foreach_mul_(fisher, pieces)
            torch._foreach_mul_(fisher, pieces)  # f d^2 = g^2 / f >= 0
            torch._foreach_sqrt_(fisher)
            sums += local_square_sums(fisher)
        dtype = torch.float64 if any(t.dtype == torch.float64 for t in sums) else torch.float32
        partial = torch.stack([t.to(dtype) for t in sums])
        if any_sharded(grads):
            partial = sum_over_shards(partial, grads)
        return partial.sum().sqrt()


PERTURBATIONS = ("sam", "asam", "fisher", "none")


def perturbation_for(name: str | Perturbation, asam_eta: float | None = None) -> Perturbation:
    """The variant a setting names (``"none"``: no ascent, Lookahead only, has none), or the
    :class:`Perturbation` given."""
    if isinstance(name, Perturbation):
        return name
    if name == "sam":
        return SAM()
    if name == "asam":
        return ASAM() if asam_eta is None else ASAM(asam_eta)
    if name == "fisher":
        return FisherSAM()
    raise ValueError(f"unknown perturbation {name!r}; allowed: {', '.join(PERTURBATIONS)}")


def describe_perturbation(value: str | Perturbation, asam_eta: float | None = None) -> str:
    """What a checkpoint records of a perturbation setting: ``"none"``, or the variant with its
    hyper-parameters (``"ASAM(eta=0.01)"``), so that equal settings compare equal however they
    were spelled."""
    return "none" if value == "none" else repr(perturbation_for(value, asam_eta))


def _scale_by_asam_factor_(params, grads, scaled, eta: float) -> None:
    """``g <- (|w| + eta) * g`` for the scaled tensors by multi-tensor kernels, part by part
    (:func:`~hf_lookbehind.multi_tensor.in_parts`), so that the temporary ``T`` never holds
    more than a part of the parameters."""
    params = [p for p, is_scaled in zip(params, scaled, strict=True) if is_scaled]
    grads = [g for g, is_scaled in zip(grads, scaled, strict=True) if is_scaled]
    for part in in_parts(params):
        factors = torch._foreach_abs(params[part])
        torch._foreach_add_(factors, eta)
        torch._foreach_mul_(grads[part], factors)
