"""Multi-tensor helpers shared by the engine: norms, masked selection, the non-finite gate.

Every helper works on lists of tensors with ``torch._foreach_*`` kernels (one call per list and
dtype, so the work dispatched does not grow with the number of tensors), does no Python call per
tensor (attribute reads and comprehensions only), never reads a tensor value on the host, and
allocates nothing parameter-sized: a temporary covers at most ``1 / TEMPORARY_PARTS`` of the
tensors' elements (plus one tensor) at a time. FSDP2 parameters (``DTensor`` shards) are
handled on their local shards (see :mod:`hf_lookbehind.engine.sharding`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch

from .sharding import any_sharded, local_shards, sum_over_shards

_LOW_PRECISION = (torch.float16, torch.bfloat16)
# Integers as wide as a floating-point element: zero_nonfinite_ gates the bit patterns.
_SAME_WIDTH_INTEGER = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
TEMPORARY_PARTS = 4


def by_dtype(tensors: Sequence[torch.Tensor]) -> dict[torch.dtype, list[int]]:
    """Indices of ``tensors`` grouped by dtype (a multi-tensor kernel takes one dtype)."""
    dtypes = [t.dtype for t in tensors]
    if not dtypes:
        return {}
    if dtypes.count(dtypes[0]) == len(dtypes):
        return {dtypes[0]: list(range(len(dtypes)))}
    return {
        dtype: [i for i, d in enumerate(dtypes) if d is dtype] for dtype in dict.fromkeys(dtypes)
    }


def in_parts(tensors: Sequence[torch.Tensor], parts: int = TEMPORARY_PARTS) -> Iterator[slice]:
    """Consecutive runs of ``tensors``, at most ``parts`` of them, each holding at most
    ``1 / parts`` of the elements plus its last tensor."""
    total = sum(t.numel() for t in tensors)
    start, done, cut = 0, 0, 1
    for index, tensor in enumerate(tensors[:-1]):
        done += tensor.numel()
        if done * parts >= cut * total > 0:
            yield slice(start, index + 1)
            start = index + 1
            cut = done * parts // total + 1
    if tensors:
        yield slice(start, len(tensors))


def scratch_like(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Uninitialised tensors shaped like ``tensors``: views of one flat buffer per dtype, so
    one allocation per dtype instead of one per tensor."""
    scratch: list[torch.Tensor | None] = [None] * len(tensors)
    for dtype, indices in by_dtype(tensors).items():
        sizes = [tensors[i].numel() for i in indices]
        flat = torch.empty(sum(sizes), dtype=dtype, device=tensors[indices[0]].device)
        for i, piece in zip(indices, flat.split(sizes), strict=True):
            scratch[i] = piece.view(tensors[i].shape)
    return scratch  # type: ignore[return-value]


def _per_tensor(
    reduce: Callable[..., list[torch.Tensor]], tensors: Sequence[torch.Tensor]
) -> list[torch.Tensor]:
    """``reduce`` (``torch._foreach_norm`` or ``torch._foreach_powsum``, order 2) of each
    tensor, one call per dtype, accumulated in float32 for half precision, in the order of
    ``tensors``, cast to float64 if any tensor is float64 (else they are float32)."""
    groups = by_dtype(tensors)
    result_dtype = torch.float64 if torch.float64 in groups else torch.float32
    if len(groups) == 1 and next(iter(groups)) in (torch.float32, torch.float64):
        values = reduce(list(tensors), 2)
        return values if values[0].dtype == result_dtype else [v.to(result_dtype) for v in values]
    results: list[torch.Tensor] = [None] * len(tensors)  # type: ignore[list-item]
    for dtype, indices in groups.items():
        accumulate = torch.float32 if dtype in _LOW_PRECISION else None
        values = reduce([tensors[i] for i in indices], 2, dtype=accumulate)
        if values[0].dtype != result_dtype:
            values = [value.to(result_dtype) for value in values]
        for i, value in zip(indices, values, strict=True):
            results[i] = value
    return results


def per_tensor_norms(tensors: Sequence[torch.Tensor], sharded: bool = False) -> torch.Tensor:
    """L2 norm of each tensor, as one float32 (or float64) vector on the tensors' device.
    ``sharded``: some tensors are FSDP2 shards, whose norm is that of the whole tensor (local
    norms, one all-reduce)."""
    if not tensors:
        raise ValueError("per_tensor_norms needs at least one tensor")
    if not sharded:
        return torch.stack(_per_tensor(torch._foreach_norm, tensors))
    stacked = torch.stack(_per_tensor(torch._foreach_norm, local_shards(tensors)))
    return sum_over_shards(stacked.square(), tensors).sqrt()


def local_square_sums(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``sum(t ** 2)`` over each tensor's local shard: one 0-d float32 (float64 if any tensor
    is float64) tensor per tensor, one multi-tensor kernel per dtype."""
    return _per_tensor(torch._foreach_powsum, local_shards(tensors))


def global_norm(tensors: Sequence[torch.Tensor], sharded: bool | None = None) -> torch.Tensor:
    """One L2 norm over all tensors (the SAM norm ``||g||_2`` of eq. 3); ``sharded=None``
    looks whether any tensor is an FSDP2 shard."""
    if sharded is None:
        sharded = any_sharded(tensors)
    return torch.linalg.vector_norm(per_tensor_norms(tensors, sharded))


def copy_values_(destinations: Sequence[torch.Tensor], sources: Sequence[torch.Tensor]) -> None:
    """``destination <- source`` for every pair (shard by shard for FSDP2 parameters)."""
    if destinations:
        torch._foreach_copy_(local_shards(destinations), local_shards(sources))


def _as_integers(tensors: Sequence[torch.Tensor]) -> list[list[torch.Tensor]]:
    """The local shards of ``tensors`` viewed as integers of their element width, one list per
    dtype."""
    local = local_shards(tensors)
    return [
        [local[i].view(_SAME_WIDTH_INTEGER[dtype.itemsize]) for i in indices]
        for dtype, indices in by_dtype(local).items()
    ]


def zero_nonfinite_(grads: Sequence[torch.Tensor], keep: torch.Tensor) -> None:
    """Make gradients safe for a base optimizer: every entry becomes +0, NaN and inf included,
    when ``keep`` (a 0-d device tensor of 0 or 1) is 0; with ``keep == 1`` the gradients are
    left bit-identical. ``keep`` must be 0 whenever a gradient holds a NaN/inf, as it is when
    derived from their norm, which any NaN/inf entry makes non-finite.

    ``NaN * 0`` is NaN, so the gate multiplies the bit patterns instead, viewed as integers of
    the same width: exact for 0 and 1, one multi-tensor kernel per dtype."""
    for views in _as_integers(grads):
        torch._foreach_mul_(views, keep.to(views[0].dtype))


def select_(
    targets: Sequence[torch.Tensor], sources: Sequence[torch.Tensor], take: torch.Tensor
) -> None:
    """``target <- source`` where ``take`` (a 0-d bool device tensor) is set, else unchanged,
    bit for bit (NaN and inf included); ``sources`` are overwritten (scratch). Integer views of
    the same width: ``t * (1 - take) + s * take`` with one device scalar per kernel, so each
    multi-tensor kernel covers the whole list, and nothing is read on the host."""
    for kept, taken in zip(_as_integers(targets), _as_integers(sources), strict=True):
        chosen = take.to(kept[0].dtype)
        torch._foreach_mul_(taken, chosen)
        torch._foreach_mul_(kept, 1 - chosen)
        torch._foreach_add_(kept, taken)
