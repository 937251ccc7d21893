"""Trainer callbacks for comparing methods by cost: seconds of training per epoch.

A method's cost is its passes per step times the cost of one pass, so the figure users compare
(SGD vs SAM vs Lookbehind) is the wall time of an epoch's training, without the evaluation the
Trainer runs after it. ``train_runtime`` mixes both.
"""

from __future__ import annotations

import statistics
import time

import torch
from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

EPOCH_SECONDS_KEY = "train_epoch_seconds"


def _wait_for_device() -> None:
    """Let queued CUDA kernels finish, so the clock counts the work and not its launch."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


class EpochTimer(TrainerCallback):
    """Wall seconds of each training epoch, from ``on_epoch_begin`` to ``on_epoch_end``: the
    Trainer evaluates and saves after ``on_epoch_end``, so neither is counted. Each epoch's
    figure is appended to ``state.log_history`` as ``train_epoch_seconds`` (and so lands in
    ``trainer_state.json``); :meth:`seconds_per_epoch` summarises them."""

    def __init__(self) -> None:
        self.epoch_seconds: list[float] = []
        self._started_at: float | None = None

    def on_epoch_begin(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs,
    ) -> None:
        _wait_for_device()
        self._started_at = time.perf_counter()

    def on_epoch_end(
        self,
        args: TrainingArguments,
        state: TrainerState,
        control: TrainerControl,
        **kwargs,
    ) -> None:
        if self._started_at is None:
            return
        _wait_for_device()
        seconds = time.perf_counter() - self._started_at
        self._started_at = None
        self.epoch_seconds.append(seconds)
        state.log_history.append(
            {"epoch": state.epoch, "step": state.global_step, EPOCH_SECONDS_KEY: seconds}
        )

    def seconds_per_epoch(self) -> float:
        """Mean seconds of the timed epochs after the first, which also pays for warm-up
        (cuDNN autotuning, allocator growth, compilation); the first alone when it is the only
        one. NaN before any epoch ended."""
        steady = self.epoch_seconds[1:] or self.epoch_seconds
        return statistics.fmean(steady) if steady else float("nan")
