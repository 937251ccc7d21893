"""The end of a recipe launched as several processes."""

from __future__ import annotations

import torch.distributed as dist


def end_process_group() -> None:
    """Shut the process group down before the interpreter exits. Left to the exit, gloo's
    worker threads can outlive the objects that own them, and a process then aborts
    ("terminate called without an active exception") after its results were written."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
