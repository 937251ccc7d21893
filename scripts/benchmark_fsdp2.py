"""Persistent memory per rank and step time of the engine under FSDP2 (``fully_shard``).

Launch with one process per device (``torchrun --nproc_per_node W``). For one model and world
size W the script reports, per rank:

* memory: the persistent tensors a rank holds after a step (parameters, gradients, the base
  optimizer's state, the Lookbehind buffers), counted from the tensors themselves (their local
  shards under FSDP2), for the model sharded by FSDP2 and for the same model unsharded (what
  every DDP rank holds);
* time: one step of each method under FSDP2 on the same per-rank batch, the median over rounds
  that visit every row once (the slowest rank's), and its ratio to plain FSDP2 SAM measured in
  the same run (``/sam``). ``U`` (one FSDP2 forward/backward) and ``O`` (one base-optimizer
  update of the shards) are timed in the same rounds; a method's floor is its passes times U
  plus its updates times O, ``floor/sam`` is the ratio a step with no engine work would have
  to SAM's ``2U + O``, and ``/floor`` is the step over its floor: the engine's own work (under
  FSDP2 a swap of weights is three copies of the shard, not a storage swap) and its small
  all-reduces (norms, cosines);
* operations: the ATen operations and the collectives that one steady-state outer step (a
  cycle of k calls in switching mode) dispatches outside the closures' passes, counted as in
  ``scripts/benchmark_ops.py``, under FSDP2 and unsharded. The base optimizers are the
  multi-tensor (``foreach``) implementations, as on a GPU.

    torchrun --nproc_per_node 2 scripts/benchmark_fsdp2.py             # CPU, gloo, ~1 min
    torchrun --nproc_per_node 8 scripts/benchmark_fsdp2.py --device cuda --width 4096 --depth 8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time
from dataclasses import asdict

import torch
import torch.distributed as dist
from benchmark_ops import Count, OpCounter, calls_per_outer_step, count_outer_step, deep_mlp
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from hf_lookbehind import Lookbehind

MIB = 2**20

# name: (Lookbehind settings, forward/backward passes, base-optimizer updates per step)
METHODS = {
    "sam": (dict(method="sam"), 2, 1),
    "lookbehind k=2": (dict(k=2, alpha=0.5), 3, 2),
    "lookbehind k=2 adaptive": (dict(k=2, adaptive_alpha=True), 3, 2),
    "lookbehind k=5": (dict(k=5, alpha=0.5), 6, 5),
    "lookbehind switching k=2": (dict(k=2, alpha=0.5, minibatch_switching=True), 2, 1),
}


def make_model(width: int, depth: int, classes: int) -> nn.Sequential:
    torch.manual_seed(0)
    return deep_mlp(width, depth, classes)


def shard(model: nn.Sequential, mesh) -> nn.Sequential:
    for layer in model:
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def local_bytes(tensor: torch.Tensor) -> int:
    local = tensor.to_local() if isinstance(tensor, DTensor) else tensor
    return local.numel() * local.element_size()


def persistent_mib(model: nn.Module, engine: Lookbehind) -> dict[str, float]:
    params = list(model.parameters())
    return {
        "params": sum(local_bytes(p) for p in params) / MIB,
        "grads": sum(local_bytes(p.grad) for p in params if p.grad is not None) / MIB,
        "base state": sum(
            local_bytes(v)
            for key, state in engine.base_optimizer.state.items()
            if isinstance(key, torch.Tensor)  # not the engine's run state
            for v in state.values()
            if isinstance(v, torch.Tensor) and v.dim() > 0
        )
        / MIB,
        "lookbehind": engine.buffer_footprint().bytes / MIB,
    }


def count_operations(engine: Lookbehind, closure, device: torch.device) -> Count:
    """The operations of one outer step of ``engine``, from the start of a cycle."""
    counter = OpCounter()
    counted = counter.excluding(closure)
    while engine.cycle_position != 0:
        engine.step(closure)

    def outer_step() -> None:
        for _ in range(calls_per_outer_step(engine.settings)):
            engine.step(counted)

    return count_outer_step(outer_step, counter, warmup=0, cuda=device.type == "cuda")


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch_size", type=int, default=32, help="per rank")
    parser.add_argument("--optimizer", default="adamw", choices=["sgd", "adamw"])
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="write the results here (rank 0)")
    args = parser.parse_args()

    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("nccl" if args.device == "cuda" else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(
        args.device, int(os.environ["LOCAL_RANK"]) if args.device == "cuda" else 0
    )
    if device.type == "cuda":
        torch.cuda.set_device(device)
    mesh = init_device_mesh(args.device, (world,))
    classes = 10
    generator = torch.Generator().manual_seed(rank)
    inputs = torch.randn(args.batch_size, args.width, generator=generator).to(device)
    labels = torch.randint(0, classes, (args.batch_size,), generator=generator).to(device)

    def base_optimizer(params):
        if args.optimizer == "sgd":
            return torch.optim.SGD(params, lr=0.01, momentum=0.9, foreach=True)
        return torch.optim.AdamW(params, lr=1e-4, foreach=True)

    rows = {}
    for name, (settings, _, _) in METHODS.items():
        for sharded in (True, False):
            model = make_model(args.width, args.depth, classes).to(device)
            if sharded:
                model = shard(model, mesh)
            engine = Lookbehind(base_optimizer(model.parameters()), **settings)

            def closure(model=model):
                loss = nn.functional.cross_entropy(model(inputs), labels)
                loss.backward()
                return loss

            rows[name, sharded] = (model, engine, closure)

    memory = {}
    for (name, sharded), (model, engine, closure) in rows.items():
        for _ in range(args.warmup if sharded else 1):
            engine.step(closure)
        memory[name, sharded] = persistent_mib(model, engine)
    operations = {
        key: count_operations(engine, closure, device) for key, (_, engine, closure) in rows.items()
    }

    # U and O on the SAM row's model: one pass, and one update with that pass's gradients.
    _, engine, closure = rows["sam", True]

    def one_pass():
        engine.base_optimizer.zero_grad(set_to_none=True)
        closure()

    timed = {"U": one_pass, "O": engine.base_optimizer.step}
    timed.update(
        {name: (lambda e=rows[name, True][1], c=rows[name, True][2]: e.step(c)) for name in METHODS}
    )
    times: dict[str, list[float]] = {name: [] for name in timed}
    for _ in range(args.repeats):
        for name, run in timed.items():
            synchronize(device)
            dist.barrier()
            start = time.perf_counter()
            run()
            synchronize(device)
            times[name].append((time.perf_counter() - start) * 1e3)
    # The slowest rank sets the pace of a synchronous step.
    slowest = torch.tensor([statistics.median(times[name]) for name in timed], dtype=torch.float64)
    dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
    median = dict(zip(timed, slowest.tolist(), strict=True))
    floor = {
        name: passes * median["U"] + updates * median["O"]
        for name, (_, passes, updates) in METHODS.items()
    }

    if rank == 0:
        numel = sum(p.numel() for p in make_model(args.width, args.depth, classes).parameters())
        print(
            f"model: {args.depth} x Linear({args.width}, {args.width}) + head, {numel / 1e6:.2f}M "
            f"params, float32, {args.optimizer}; world {world} ({args.device}, "
            f"{platform.processor() or platform.machine()}, torch {torch.__version__}); "
            f"batch {args.batch_size} per rank; {args.repeats} rounds"
        )
        print(
            f"U (FSDP2 forward+backward) {median['U']:.2f} ms, O (base update) {median['O']:.2f} ms"
        )
        header = (
            f"{'method':<26}{'passes':>7}{'ms/step':>10}{'/sam':>7}{'floor/sam':>10}{'/floor':>8}"
            "   persistent MiB per rank (params + grads + base state + lookbehind)"
        )
        print(header)
        for name, (_, passes, _) in METHODS.items():
            cells = []
            for sharded in (False, True):
                mib = memory[name, sharded]
                label = "FSDP2" if sharded else "unsharded"
                cells.append(
                    f"{label} {sum(mib.values()):.2f} = "
                    + " + ".join(f"{v:.2f}" for v in mib.values())
                )
            print(
                f"{name:<26}{passes:>7}{median[name]:>10.2f}{median[name] / median['sam']:>7.3f}"
                f"{floor[name] / floor['sam']:>10.3f}{median[name] / floor[name]:>8.3f}   "
                + "; ".join(cells)
            )
        print(
            "per outer step (switching: a cycle of k calls), outside the passes: ATen operations "
            "and collectives under FSDP2, ATen operations unsharded"
            + ("; CUDA launches under FSDP2" if device.type == "cuda" else "")
        )
        for name in METHODS:
            fsdp2, unsharded = operations[name, True], operations[name, False]
            launches = f"{fsdp2.launches:>10}" if device.type == "cuda" else ""
            print(
                f"{name:<26}{fsdp2.ops:>6} ops{fsdp2.collectives:>4} collectives"
                f"{unsharded.ops:>6} ops unsharded{launches}"
            )
        if args.json:
            result = {
                "world": world,
                "device": args.device,
                "params": numel,
                "ms": median,
                "floor_ms": floor,
                "memory_mib": {
                    f"{name} {'fsdp2' if sharded else 'unsharded'}": mib
                    for (name, sharded), mib in memory.items()
                },
                "operations": {
                    f"{name} {'fsdp2' if sharded else 'unsharded'}": asdict(count)
                    for (name, sharded), count in operations.items()
                },
            }
            with open(args.json, "w") as handle:
                json.dump(result, handle, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
