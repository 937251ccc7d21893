"""The engine as the Trainer drives it: :class:`TrainerEngine`, a :class:`~hf_lookbehind.Lookbehind`
that follows a method window (Sec. 5.4) and treats the Trainer's own ``optimizer.step()`` after
a step as done. It uses only the engine's public surface."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..engine import RUN_STATE, Closure, Lookbehind, saved_record
from .method_window import MethodWindow


class TrainerEngine(Lookbehind):
    """:class:`~hf_lookbehind.Lookbehind` with a method window; mixed precision and per-device
    ascent are the engine's own (``grad_scaler``, ``ascent_sync``)."""

    def __init__(
        self, *args: Any, method_window: MethodWindow | None = None, **kwargs: Any
    ) -> None:
        self._without_run_state = False
        super().__init__(*args, **kwargs)
        self.method_window = method_window

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        if not self._without_run_state:
            return state_dict
        state = {key: value for key, value in state_dict["state"].items() if key != RUN_STATE}
        return {**state_dict, "state": state}

    @contextlib.contextmanager
    def per_parameter_state_dict(self) -> Iterator[None]:
        """Within it, ``state_dict()`` leaves out the run state (``state["lookbehind_run"]``),
        the one entry of the state that belongs to no parameter, for
        ``torch.distributed.checkpoint`` (the Trainer's FSDP save), which maps every entry to
        a parameter."""
        self._without_run_state = True
        try:
            yield
        finally:
            self._without_run_state = False

    def step(self, closure: Closure | None = None) -> torch.Tensor | None:  # type: ignore[override]
        if closure is None:  # the Trainer's optimizer.step(): the work is done already
            return None
        return super().step(closure)

    def run_pass_closures(self, closures: Closure | Sequence[Closure]) -> torch.Tensor:
        """One Trainer step: one closure, or for m-SAM one closure per micro-batch."""
        if self.settings.micro_batch_ascent:
            return self.step_micro_batches(closures)  # type: ignore[arg-type]
        return self.step(closures)  # type: ignore[arg-type]

    def follow_method_window(self, epoch: float) -> None:
        """Switch to the phase of ``epoch`` (Sec. 5.4); in switching and lookahead mode only
        once the current cycle is complete, so a switch never cuts an outer step."""
        if self.method_window is None or self.cycle_position != 0:
            return
        phase = self.method_window.changes_at(epoch, self.settings)
        if phase:
            self.reconfigure(**phase)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """With a method window, a checkpoint may come from either phase: take its setup first,
        so that its mid-cycle buffers resume exactly."""
        saved = saved_record(state_dict)
        if self.method_window is not None and saved is not None:
            phase = self.method_window.changes_to(saved, self.settings)
            if phase:
                self.reconfigure(**phase)
        super().load_state_dict(state_dict)
