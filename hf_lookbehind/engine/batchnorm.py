"""Control over which forward passes update BatchNorm running statistics, and the guard of every
running statistic a pass updates (BatchNorm's, and InstanceNorm's with
``track_running_stats=True``)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm, _NormBase

from .multi_tensor import select_

BATCHNORM_UPDATES = ("first_pass", "every_pass")
_STATISTICS = ("running_mean", "running_var")


def batchnorm_modules(model: nn.Module | None) -> list[_NormBase]:
    """The normalisation layers of ``model`` that keep running statistics: BatchNorm
    (``SyncBatchNorm`` and timm's subclasses included) and InstanceNorm with
    ``track_running_stats=True``."""
    if model is None:
        return []
    return [m for m in model.modules() if isinstance(m, _NormBase) and m.track_running_stats]


@contextlib.contextmanager
def frozen_running_stats(modules: list[_BatchNorm]) -> Iterator[None]:
    """Train-mode BatchNorm that normalises with batch statistics but leaves ``running_mean``,
    ``running_var`` and ``num_batches_tracked`` untouched."""
    settings = [m.__dict__ for m in modules]
    tracking = [entries["track_running_stats"] for entries in settings]
    for entries in settings:
        entries["track_running_stats"] = False
    try:
        yield
    finally:
        for entries, was_tracking in zip(settings, tracking, strict=True):
            entries["track_running_stats"] = was_tracking


class RunningStatsGuard:
    """A copy of the BatchNorm running statistics taken at the start of a step, to put back
    when the step is skipped (a non-finite value) or fails (an exception), so that such a step
    leaves the whole model as it was. A few multi-tensor kernels per step whatever the number
    of layers, and no host read: the floating-point statistics are selected bit for bit
    (:func:`~hf_lookbehind.engine.multi_tensor.select_`), and the batch counters lose the passes
    of the step that counted them."""

    def __init__(self, modules: list[_NormBase]) -> None:
        # Only BatchNorm can be kept to the first pass (track_running_stats=False freezes it)
        # and counts its passes; InstanceNorm updates its statistics in every pass.
        self.modules = [m for m in modules if isinstance(m, _BatchNorm)]
        self._buffers = [m._buffers for m in self.modules]  # read anew each step (.to())
        self._always = [m._buffers for m in modules if not isinstance(m, _BatchNorm)]
        self.floats: list[torch.Tensor] = []
        self.counters: list[torch.Tensor] = []
        self.always_updated: list[torch.Tensor] = []
        self._saved: list[torch.Tensor] = []
        self._saved_counters: list[torch.Tensor] = []
        self.tracked_passes = 0

    def save(self) -> None:
        """Copy the statistics."""
        statistics = [b[name] for b in self._buffers for name in _STATISTICS]
        always = [b[name] for b in self._always for name in _STATISTICS]
        counters = [b["num_batches_tracked"] for b in self._buffers]
        self.always_updated = [t for t in always if t is not None]
        self.floats = [t for t in statistics if t is not None] + self.always_updated
        self.counters = [t for t in counters if t is not None]
        self._saved = torch._foreach_clone(self.floats) if self.floats else []
        # For an exception, which may come after a forward pass counted but before it returned.
        self._saved_counters = torch._foreach_clone(self.counters) if self.counters else []
        self.tracked_passes = 0

    def counted_pass(self, frozen: bool) -> list[torch.Tensor]:
        """A pass of the step ran (``frozen``: with the BatchNorm statistics frozen): the
        statistics it updated, for the non-finite check (an unfrozen pass adds one to the
        batch counters)."""
        if frozen:
            return self.always_updated
        self.tracked_passes += 1
        return self.floats

    def restore(self, drop: torch.Tensor | None = None) -> None:
        """Put the saved statistics back: all of them, or, with ``drop`` (a 0-d bool device
        tensor), where it is set (keeping the current ones where it is not)."""
        if drop is None:
            if self.floats:
                torch._foreach_copy_(self.floats, self._saved)
            if self.counters:
                torch._foreach_copy_(self.counters, self._saved_counters)
            return
        if self.floats:
            select_(self.floats, self._saved, drop)
        if self.counters and self.tracked_passes:
            counted = drop.to(self.counters[0].dtype)
            torch._foreach_add_(self.counters, counted, alpha=-self.tracked_passes)
