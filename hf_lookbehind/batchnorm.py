"""Control over which forward passes update BatchNorm running statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

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
