"""The model the recipes hand to the Trainer: a logits network behind the Trainer's interface."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class ImageClassifier(nn.Module):
    """A logits model behind the Trainer's interface: ``pixel_values`` in; a dict with ``logits``,
    and the cross-entropy ``loss`` when ``labels`` are given, out. (With
    ``--label_smoothing_factor`` the Trainer withholds the labels and smooths the loss itself.)"""

    config = None  # read by the Trainer; None: not a transformers model

    def __init__(self, backbone: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None
    ) -> dict[str, torch.Tensor]:
        logits = self.backbone(pixel_values)
        if labels is None:
            return {"logits": logits}
        return {"loss": F.cross_entropy(logits, labels), "logits": logits}
