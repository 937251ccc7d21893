"""A tiny float64 model with BatchNorm, a frozen parameter and a parameter that never receives a
gradient; deterministic minibatches, their closures and the base optimizers of the engine
tests."""

from __future__ import annotations

import copy

import torch
from torch import nn


class TinyNet(nn.Module):
    def __init__(self, batchnorm: bool = True, dropout: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.BatchNorm1d(8) if batchnorm else nn.Identity()
        self.drop = nn.Dropout(dropout)
        self.fc2 = nn.Linear(8, 3)
        self.frozen_offset = nn.Parameter(torch.randn(3), requires_grad=False)
        self.unused = nn.Linear(2, 2)  # never called: its parameters get no gradient

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.tanh(self.norm(self.fc1(x))))) + self.frozen_offset


def make_model(seed: int = 0, **kwargs) -> TinyNet:
    torch.manual_seed(seed)
    return TinyNet(**kwargs).double()


def make_batches(n: int, seed: int = 1, batch_size: int = 16):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch_size, 6, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (batch_size,), generator=generator),
        )
        for _ in range(n)
    ]


def closure_for(model: nn.Module, batch):
    inputs, labels = batch

    def closure() -> torch.Tensor:
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss

    return closure


OPTIMIZERS = {
    "sgd": lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9, weight_decay=5e-4),
    # Adam's step g / (sqrt(v) + eps) amplifies a last-bit difference in a near-zero gradient
    # entry by lr / eps; eps = 1e-6 keeps float64 reassociation noise far below 1e-10.
    "adamw": lambda params: torch.optim.AdamW(params, lr=0.01, weight_decay=0.01, eps=1e-6),
}


def twin(model: nn.Module) -> nn.Module:
    return copy.deepcopy(model)


def max_param_difference(a: nn.Module, b: nn.Module) -> float:
    return max((pa - pb).abs().max().item() for pa, pb in zip(a.parameters(), b.parameters()))
