"""What the engine reports: :class:`LookbehindStats` for a training log, :class:`BufferFootprint`
for its memory."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class LookbehindStats:
    """The engine's diagnostics after the last step, read from the device once (call it when
    logging, not every step): None where the method has none yet."""

    alpha: float | None  # mean alpha of the last slow-weight update (eq. 7-8 when adaptive)
    ascent_grad_norm: float | None  # ||g|| of the first ascent of the last step
    perturbation_distance: float | None  # ||P_k - S|| of the last outer step
    descent_grad_norm: float | None  # ||g|| of the last descent, before clipping
    skipped_steps: int  # outer steps discarded for a non-finite value or an exception
    gradient_computations: int  # forward/backward passes over the batch (Table 10)

    def logs(self) -> dict[str, float]:
        """The entries a training log gets (the Trainer's names), without the missing ones."""
        named = {
            "lookbehind_alpha": self.alpha,
            "ascent_grad_norm": self.ascent_grad_norm,
            "perturbation_distance": self.perturbation_distance,
            "skipped_steps": self.skipped_steps,
        }
        return {key: value for key, value in named.items() if value is not None}


@dataclass(frozen=True)
class BufferFootprint:
    """The engine's own buffers on this process (its shard of them under FSDP2)."""

    bytes: int
    parameter_copies: float  # buffer elements over the optimizer's parameter elements
