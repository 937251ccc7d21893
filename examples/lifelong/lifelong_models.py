"""The small convolutional networks of the La-MAML setup (Gupta et al., NeurIPS 2020,
github.com/montrealrobotics/La-MAML, ``model/meta/modelfactory.py``, architecture ``pc_cnn``),
which the Lookbehind-SAM paper reuses for its lifelong-learning experiments (Sec. 4.5):

- Split-CIFAR100: 3 convolutions (160 channels, 3x3, stride 2, padding 1, ReLU), then
  linear 2560 -> 320 -> 320 (ReLU) and the classifier.
- Split-TinyImageNet: 4 such convolutions, then linear 2560 -> 640 -> 640 (ReLU) and the
  classifier.

No BatchNorm, Kaiming-normal weights and zero biases, as in La-MAML's ``Learner``. The
classifier is multi-head (task-incremental): one linear layer with ``classes_per_task`` outputs
per task, and each example is scored by the head of its own task (La-MAML masks the other
tasks' outputs of one shared layer, which is the same function).
"""

from __future__ import annotations

import torch
from torch import nn

# benchmark architecture -> (number of convolutions, hidden width of the two linear layers)
ARCHITECTURES: dict[str, tuple[int, int]] = {"cnn3": (3, 320), "cnn4": (4, 640)}


class MultiHeadCNN(nn.Module):
    """``forward(images, tasks)``: the logits of each image's own task head,
    shape ``(batch, classes_per_task)``."""

    def __init__(
        self,
        architecture: str,
        num_tasks: int,
        classes_per_task: int,
        image_size: int,
        channels: int = 160,
    ) -> None:
        super().__init__()
        if architecture not in ARCHITECTURES:
            raise ValueError(
                f"unknown architecture {architecture!r}; allowed: {', '.join(ARCHITECTURES)}"
            )
        convolutions, hidden = ARCHITECTURES[architecture]
        side = image_size
        layers: list[nn.Module] = []
        in_channels = 3
        for _ in range(convolutions):
            layers += [nn.Conv2d(in_channels, channels, 3, stride=2, padding=1), nn.ReLU()]
            in_channels, side = channels, (side + 1) // 2
        self.features = nn.Sequential(
            *layers,
            nn.Flatten(),
            nn.Linear(channels * side * side, hidden),
            nn.ReLU(),
            nn.Linear(hidden, hidden),
            nn.ReLU(),
        )
        self.heads = nn.Linear(hidden, num_tasks * classes_per_task)
        self.num_tasks, self.classes_per_task = num_tasks, classes_per_task
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, images: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        all_heads = self.heads(self.features(images))
        per_task = all_heads.view(len(images), self.num_tasks, self.classes_per_task)
        return per_task[torch.arange(len(images), device=images.device), tasks]
