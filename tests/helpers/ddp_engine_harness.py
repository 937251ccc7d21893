"""The engine in a plain PyTorch DDP loop, as the README shows it, run in two gloo processes by
``tests/engine/test_ddp_amp_engine.py``: per-device ascent (``ascent_sync="per_device"``) and m-SAM
(``micro_batch_ascent``), the passes under ``no_sync()``. Writes each rank's final weights."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from hf_lookbehind import Lookbehind

STEPS, BATCH = 3, 16


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3)).double()


def batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(BATCH, 6, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (BATCH,), generator=generator),
        )
        for _ in range(STEPS)
    ]


def closure_for(model: nn.Module, x: torch.Tensor, y: torch.Tensor, scale: float, sync=None):
    def closure() -> torch.Tensor:
        with sync() if sync is not None else torch.enable_grad():
            loss = nn.functional.cross_entropy(model(x), y) * scale
            loss.backward()
        return loss

    return closure


def train(mode: str) -> list[list[float]]:
    rank, world = dist.get_rank(), dist.get_world_size()
    model = DistributedDataParallel(make_model())
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if mode == "per_device":
        engine = Lookbehind(base, k=2, rho=0.1, ascent_sync="per_device")
    else:
        engine = Lookbehind(base, k=2, rho=0.1, ascent_sync="per_micro_batch")
    share = BATCH // world
    for x, y in batches():
        x, y = x[rank * share : (rank + 1) * share], y[rank * share : (rank + 1) * share]
        if mode == "per_device":
            engine.step(closure_for(model, x, y, 1.0, model.no_sync))
        else:  # two micro-batches per process, each loss its share of the process's batch
            half = share // 2
            engine.step_micro_batches(
                [
                    closure_for(model, x[:half], y[:half], 0.5, model.no_sync),
                    closure_for(model, x[half:], y[half:], 0.5, model.no_sync),
                ]
            )
    return [p.detach().flatten().tolist() for p in model.module.parameters()]


def main() -> None:
    output_dir = Path(sys.argv[1])
    dist.init_process_group("gloo")
    results = {mode: train(mode) for mode in ("per_device", "m_sam")}
    (output_dir / f"ddp_rank{dist.get_rank()}.json").write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
