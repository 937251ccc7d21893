"""The engine across data-parallel processes (DDP, or any ``torch.distributed`` setup that
averages gradients): per-device ascent and m-SAM's gradient sums.

- ``ascent_sync="per_device"``: every process perturbs with its own gradient (m-SAM with m the
  per-process batch, as the original JAX SAM) and descends with the average. The passes must
  run without DDP's all-reduce (``model.no_sync()``); the engine keeps the process's gradient
  for the ascent (one parameter-sized buffer) and averages the gradients itself.
- ``micro_batch_ascent`` (m-SAM): the micro-batches' passes run without all-reduce too; the
  engine averages the k gradient sums, and the non-finite flag, once per step.

With one process (or without ``torch.distributed``) both reduce to nothing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

try:
    import torch.distributed as dist
except ImportError:  # a torch built without torch.distributed
    dist = None

ASCENT_SYNCS = ("global", "per_device", "per_micro_batch")


def world_size() -> int:
    """Processes of the default group (1 without ``torch.distributed`` set up)."""
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return 1
    return dist.get_world_size()


def average_(tensors: Sequence[torch.Tensor]) -> None:
    """All-reduce ``tensors`` to their mean over the processes (queued together, no host read)."""
    handles = [dist.all_reduce(t, async_op=True) for t in tensors]
    for handle in handles:
        handle.wait()
    torch._foreach_div_(list(tensors), float(world_size()))


def agree_on_flag_(flag: torch.Tensor) -> None:
    """Set a 0-d bool device flag on every process if it is set on any."""
    raised = flag.to(torch.int32)
    dist.all_reduce(raised, op=dist.ReduceOp.MAX)
    flag.copy_(raised.bool())
