"""The parameters as the engine works on them, prepared once: :class:`Layout`.

Everything that depends only on the parameters (their order, ASAM flags and groups, whether any
is an FSDP2 shard) is computed when the layout is built: at construction, ``add_param_group``,
``load_state_dict``, and when the groups' parameter lists were replaced (accelerate's FSDP2
preparation) or a parameter's dtype or device changed between steps (``model.double()``,
``model.to(...)``). A step does no Python call per tensor for it.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

import torch

from .multi_tensor import copy_values_, in_parts, scratch_like
from .sharding import any_sharded, local_shards


def _memory_span(p: torch.Tensor) -> tuple[int, int]:
    """The bytes ``[start, end)`` that a tensor's elements occupy in its storage."""
    start = p.untyped_storage().data_ptr() + p.storage_offset() * p.element_size()
    extent = 1 + sum((size - 1) * stride for size, stride in zip(p.shape, p.stride()))
    return start, start + extent * p.element_size()


def refuse_overlapping(params: Sequence[torch.Tensor]) -> None:
    """Refuse two parameters whose elements share memory (``nn.Parameter(other.data)``): the
    engine keeps S, F and P of each parameter apart and cannot keep such a pair tied. Views of
    one buffer that do not overlap (a flat-parameter wrapper) are fine."""
    spans = sorted((*_memory_span(p), index) for index, p in enumerate(params) if p.numel() > 0)
    for (_, end, first), (start, _, second) in itertools.pairwise(spans):
        if start < end:
            a, b = sorted((first, second))
            raise ValueError(
                f"parameters {a} and {b} (shapes {tuple(params[a].shape)} and "
                f"{tuple(params[b].shape)}) share memory as two Parameter objects: the engine "
                "keeps the slow, fast and perturbed weights of each parameter apart and cannot "
                "keep them tied; tie them as one Parameter (module.weight = other.weight), "
                "which the optimizer then sees once"
            )


class Layout:
    """Every parameter of every group, in ``state_dict`` order, with what a step reads of it.

    Buffers are lists of tensors in the same order (one per parameter), so a step indexes them
    by position, never by a tensor."""

    def __init__(self, param_groups: Sequence[dict[str, Any]]) -> None:
        self.lists = [g["params"] for g in param_groups]
        self.params: list[torch.Tensor] = [p for g in param_groups for p in g["params"]]
        self.scaled: list[bool] = [bool(g["asam_scale"]) for g in param_groups for _ in g["params"]]
        self.group_of: list[int] = [i for i, g in enumerate(param_groups) for _ in g["params"]]
        complex_params = [p for p in self.params if p.dtype.is_complex]
        if complex_params:
            raise ValueError(
                f"{len(complex_params)} complex parameters (the first of shape "
                f"{tuple(complex_params[0].shape)}): the engine supports real floating-point "
                "parameters only; keep complex weights as real and imaginary parts "
                "(torch.view_as_real) in a real parameter"
            )
        self.sharded = any_sharded(self.params)
        if not self.sharded:
            refuse_overlapping(self.params)
        self.dtypes = [p.dtype for p in self.params]
        self.devices = [p.device for p in self.params]
        self.device = self.params[0].device if self.params else torch.device("cpu")

    def __len__(self) -> int:
        return len(self.params)

    def current(self, param_groups: Sequence[dict[str, Any]]) -> bool:
        """Whether the groups still hold the parameter lists the layout was built for, with the
        same dtypes and devices."""
        lists = [g["params"] for g in param_groups]
        if len(lists) != len(self.lists) or not all([a is b for a, b in zip(lists, self.lists)]):
            return False
        params = self.params
        dtypes, devices = [p.dtype for p in params], [p.device for p in params]
        return dtypes == self.dtypes and devices == self.devices

    def values(self) -> list[torch.Tensor]:
        """The parameters' values (``p.data``)."""
        return [p.data for p in self.params]

    def allocate(self) -> list[torch.Tensor]:
        """A new buffer: one uninitialised tensor like each parameter (sharded like it)."""
        return [torch.empty_like(p, memory_format=torch.preserve_format) for p in self.params]

    def copy_of_values(self, buffer: list[torch.Tensor] | None) -> list[torch.Tensor]:
        """``buffer <- p`` for every parameter, allocating the buffer when it is None."""
        buffer = self.allocate() if buffer is None else buffer
        copy_values_(buffer, self.values())
        return buffer

    def swap(self, buffer: list[torch.Tensor]) -> None:
        """Exchange every parameter's storage with its tensor in ``buffer``: O(1) per tensor, no
        arithmetic, so values never pass through a rounding round trip. An FSDP2 parameter keeps
        its storage (FSDP2 all-gathers from its own reference to the shard), so its local shard
        exchanges values with the buffer's instead: three exact copies, through a temporary of
        at most a part of the shards at a time."""
        if not self.sharded:
            for index, p in enumerate(self.params):
                buffer[index], p.data = p.data, buffer[index]
            return
        values, others = local_shards(self.params), local_shards(buffer)
        for part in in_parts(values):
            held = scratch_like(values[part])
            torch._foreach_copy_(held, values[part])
            torch._foreach_copy_(values[part], others[part])
            torch._foreach_copy_(others[part], held)
