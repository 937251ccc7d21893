"""Parameters sharded by FSDP2 (``torch.distributed.fsdp.fully_shard``): ``DTensor`` shards.

The engine never gathers a sharded tensor. Element-wise work (copies, ascent, lerp) runs on each
rank's local shard, which aliases the parameter's storage (FSDP2 all-gathers from it), and a
reduction over a tensor (a norm, a dot product) is a sum of per-shard partial sums: one small
all-reduce of a vector of partial sums, one entry per tensor, over the mesh dimensions the
tensors are sharded on.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor
except ImportError:  # a torch built without torch.distributed
    DTensor = None


def is_sharded(tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is a ``DTensor`` (an FSDP2 parameter, its gradient or a buffer made
    with ``empty_like`` of one)."""
    return DTensor is not None and isinstance(tensor, DTensor)


def any_sharded(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether any of ``tensors`` is a ``DTensor`` (no Python call per tensor)."""
    return DTensor is not None and [t for t in tensors if t.__class__ is DTensor] != []


def local_shards(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Each tensor's local shard (a view of its storage); plain tensors are returned as is,
    without a Python call per tensor."""
    return [t.to_local() if t.__class__ is DTensor else t for t in tensors]


def _shard_layout(tensor: torch.Tensor):
    """``(mesh, sharded mesh dimensions)`` of a DTensor, or None when nothing is sharded."""
    if not is_sharded(tensor):
        return None
    dims = tuple(d for d, placement in enumerate(tensor.placements) if placement.is_shard())
    return (tensor.device_mesh, dims) if dims else None


def _sum_over(values: torch.Tensor, layout) -> torch.Tensor:
    """All-reduce (in place) over the process groups of the sharded mesh dimensions; on a GPU
    the collective is queued on the stream, without a host synchronisation."""
    mesh, dims = layout
    for dim in dims:
        dist.all_reduce(values, group=mesh.get_group(dim))
    return values


def sum_over_shards(partial: torch.Tensor, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``partial[..., i]`` is a sum over the local shard of ``tensors[i]``; return the sums over
    the whole tensors. One all-reduce per sharding layout (one under FSDP2), none when no
    tensor is sharded."""
    if not any_sharded(tensors):
        return partial
    layouts: dict = {}
    for index, tensor in enumerate(tensors):
        layout = _shard_layout(tensor)
        if layout is not None:
            layouts.setdefault(layout, []).append(index)
    if not layouts:
        return partial
    if len(layouts) == 1 and len(next(iter(layouts.values()))) == len(tensors):
        return _sum_over(partial.clone(), next(iter(layouts)))
    columns = list(partial.unbind(-1))
    for layout, indices in layouts.items():
        summed = _sum_over(torch.stack([columns[i] for i in indices], dim=-1), layout)
        for i, total in zip(indices, summed.unbind(-1), strict=True):
            columns[i] = total
    return torch.stack(columns, dim=-1)
