"""The engine on FSDP2-sharded parameters (``fully_shard`` over a CPU mesh, gloo) against the
same engine on an unsharded copy of the model with the whole batch: run as a script in two
processes (``torchrun --nproc_per_node 2 fsdp2_harness.py OUT``), it writes ``OUT/engine.json``
with, per setup, the largest difference of the slow weights and what the sharding looked like.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from hf_lookbehind import Lookbehind, asam_param_groups
from hf_lookbehind.engine.schedules import BUFFERS

STEPS, BATCH = 6, 16

SETUPS = {
    "lookbehind_sam": dict(k=2, alpha=0.5),
    "lookbehind_adaptive_per_tensor": dict(k=3, adaptive_alpha=True),
    "lookbehind_adaptive_global_asam": dict(
        k=3, adaptive_alpha=True, adaptive_alpha_scope="global", perturbation="asam", rho=0.5
    ),
    "switching_asam_weights_only_adamw": dict(
        k=2, minibatch_switching=True, perturbation="asam", rho=0.5, groups="asam", base="adamw"
    ),
    "switching_adaptive_global": dict(
        k=3, adaptive_alpha=True, adaptive_alpha_scope="global", minibatch_switching=True
    ),
    "sam": dict(method="sam"),
    "asam_weights_only": dict(method="sam", perturbation="asam", rho=0.5, groups="asam"),
    "clipped": dict(k=2, max_grad_norm=0.05),
    "multistep_avg": dict(method="multistep_avg", k=2),
    "lookahead_sam": dict(method="lookahead", k=3),
    "switching_fisher": dict(k=2, minibatch_switching=True, perturbation="fisher", rho=0.1),
}


class Net(nn.Module):
    """Layers that FSDP2 shards evenly (8 rows over 2 ranks) and unevenly (3 rows), and one
    layer that never receives a gradient."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 3)
        self.unused = nn.Linear(2, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.tanh(self.fc1(x)))


def make_model() -> Net:
    torch.manual_seed(0)
    return Net().double()


def shard(model: Net, mesh) -> Net:
    for layer in (model.fc1, model.fc2, model.unused):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def make_batches(n: int, seed: int = 1):
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(BATCH, 6, generator=generator, dtype=torch.float64),
            torch.randint(0, 3, (BATCH,), generator=generator),
        )
        for _ in range(n)
    ]


def make_engine(model: nn.Module, setup: dict) -> Lookbehind:
    setup = dict(setup)
    groups = asam_param_groups(model) if setup.pop("groups", None) else model.parameters()
    if setup.pop("base", "sgd") == "adamw":
        base = torch.optim.AdamW(groups, lr=0.01, weight_decay=0.01, eps=1e-6)
    else:
        base = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=5e-4)
    return Lookbehind(base, **setup)


IN_CLOSURE = [False]


def closure_for(model: nn.Module, batch, part: slice):
    inputs, labels = batch[0][part], batch[1][part]

    def closure() -> torch.Tensor:
        IN_CLOSURE[0] = True  # FSDP2 all-gathers and reduce-scatters in here
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        IN_CLOSURE[0] = False
        return loss

    return closure


@contextlib.contextmanager
def engine_collectives(record: list):
    """Record ``(collective, numel)`` of every collective issued outside the closures, i.e. by
    the engine itself, through ``torch.distributed`` or the functional collectives that DTensor
    redistributions use."""
    patched = [
        (module, name)
        for module, names in (
            (dist, ("all_gather_into_tensor", "all_gather", "broadcast", "reduce_scatter_tensor",
                    "all_reduce")),
            (funcol, ("all_gather_single", "all_gather_tensor", "reduce_scatter_single",
                      "all_reduce")),
        )
        for name in names
    ]  # fmt: skip
    originals = {(module, name): getattr(module, name) for module, name in patched}

    def recording(name, function):
        def call(tensor, *args, **kwargs):
            if not IN_CLOSURE[0]:
                record.append((name, tensor.numel() if isinstance(tensor, torch.Tensor) else -1))
            return function(tensor, *args, **kwargs)

        return call

    for (module, name), function in originals.items():
        setattr(module, name, recording(name, function))
    try:
        yield
    finally:
        for (module, name), function in originals.items():
            setattr(module, name, function)


