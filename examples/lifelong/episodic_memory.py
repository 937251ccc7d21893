"""Episodic memory for experience replay (ER, Chaudhry et al. 2019, "On tiny episodic memories
in continual learning"): a fixed number of slots filled by reservoir sampling over the stream
of training examples, and uniform replay batches drawn from it."""

from __future__ import annotations

import torch


class ReservoirMemory:
    """``capacity`` slots of (image, label, task). The n-th example pushed (n = 1, 2, ...) takes
    a free slot while there is one, else replaces slot j for j uniform in {0, ..., n-1} when
    j < capacity (Vitter's algorithm R), so after n pushes every one of the n examples is in
    memory with probability capacity / n."""

    def __init__(self, capacity: int, generator: torch.Generator | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"memory capacity must be a positive integer, got {capacity}")
        self.capacity = capacity
        self.generator = generator
        self.seen = 0
        self.images: torch.Tensor | None = None
        self.labels = torch.empty(0, dtype=torch.long)
        self.tasks = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.labels)

    def push(self, images: torch.Tensor, labels: torch.Tensor, tasks: torch.Tensor) -> None:
        """Offer each example of the batch to the reservoir, in order."""
        if self.images is None:
            self.images = images.new_empty((0, *images.shape[1:]))
        for image, label, task in zip(images, labels, tasks):
            self.seen += 1
            if len(self) < self.capacity:
                self.images = torch.cat([self.images, image[None]])
                self.labels = torch.cat([self.labels, label.view(1).long().cpu()])
                self.tasks = torch.cat([self.tasks, task.view(1).long().cpu()])
                continue
            slot = int(torch.randint(self.seen, (), generator=self.generator))
            if slot < self.capacity:
                self.images[slot] = image
                self.labels[slot] = label
                self.tasks[slot] = task

    def sample(self, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """``min(size, len(self))`` distinct slots drawn uniformly; ``None`` while empty."""
        if len(self) == 0 or size == 0:
            return None
        slots = torch.randperm(len(self), generator=self.generator)[:size]
        return self.images[slots], self.labels[slots], self.tasks[slots]
