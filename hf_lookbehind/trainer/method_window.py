"""Switching methods during training (Sec. 5.4, Figure 8 of the Lookbehind paper): one method
inside a window of epochs, a baseline outside it, with one base optimizer throughout."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..engine import LookbehindSettings

# The settings that differ between the two phases; all others are shared.
PHASE_KEYS = ("method", "k", "alpha", "adaptive_alpha", "minibatch_switching")


@dataclass(frozen=True)
class MethodWindow:
    """``inside`` for ``start_epoch <= epoch < end_epoch``, ``outside`` before and after;
    ``end_epoch=None`` keeps ``inside`` to the end of training. Both phases are validated
    setups."""

    start_epoch: float
    end_epoch: float | None
    inside: LookbehindSettings
    outside: LookbehindSettings

    def __post_init__(self) -> None:
        if not 0.0 <= self.start_epoch < float("inf"):
            raise ValueError(f"--lookbehind_start_epoch must be >= 0, got {self.start_epoch!r}")
        if self.end_epoch is not None and not self.end_epoch > self.start_epoch:
            raise ValueError(
                f"--lookbehind_end_epoch ({self.end_epoch!r}) must come after its start, "
                f"--lookbehind_start_epoch ({self.start_epoch!r})"
            )

    def settings_at(self, epoch: float) -> LookbehindSettings:
        """The phase of a step that starts at ``epoch`` (fractional epochs done)."""
        after_start = epoch >= self.start_epoch
        before_end = self.end_epoch is None or epoch < self.end_epoch
        return self.inside if after_start and before_end else self.outside

    def changes_at(self, epoch: float, current: LookbehindSettings) -> dict[str, Any]:
        """What ``current`` must change to be the phase of ``epoch`` (empty: nothing)."""
        return _changes(self.settings_at(epoch), current)

    def changes_to(self, record: dict[str, Any], current: LookbehindSettings) -> dict[str, Any]:
        """What ``current`` must change to be the phase a checkpoint ``record`` was saved in
        (empty: it is that phase already, or neither)."""
        for phase in (self.inside, self.outside):
            if all(record.get(key) == getattr(phase, key) for key in PHASE_KEYS):
                return _changes(phase, current)
        return {}


def _changes(phase: LookbehindSettings, current: LookbehindSettings) -> dict[str, Any]:
    if all(getattr(phase, key) == getattr(current, key) for key in PHASE_KEYS):
        return {}
    return {key: getattr(phase, key) for key in PHASE_KEYS}