def full_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    return {
        name: p.full_tensor() if isinstance(p, DTensor) else p.detach()
        for name, p in model.named_parameters()
    }


def largest_gap(a: dict, b: dict) -> float:
    return max((a[name] - b[name]).abs().max().item() for name in a)


def train(model, engine, batches, part):
    for batch in batches:
        engine.step(closure_for(model, batch, part))


def sharding_facts(model: nn.Module, engine: Lookbehind) -> dict:
    """Whether every parameter is a sharded DTensor, and the local sizes on this rank (the
    buffers' from the engine's footprint, which counts each rank's local shards)."""
    params = list(model.parameters())
    local_param_numel = sum(p.to_local().numel() for p in params)
    return {
        "all_sharded_dtensors": all(
            isinstance(p, DTensor) and all(pl.is_shard() for pl in p.placements) for p in params
        ),
        "local_param_numel": local_param_numel,
        "full_param_numel": sum(p.numel() for p in params),
        "local_buffer_numel": round(engine.buffer_footprint().parameter_copies * local_param_numel),
    }


def compare(setup: dict, mesh, rank: int, world: int) -> dict:
    batches = make_batches(STEPS)
    sharded = shard(make_model(), mesh)
    engine = make_engine(sharded, setup)
    half = BATCH // world
    collectives: list = []
    with engine_collectives(collectives):
        train(sharded, engine, batches, slice(rank * half, (rank + 1) * half))
    unsharded = make_model()
    train(unsharded, make_engine(unsharded, setup), batches, slice(None))
    return {
        "gap": largest_gap(full_weights(sharded), full_weights(unsharded)),
        "moved": largest_gap(full_weights(unsharded), full_weights(make_model())),
        "engine_collectives": sorted({name for name, _ in collectives}),
        "largest_engine_collective": max((numel for _, numel in collectives), default=0),
        "parameter_tensors": len(list(sharded.parameters())),
        **sharding_facts(sharded, engine),
    }


def resume_mid_cycle(output_dir: Path, mesh, rank: int, world: int) -> dict:
    """Switching mode, adaptive alpha, ASAM, k = 3: each rank saves its shards of the model and
    the optimizer state after 4 calls, in the middle of a cycle; a fresh sharded model and
    engine load them and continue; compare with an uninterrupted run bit by bit."""
    setup = dict(k=3, adaptive_alpha=True, minibatch_switching=True, perturbation="asam", rho=0.5)
    batches = make_batches(8, seed=5)
    half = BATCH // world
    part = slice(rank * half, (rank + 1) * half)
    uninterrupted = shard(make_model(), mesh)
    train(uninterrupted, make_engine(uninterrupted, setup), batches, part)

    model = shard(make_model(), mesh)
    engine = make_engine(model, setup)
    train(model, engine, batches[:4], part)
    saved = output_dir / f"checkpoint_rank{rank}.pt"
    torch.save({"model": model.state_dict(), "optimizer": engine.state_dict()}, saved)
    saved_buffers = {key for entry in engine.state_dict()["state"].values() for key in entry}

    resumed = shard(make_model(), mesh)
    with torch.no_grad():
        for p in resumed.parameters():
            p.zero_()  # the checkpoint must restore everything
    fresh = make_engine(resumed, setup)
    checkpoint = torch.load(saved, weights_only=True)
    resumed.load_state_dict(checkpoint["model"])
    fresh.load_state_dict(checkpoint["optimizer"])
    resumed_position = fresh.cycle_position
    train(resumed, fresh, batches[4:], part)
    return {
        "saved_position": engine.cycle_position,
        "resumed_position": resumed_position,
        "saved_buffers": sorted(saved_buffers & set(BUFFERS)),
        "identical": all(
            torch.equal(a.to_local(), b.to_local())
            for a, b in zip(uninterrupted.parameters(), resumed.parameters(), strict=True)
        ),
        "all_sharded_dtensors": all(isinstance(p, DTensor) for p in resumed.parameters()),
    }


def main() -> None:
    output_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    mesh = init_device_mesh("cpu", (world,))
    results = {name: compare(setup, mesh, rank, world) for name, setup in SETUPS.items()}
    results["resume_mid_cycle"] = resume_mid_cycle(output_dir, mesh, rank, world)
    (output_dir / f"engine_rank{rank}.json").write_text(json.dumps(results, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
