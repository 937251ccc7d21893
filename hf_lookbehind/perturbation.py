"""Ascent steps of SAM (Foret et al., eq. 3 of the Lookbehind paper) and ASAM (Kwon et al., eq. 4).

SAM:  eps = rho * g / ||g||_2                  (one global norm over all parameters)
ASAM: eps = rho * T^2 g / ||T g||_2,  T = |w| + eta   (element-wise, for the tensors whose
      parameter group has ``asam_scale=True``; T = 1 for the others)

The step is applied in place, ``w <- w + eps``, and consumes the gradients: on return
``grads`` hold ``eps``. Callers that still need the gradient must use it first.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .multi_tensor import global_norm, in_parts
from .sharding import local_shards

PERTURBATIONS = ("sam", "asam", "none")

# Added to the ascent norm, as in the public SAM/ASAM/Lookbehind code, so that a zero
# gradient gives a zero perturbation instead of 0/0.
NORM_EPS = 1e-16


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


def ascend_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    *,
    rho: float,
    perturbation: str,
    asam_eta: float = 0.01,
    asam_scaled: Sequence[bool] | None = None,
    grad_norm: torch.Tensor | None = None,
) -> None:
    """Move ``params`` by the SAM/ASAM perturbation computed from ``grads`` (consumed).

    ``grad_norm`` may pass ``||g||`` when the caller computed it already (SAM only). FSDP2
    parameters move shard by shard; the norm is that of the whole gradient.
    """
    if perturbation == "none" or not params:
        return
    whole_grads = list(grads)
    params, grads = local_shards(params), local_shards(whole_grads)
    if perturbation == "asam":
        scaled = list(asam_scaled) if asam_scaled is not None else [True] * len(params)
        _scale_by_asam_factor_(params, grads, scaled, asam_eta)
        norm = global_norm(whole_grads)
        _scale_by_asam_factor_(params, grads, scaled, asam_eta)
    elif perturbation == "sam":
        norm = global_norm(whole_grads) if grad_norm is None else grad_norm
    else:
        raise ValueError(f"unknown perturbation {perturbation!r}; allowed: {PERTURBATIONS}")
    scale = rho / (norm + NORM_EPS)
    torch._foreach_mul_(grads, scale)
    torch._foreach_add_(params, grads)
