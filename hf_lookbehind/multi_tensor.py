"""Multi-tensor helpers shared by the engine: norms, storage swaps, masked selection.

Every helper works on lists of tensors with ``torch._foreach_*`` kernels where PyTorch has one,
never reads a tensor value on the host, and allocates nothing parameter-sized. FSDP2 parameters
(``DTensor`` shards) are handled on their local shards (see :mod:`hf_lookbehind.sharding`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .sharding import is_sharded, local_shards, sum_over_shards

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def per_tensor_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """L2 norm of each tensor, as one float32 (or float64) vector on the tensors' device. A
    sharded tensor's norm is that of the whole tensor: local norms, one all-reduce."""
    if not tensors:
        raise ValueError("per_tensor_norms needs at least one tensor")
    sharded = any(is_sharded(t) for t in tensors)
    whole, tensors = tensors, local_shards(tensors)
    norms: list[torch.Tensor | None] = [None] * len(tensors)
    by_dtype: dict[torch.dtype, list[int]] = {}
    for index, tensor in enumerate(tensors):
        by_dtype.setdefault(tensor.dtype, []).append(index)
    for dtype, indices in by_dtype.items():
        accumulate = torch.float32 if dtype in _LOW_PRECISION else None
        group = [tensors[i] for i in indices]
        for i, norm in zip(indices, torch._foreach_norm(group, 2, dtype=accumulate), strict=True):
            norms[i] = norm
    result_dtype = torch.float64 if torch.float64 in by_dtype else torch.float32
    stacked = torch.stack([n.to(result_dtype) for n in norms])  # type: ignore[union-attr]
    return sum_over_shards(stacked.square(), whole).sqrt() if sharded else stacked


def global_norm(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """One L2 norm over all tensors (the SAM norm ``||g||_2`` of eq. 3)."""
    return torch.linalg.vector_norm(per_tensor_norms(tensors))


def swap_storage(params: Sequence[torch.Tensor], state: dict, key: str) -> None:
    """Exchange the storage of every parameter with the buffer ``state[p][key]``.

    This is O(1) per tensor: no arithmetic, so values never pass through a rounding round trip.
    An FSDP2 parameter keeps its storage (FSDP2 all-gathers from its own reference to the
    shard), so its local shard exchanges values with the buffer's instead: three copies of the
    shard, with one shard-sized temporary at a time, still exact.
    """
    for p in params:
        buffer = state[p][key]
        if is_sharded(p):
            value, other = p.to_local(), buffer.to_local()
            held = value.clone()
            value.copy_(other)
            other.copy_(held)
            continue
        state[p][key] = p.data
        p.data = buffer


def rotate_storage(params: Sequence[torch.Tensor], state: dict, first: str, second: str) -> None:
    """Three-way storage rotation: ``p <- state[first] <- state[second] <- p``."""
    for p in params:
        param_state = state[p]
        moved_out = p.data
        p.data = param_state[first]
        param_state[first] = param_state[second]
        param_state[second] = moved_out


def copy_into_buffers(params: Sequence[torch.Tensor], state: dict, key: str) -> None:
    """``state[p][key] <- p`` for every parameter, allocating the buffer the first time."""
    missing = [p for p in params if key not in state[p]]
    for p in missing:  # a DTensor for an FSDP2 parameter: sharded like it
        state[p][key] = torch.empty_like(p, memory_format=torch.preserve_format)
    copy_values_([state[p][key] for p in params], [p.data for p in params])


def copy_values_(destinations: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """``destination <- source`` for every pair (shard by shard for FSDP2 parameters)."""
    if destinations:
        torch._foreach_copy_(local_shards(destinations), local_shards(sources))


def zero_nonfinite_(grads: Sequence[torch.Tensor], keep: torch.Tensor) -> None:
    """Make gradients safe for a base optimizer: NaN/inf entries become 0, and every entry
    becomes 0 when ``keep`` (a 0-d device tensor of 0 or 1) is 0. Finite values with
    ``keep == 1`` are left bit-identical."""
    grads = local_shards(grads)
    for grad in grads:
        torch.nan_to_num_(grad, nan=0.0, posinf=0.0, neginf=0.0)
    if grads:
        torch._foreach_mul_(grads, keep)


def lerp_(starts: Sequence[torch.Tensor], ends: Sequence[torch.Tensor], weights) -> None:
    """``start <- start + w (end - start)`` with 0-d device weights (one per tensor, or one
    shared). Uses ``torch.lerp``'s formula, which returns ``start`` exactly for ``w = 0`` and
    ``end`` exactly for ``w = 1``; the weights are never read on the host."""
    if not starts:
        return
    if isinstance(weights, torch.Tensor):
        weights = [weights] * len(starts)
    torch._foreach_lerp_(local_shards(starts), local_shards(ends), list(weights))
