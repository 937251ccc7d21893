"""Slow-weight step size alpha: static, or adaptive by eq. 7-8 of the Lookbehind paper.

Adaptive alpha: ``alpha = (cos(theta) + 1) / 2`` with theta the angle between the first fast
update ``F_1 - S`` and the last one ``F_k - S``. ``scope="per_tensor"`` takes one angle per
parameter tensor, as the paper's public code computes it; ``scope="global"`` takes one angle
over all parameters, as eq. 8 reads. The cosine follows ``torch.nn.functional.cosine_similarity``:
``a.b / (max(||a||, 1e-8) max(||b||, 1e-8))``, so a tensor that did not move gets alpha = 1/2
(which leaves it where it is).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .multi_tensor import local_square_sums
from .sharding import local_shards, sum_over_shards

ADAPTIVE_SCOPES = ("per_tensor", "global")
COSINE_EPS = 1e-8


def adaptive_alpha(
    first_deltas: Sequence[torch.Tensor], last_deltas: Sequence[torch.Tensor], scope: str
) -> torch.Tensor:
    """Eq. 7-8: a vector of one alpha per tensor (``per_tensor``) or a 0-d tensor (``global``).

    The dot products come from squared norms, ``a.b = (||a||^2 + ||b||^2 - ||a - b||^2) / 2``,
    so that every reduction is one multi-tensor kernel: ``first_deltas`` is scratch, and holds
    ``first - last`` on return; ``last_deltas`` is only read. Stays on the device. For FSDP2
    shards the sums are those of the whole tensors (per-shard partial sums, one all-reduce of
    one sum per tensor for each of the three).
    """
    if scope not in ADAPTIVE_SCOPES:
        raise ValueError(f"unknown adaptive alpha scope {scope!r}; allowed: {ADAPTIVE_SCOPES}")
    squares = local_square_sums(first_deltas) + local_square_sums(last_deltas)
    torch._foreach_sub_(local_shards(first_deltas), local_shards(last_deltas))
    squares += local_square_sums(first_deltas)
    first_squares, last_squares, difference_squares = (
        sum_over_shards(row, first_deltas) for row in torch.stack(squares).view(3, -1)
    )
    dots = (first_squares + last_squares - difference_squares) / 2
    if scope == "global":
        dots, first_squares, last_squares = dots.sum(), first_squares.sum(), last_squares.sum()
    first_norms, last_norms = first_squares.sqrt(), last_squares.sqrt()
    cosine = dots / (first_norms.clamp_min(COSINE_EPS) * last_norms.clamp_min(COSINE_EPS))
    return (cosine + 1.0) / 2.0
