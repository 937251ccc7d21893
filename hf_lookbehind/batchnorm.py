"""Control over which forward passes update BatchNorm running statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

BATCHNORM_UPDATES = ("first_pass", "every_pass")


def batchnorm_modules(model: nn.Module | None) -> list[_BatchNorm]:
    """The BatchNorm layers of ``model`` (``SyncBatchNorm`` and timm's subclasses included)."""
    if model is None:
        return []
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


@contextlib.contextmanager
def frozen_running_stats(modules: list[_BatchNorm]) -> Iterator[None]:
    """Train-mode BatchNorm that normalises with batch statistics but leaves ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` untouched."""
    tracking = [m.track_running_stats for m in modules]
    for m in modules:
        m.track_running_stats = False
    try:
        yield
    finally:
        for m, was_tracking in zip(modules, tracking, strict=True):
            m.track_running_stats = was_tracking


class RunningStatsGuard:
    """A copy of the BatchNorm running statistics taken at the start of a step, to put back
    when the step is skipped (a non-finite value) or fails (an exception), so that such a step
    leaves the whole model as it was. The floating-point statistics and the integer batch
    counters are each saved and restored with a few foreach kernels, without a host read."""

    def __init__(self, modules: list[_BatchNorm]) -> None:
        self.modules = modules
        self.floats: list[torch.Tensor] = []
        self.counters: list[torch.Tensor] = []
        self._saved: tuple[list[torch.Tensor], list[torch.Tensor]] = ([], [])

    def save(self) -> None:
        """Copy the statistics (read from the modules each time: ``model.to()`` replaces them)."""
        buffers = [
            b
            for m in self.modules
            for b in (m.running_mean, m.running_var, m.num_batches_tracked)
            if b is not None
        ]
        self.floats = [b for b in buffers if b.is_floating_point()]
        self.counters = [b for b in buffers if not b.is_floating_point()]
        self._saved = tuple(
            torch._foreach_clone(group) if group else [] for group in (self.floats, self.counters)
        )

    def finite(self) -> torch.Tensor | None:
        """A 0-d device flag: every floating-point statistic is finite (None without any)."""
        if not self.floats:
            return None
        return torch.isfinite(torch.stack(torch._foreach_norm(self.floats)).sum())

    def restore(self, keep: torch.Tensor | None = None) -> None:
        """Put the saved statistics back; with ``keep`` (a 0-d 0/1 device tensor) only where it
        is 0. ``x ** 1`` is ``x`` and ``x ** 0`` is 1 even for NaN, so ``x ** keep * keep`` is
        ``x`` or 0, and a lerp towards the saved copy with weight ``1 - keep`` returns either
        end exactly."""
        saved_floats, saved_counters = self._saved
        if keep is None:
            for current, saved in ((self.floats, saved_floats), (self.counters, saved_counters)):
                if current:
                    torch._foreach_copy_(current, saved)
            return
        if self.floats:
            weight = keep.to(self.floats[0].dtype)
            count = len(self.floats)
            torch._foreach_pow_(self.floats, [weight] * count)  # a 0-d tensor list: no host read
            torch._foreach_mul_(self.floats, weight)
            torch._foreach_lerp_(self.floats, saved_floats, [1 - weight] * count)
        if self.counters:
            torch._foreach_sub_(self.counters, saved_counters)
            torch._foreach_mul_(self.counters, keep.to(self.counters[0].dtype))
            torch._foreach_add_(self.counters, saved_counters)
