"""Launching a script in two gloo processes on the CPU for the distributed tests."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from helpers import ROOT, TESTS

MULTI_GPU_CONFIG = ROOT / "examples" / "accelerate_configs" / "multi_gpu.yaml"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_two_processes(
    script: Path,
    args: Sequence[str],
    launcher: str = "accelerate",
    env: dict | None = None,
    config: Path = MULTI_GPU_CONFIG,
    pythonpath: Sequence[Path] = (TESTS,),
) -> None:
    """Run ``script args`` in two processes (one thread each) with ``torchrun`` or ``accelerate
    launch`` and an accelerate config (the repository's multi-GPU one by default), on a free
    port; fail with the tail of its stderr. ``env`` is added to this process's environment and
    ``pythonpath`` put in front of its ``PYTHONPATH`` (which keeps a source checkout on it): by
    default ``tests/``, where the harness scripts import the ``helpers`` package from."""
    port = str(free_port())
    if launcher == "torchrun":
        prefix = ["-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", port]
    else:
        prefix = [
            "-m", "accelerate.commands.launch", "--config_file", str(config),
            "--num_processes", "2", "--main_process_port", port,
        ]  # fmt: skip
    command = [sys.executable, *prefix, str(script), *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    paths = [*map(str, pythonpath), environment.get("PYTHONPATH", "")]
    if any(paths):
        environment["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
    result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
