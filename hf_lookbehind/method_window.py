"""Switching methods during training (Sec. 5.4, Figure 8 of the Lookbehind paper): one method
inside a window of epochs, a baseline outside it, with one base optimizer throughout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

# The settings that differ between the two phases; all others are shared.
PHASE_KEYS = ("method", "k", "alpha", "adaptive_alpha", "minibatch_switching")


@dataclass(frozen=True)
class MethodWindow:
    """``inside`` (engine settings) for ``start_epoch <= epoch < end_epoch``, ``outside``
    before and after; ``end_epoch=None`` keeps ``inside`` to the end of training."""

    start_epoch: float
    end_epoch: float | None
    inside: dict[str, Any]
    outside: dict[str, Any]

    def __post_init__(self) -> None:
        if not 0.0 <= self.start_epoch < float("inf"):
            raise ValueError(f"the window's start epoch must be >= 0, got {self.start_epoch!r}")
        if self.end_epoch is not None and not self.end_epoch > self.start_epoch:
            raise ValueError(
                f"the window's end epoch ({self.end_epoch!r}) must come after its start epoch "
                f"({self.start_epoch!r})"
            )

    def settings_at(self, epoch: float) -> dict[str, Any]:
        """The phase settings for a step that starts at ``epoch`` (fractional epochs done)."""
        after_start = epoch >= self.start_epoch
        before_end = self.end_epoch is None or epoch < self.end_epoch
        return self.inside if after_start and before_end else self.outside

    def phase_of(self, config: dict[str, Any]) -> dict[str, Any] | None:
        """The phase whose settings ``config`` (an engine's config) has, or None."""
        for phase in (self.inside, self.outside):
            if all(config.get(key) == phase[key] for key in PHASE_KEYS):
                return phase
        return None
