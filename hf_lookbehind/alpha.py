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

from .multi_tensor import per_tensor_norms
from .sharding import local_shards, sum_over_shards

ADAPTIVE_SCOPES = ("per_tensor", "global")
COSINE_EPS = 1e-8


def adaptive_alpha(
    first_deltas: Sequence[torch.Tensor], last_deltas: Sequence[torch.Tensor], scope: str
) -> torch.Tensor:
    """Eq. 7-8: a vector of one alpha per tensor (``per_tensor``) or a 0-d tensor (``global``).

    Reads the deltas only; stays on the device. For FSDP2 shards, the norms and dot products
    are those of the whole tensors (sums of per-shard partial sums).
    """
    if scope not in ADAPTIVE_SCOPES:
        raise ValueError(f"unknown adaptive alpha scope {scope!r}; allowed: {ADAPTIVE_SCOPES}")
    first_norms = per_tensor_norms(first_deltas)
    last_norms = per_tensor_norms(last_deltas)
    dots = torch.stack(
        [
            torch.dot(a.reshape(-1), b.reshape(-1)).to(first_norms.dtype)
            for a, b in zip(local_shards(first_deltas), local_shards(last_deltas), strict=True)
        ]
    )
    dots = sum_over_shards(dots, first_deltas)
    if scope == "global":
        dots = dots.sum()
        first_norms = torch.linalg.vector_norm(first_norms)
        last_norms = torch.linalg.vector_norm(last_norms)
    cosine = dots / (first_norms.clamp_min(COSINE_EPS) * last_norms.clamp_min(COSINE_EPS))
    return (cosine + 1.0) / 2.0
