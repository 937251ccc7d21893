"""What an interrupted step puts back: :class:`UndoLog`.

Whatever goes wrong inside a step (an exception from the closure, Ctrl-C, a failing base
optimizer), the model is left at the slow weights: the storage swaps are undone, the buffers
that held values from before the step put them back, the running statistics are restored, and
the run state is as before the step. If the step had changed something that outlives it (the
base optimizer had updated, or a buffer carried to the next call had moved), the open outer
step is discarded as for a non-finite gradient and counted in ``skipped_steps``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any

import torch

from .batchnorm import RunningStatsGuard
from .layout import Layout
from .multi_tensor import copy_values_

logger = logging.getLogger("hf_lookbehind")


@dataclass
class UndoLog:
    """The run state a step began with, and what it did that an interruption must undo."""

    run: dict[str, Any]
    layout: Layout
    buffers: dict[str, list[torch.Tensor]]
    guard: RunningStatsGuard | None
    position: int
    adaptive: bool
    computations: int
    nonfinite: torch.Tensor | None
    swaps: list[str] = field(default_factory=list)
    backups: list[tuple[str, str]] = field(default_factory=list)
    recoverable: bool = True

    @classmethod
    def begin(
        cls,
        run: dict[str, Any],
        layout: Layout,
        buffers: dict[str, list[torch.Tensor]],
        guard: RunningStatsGuard | None,
    ) -> UndoLog:
        position = run["cycle_position"]
        # Between outer steps the flag is always reset; mid-cycle it carries the cycle's state.
        held = run["cycle_nonfinite"].clone() if position else None
        if guard is not None:
            guard.save()
        return cls(
            run,
            layout,
            buffers,
            guard,
            position,
            run["cycle_adaptive"],
            run["gradient_computations"],
            held,
        )

    def swapped(self, key: str) -> None:
        self.swaps.append(key)

    def roll_back(self, base: torch.optim.Optimizer, error: BaseException) -> None:
        """Put back what the step changed (see the module's docstring), log it, and add a note
        to ``error`` saying what the model holds."""
        for key in reversed(self.swaps):
            self.layout.swap(self.buffers[key])
        for target, source in reversed(self.backups):
            held = self.layout.values() if target == "params" else self.buffers[target]
            copy_values_(held, self.buffers[source])
        if self.guard is not None:
            self.guard.restore()
        base.zero_grad(set_to_none=True)
        run = self.run
        run["gradient_computations"] = self.computations
        nonfinite = run["cycle_nonfinite"]
        if self.recoverable:
            run["cycle_position"], run["cycle_adaptive"] = self.position, self.adaptive
            if self.nonfinite is None:
                nonfinite.zero_()
            else:
                nonfinite.copy_(self.nonfinite)
            outcome = "the optimizer's state is as before the step"
        else:
            run["cycle_position"] = 0
            run["skipped_steps"].add_(1)
            nonfinite.zero_()
            outcome = (
                "the open outer step was discarded as for a non-finite gradient (counted in "
                "skipped_steps); the base optimizer keeps the updates it had made in it"
            )
        logger.warning(
            "Lookbehind step interrupted by %r: the model holds the slow weights; %s",
            error,
            outcome,
        )
        error.add_note(f"Lookbehind: the model holds the slow weights; {outcome}.")
