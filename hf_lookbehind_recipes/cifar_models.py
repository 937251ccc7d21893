"""CIFAR models of the recipes and scripts.

- ResNet-8/20/56 (He et al. 2016, option-A shortcuts: a parameter-free, zero-padded, stride-2
  identity), with state-dict keys that load the pretrained checkpoints in
  ``shared/data/pretrained_cifar10_resnet`` (keys prefixed ``module.``, no
  ``num_batches_tracked``).
- ResNet-18/34/50 as in the Lookbehind-SAM code (the kuangliu CIFAR ResNet): torchvision's ResNet
  with a 3x3 stride-1 stem and no max-pool, so the 32x32 input reaches the last stage at 4x4.
- WRN-28-2 and WRN-28-10 (Zagoruyko & Komodakis 2016): pre-activation wide basic blocks.

``CIFAR_MODELS`` maps the recipe's ``--model_name`` to a constructor ``(num_classes) -> model``;
``load_pretrained_resnet`` serves the analysis tools as ``--model_factory
hf_lookbehind_recipes.cifar_models:load_pretrained_resnet``.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn
from torchvision.models import ResNet
from torchvision.models import resnet18 as torchvision_resnet18
from torchvision.models import resnet34 as torchvision_resnet34
from torchvision.models import resnet50 as torchvision_resnet50


class OptionAShortcut(nn.Module):
    """Subsample by 2 and zero-pad the channels: the parameter-free shortcut of option A."""

    def __init__(self, planes: int) -> None:
        super().__init__()
        self.pad = planes // 4

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad))


class BasicBlockA(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        changes_shape = stride != 1 or in_planes != planes
        self.shortcut = OptionAShortcut(planes) if changes_shape else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class CifarResNetA(nn.Module):
    """ResNet-(6n+2) for 32x32 inputs: 16/32/64 channels, n blocks per stage."""

    def __init__(self, blocks_per_stage: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        stages, in_planes = [], 16
        for planes, stride in ((16, 1), (32, 2), (64, 2)):
            blocks = []
            for index in range(blocks_per_stage):
                blocks.append(BasicBlockA(in_planes, planes, stride if index == 0 else 1))
                in_planes = planes
            stages.append(nn.Sequential(*blocks))
        self.layer1, self.layer2, self.layer3 = stages
        self.linear = nn.Linear(64, num_classes)
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(module.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def resnet8(num_classes: int = 10) -> CifarResNetA:
    """One block per stage (6n + 2 layers, n = 1): a CPU-sized model for short measurements."""
    return CifarResNetA(1, num_classes)


def resnet20(num_classes: int = 10) -> CifarResNetA:
    return CifarResNetA(3, num_classes)


def resnet56(num_classes: int = 10) -> CifarResNetA:
    return CifarResNetA(9, num_classes)


def cifar_stem(model: ResNet) -> ResNet:
    """Replace an ImageNet ResNet's 7x7 stride-2 stem and max-pool by a 3x3 stride-1 conv."""
    model.conv1 = nn.Conv2d(3, model.conv1.out_channels, 3, 1, 1, bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")
    model.maxpool = nn.Identity()
    return model


def resnet18(num_classes: int = 10) -> ResNet:
    return cifar_stem(torchvision_resnet18(num_classes=num_classes))


def resnet34(num_classes: int = 10) -> ResNet:
    return cifar_stem(torchvision_resnet34(num_classes=num_classes))


def resnet50(num_classes: int = 10) -> ResNet:
    return cifar_stem(torchvision_resnet50(num_classes=num_classes))


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-(dropout)-conv3x3; a 1x1 conv on the activated input is the
    shortcut when the shape changes."""

    def __init__(self, in_planes: int, planes: int, stride: int, dropout: float) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        changes_shape = stride != 1 or in_planes != planes
        self.shortcut = (
            nn.Conv2d(in_planes, planes, 1, stride, bias=False) if changes_shape else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        activated = F.relu(self.bn1(x))
        out = self.conv1(activated)
        out = self.conv2(self.dropout(F.relu(self.bn2(out))))
        return out + (x if self.shortcut is None else self.shortcut(activated))


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32 inputs: (depth - 4) / 6 blocks per stage of 16w/32w/64w
    channels after a 16-channel 3x3 stem."""

    def __init__(self, depth: int, width: int, num_classes: int = 10, dropout: float = 0.0) -> None:
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        blocks_per_stage = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        blocks, in_planes = [], 16
        for planes, stride in ((16 * width, 1), (32 * width, 2), (64 * width, 2)):
            for index in range(blocks_per_stage):
                blocks.append(
                    WideBasicBlock(in_planes, planes, stride if index == 0 else 1, dropout)
                )
                in_planes = planes
        self.blocks = nn.Sequential(*blocks)
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn(self.blocks(self.conv1(x))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


def wrn28_2(num_classes: int = 10) -> WideResNet:
    return WideResNet(28, 2, num_classes)


def wrn28_10(num_classes: int = 10) -> WideResNet:
    return WideResNet(28, 10, num_classes)


CIFAR_MODELS: dict[str, Callable[[int], nn.Module]] = {
    "resnet8": resnet8,
    "resnet20": resnet20,
    "resnet56": resnet56,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
    "wrn28_2": wrn28_2,
    "wrn28_10": wrn28_10,
}


def create_cifar_model(name: str, num_classes: int) -> nn.Module:
    if name not in CIFAR_MODELS:
        raise ValueError(f"unknown CIFAR model {name!r}; allowed: {', '.join(CIFAR_MODELS)}")
    return CIFAR_MODELS[name](num_classes)


def load_pretrained_resnet(path: str | Path) -> tuple[CifarResNetA, float]:
    """Build ResNet-20 or -56 from a checkpoint of ``pretrained_cifar10_resnet`` (depth read
    from the weights) and return it with the test accuracy the checkpoint records."""
    checkpoint = torch.load(path, map_location="cpu", weights_only=False)
    state = {key.removeprefix("module."): value for key, value in checkpoint["state_dict"].items()}
    blocks = 1 + max(int(key.split(".")[1]) for key in state if key.startswith("layer1."))
    model = CifarResNetA(blocks)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if unexpected or any(not key.endswith("num_batches_tracked") for key in missing):
        raise ValueError(f"{path}: not a CIFAR ResNet-A checkpoint ({missing=}, {unexpected=})")
    return model, float(checkpoint.get("best_prec1", float("nan")))
