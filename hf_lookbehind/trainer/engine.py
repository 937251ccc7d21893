"""The engine as the Trainer drives it: :class:`TrainerEngine`, a :class:`~hf_lookbehind.Lookbehind`
that follows a method window (Sec. 5.4) and treats the Trainer's own ``optimizer.step()`` after
a step as done. It uses only the engine's public surface."""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from ..engine import RUN_STATE, Closure, Lookbehind, saved_record
from .config import LookbehindConfig
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


def split_for_asam(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
    """Split every parameter group into parameters named ``*weight*`` (ASAM rescales them) and
    the others, keeping the group's settings: the grouping of the public ASAM code."""
    names = {id(p): name for name, p in model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        for scaled in (True, False):
            params = [p for p in group["params"] if ("weight" in names.get(id(p), "")) == scaled]
            if params:
                groups.append({**group, "params": params, "asam_scale": scaled})
    optimizer.param_groups = groups


def taken_over(
    built: Lookbehind, config: LookbehindConfig, max_grad_norm: float, model: nn.Module
) -> TrainerEngine:
    """The engine a user built and passed in ``optimizers=``, as the Trainer drives it: its own
    settings (per-group values, a ``Perturbation`` of its own included) on its base optimizer,
    which the Trainer's engine takes over; ``--max_grad_norm`` clips as it would clip the base
    optimizer's steps, unless the engine clips already. A Lookbehind flag given as well is
    refused: the engine's settings are the ones that train."""
    defaults = LookbehindConfig()
    given = [
        f"--{flag.name} {getattr(config, flag.name)}"
        for flag in dataclasses.fields(LookbehindConfig)
        if getattr(config, flag.name) != getattr(defaults, flag.name)
    ]
    if given:
        raise ValueError(
            f"{', '.join(given)}: the engine passed in optimizers= has its own settings, which "
            "are the ones that train; leave the Lookbehind flags unset"
        )
    settings, clip = built.settings, max_grad_norm or None
    if clip is not None and settings.max_grad_norm not in (None, clip):
        raise ValueError(
            f"--max_grad_norm {clip} and the engine's max_grad_norm={settings.max_grad_norm} "
            "differ: set one of them (--max_grad_norm 0 leaves clipping to the engine)"
        )
    if settings.max_grad_norm is None:
        settings = settings.clipped(clip)
    if settings.batchnorm_update is None:  # built without a model: every pass updates them
        settings = dataclasses.replace(settings, batchnorm_update="every_pass")
    return TrainerEngine(built.base_optimizer, settings, model=model, grad_scaler=built.grad_scaler)
