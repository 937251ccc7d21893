"""CIFAR input pipeline: decode every image once into one uint8 tensor, then build each batch
with tensor ops (a batched random crop from the zero-padded images, a random horizontal flip,
per-channel normalisation), so the loader costs a few tensor ops per batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from datasets import Dataset, Image
from torch.utils.data import Dataset as TorchDataset
from torchvision.transforms.v2.functional import normalize, to_dtype

Stats = tuple[tuple[float, float, float], tuple[float, float, float]]

# (mean, std) per channel. ``imagenet`` is the normalisation of the pretrained ResNet-20/56.
NORMALIZATIONS: dict[str, Stats] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2471, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
}


def decode_images(dataset: Dataset, image_column: str) -> torch.Tensor:
    """All images of ``dataset`` as one uint8 tensor ``(N, 3, H, W)`` (RGB; equal sizes)."""
    rgb = dataset.cast_column(image_column, Image(mode="RGB"))
    return rgb.with_format("torch", columns=[image_column])[:][image_column]


def to_inputs(images: torch.Tensor, normalization: Stats) -> torch.Tensor:
    """uint8 images -> float32 inputs in [0, 1], normalised per channel with ``(mean, std)``."""
    mean, std = normalization
    return normalize(to_dtype(images, torch.float32, scale=True), mean, std)


def random_crop_flip(
    images: torch.Tensor, padding: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Per image: a random ``H x W`` crop of the image zero-padded by ``padding`` on each side,
    mirrored left-right with probability 1/2 (torchvision's ``RandomCrop(padding=...)`` and
    ``RandomHorizontalFlip``, drawn independently for every image of the batch)."""
    n, _, height, width = images.shape
    padded = F.pad(images, (padding, padding, padding, padding))
    top, left = torch.randint(0, 2 * padding + 1, (2, n, 1, 1), generator=generator)
    columns = torch.arange(width).view(1, 1, width)
    flip = torch.rand(n, 1, 1, generator=generator) < 0.5
    rows = top + torch.arange(height).view(1, height, 1)
    columns = left + torch.where(flip, width - 1 - columns, columns)
    crops = padded.permute(0, 2, 3, 1)[torch.arange(n).view(n, 1, 1), rows, columns]
    return crops.permute(0, 3, 1, 2).contiguous()


class CifarTensorDataset(TorchDataset):
    """Decoded images and labels; a batch of indices is fetched, augmented and normalised in one
    go (``__getitems__``, which the DataLoader calls with the whole batch of indices)."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        normalization: Stats,
        augment: bool,
        padding: int = 4,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or len(images) != len(labels):
            raise ValueError(
                "images must be a uint8 (N, C, H, W) tensor with one label each, got "
                f"{images.dtype} {tuple(images.shape)} and {len(labels)} labels"
            )
        self.images = images
        self.labels = labels.long()
        self.mean, self.std = normalization
        self.augment = augment
        self.padding = padding

    def __len__(self) -> int:
        return len(self.images)

    def without_augmentation(self) -> CifarTensorDataset:
        """The same images and labels (shared, not copied), served without augmentation."""
        return CifarTensorDataset(
            self.images, self.labels, (self.mean, self.std), augment=False, padding=self.padding
        )

    def __getitems__(self, indices: list[int]) -> list[dict[str, torch.Tensor]]:
        images = self.images[indices]
        if self.augment:
            images = random_crop_flip(images, self.padding)
        pixels = to_inputs(images, (self.mean, self.std))
        labels = self.labels[indices]
        return [{"pixel_values": p, "labels": y} for p, y in zip(pixels, labels)]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.__getitems__([index])[0]
