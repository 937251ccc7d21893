"""Parameter groups for ASAM's element-wise scaling."""

from __future__ import annotations

from typing import Any

from torch import nn


def asam_param_groups(model: nn.Module, **group_settings: Any) -> list[dict[str, Any]]:
    """The grouping of the public ASAM code: parameters whose name contains ``weight`` get
    ``T = |w| + eta`` (``asam_scale=True``), all others (biases, ...) ``T = 1``.

    ``group_settings`` (``lr``, ``weight_decay``, ...) are copied into both groups. Frozen
    parameters are left out. Empty groups are dropped.
    """
    scaled, unscaled = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (scaled if "weight" in name else unscaled).append(param)
    groups = [
        {"params": scaled, "asam_scale": True, **group_settings},
        {"params": unscaled, "asam_scale": False, **group_settings},
    ]
    return [group for group in groups if group["params"]]
