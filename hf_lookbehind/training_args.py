"""``LookbehindTrainingArguments``: ``TrainingArguments`` plus the Lookbehind flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .alpha import ADAPTIVE_SCOPES
from .batchnorm import BATCHNORM_UPDATES
from .perturbation import PERTURBATIONS
from .settings import METHODS, validate_settings

TRAINER_METHODS = (*METHODS, "none")
UNSUPPORTED_SHARDING = (
    "LookbehindTrainer does not support DeepSpeed or FSDP yet: the engine swaps whole parameter "
    "tensors between slow, fast and perturbed weights. Use DDP (accelerate launch --multi_gpu) "
    "or a single device."
)
ASCENT_SYNCS = ("global", "per_device")


def parse_alpha(value: str | float) -> float | str:
    """``"adaptive"`` or a number in (0, 1] (a string from the command line, or a float)."""
    if isinstance(value, str) and value.strip().lower() == "adaptive":
        return "adaptive"
    try:
        alpha = float(value)
    except (TypeError, ValueError):
        raise ValueError(
            f"lookbehind_alpha must be a number in (0, 1] or 'adaptive', got {value!r}"
        ) from None
    if not 0.0 < alpha <= 1.0:
        raise ValueError(
            f"lookbehind_alpha must be a number in (0, 1] or 'adaptive', got {value!r}"
        )
    return alpha


@dataclass
class LookbehindTrainingArguments(TrainingArguments):
    """``TrainingArguments`` with the settings of :class:`hf_lookbehind.Lookbehind`.

    ``lookbehind_method="none"`` trains with the base optimizer alone (the SGD/Adam baseline).
    """

    lookbehind_method: str = field(
        default="lookbehind",
        metadata={
            "help": "lookbehind (Algorithm 1), sam, multistep, multistep_avg, lookahead, or none "
            "(the base optimizer alone).",
            "choices": list(TRAINER_METHODS),
        },
    )
    perturbation: str = field(
        default="sam",
        metadata={
            "help": "Ascent step: sam (rho g/||g||), asam (rho T^2 g/||T g||, T = |w| + eta) or "
            "none (lookahead only: plain Lookahead).",
            "choices": list(PERTURBATIONS),
        },
    )
    rho: float = field(default=0.05, metadata={"help": "Neighbourhood radius of the ascent step."})
    asam_eta: float = field(default=0.01, metadata={"help": "eta of ASAM's T = |w| + eta."})
    asam_weights_only: bool = field(
        default=True,
        metadata={
            "help": "ASAM rescales only parameters whose name contains 'weight' (the public ASAM "
            "code); set False to rescale all."
        },
    )
    lookbehind_k: int | None = field(
        default=None,
        metadata={
            "help": "Inner steps per outer step (ascent steps for multistep); default 2, 1 for sam."
        },
    )
    lookbehind_alpha: str = field(
        default="0.5",
        metadata={"help": "Slow-weight step size in (0, 1], or 'adaptive' (eq. 7-8)."},
    )
    adaptive_alpha_scope: str = field(
        default="per_tensor",
        metadata={
            "help": "Adaptive alpha: one angle per parameter tensor (per_tensor, the public code) "
            "or over all parameters (global, eq. 8).",
            "choices": list(ADAPTIVE_SCOPES),
        },
    )
    minibatch_switching: bool = field(
        default=False,
        metadata={
            "help": "Lookbehind only: a new minibatch for every inner step (Sec. 6.2); one Trainer "
            "step is then one inner step (2 passes) and every k-th step updates the slow weights."
        },
    )
    ascent_sync: str = field(
        default="global",
        metadata={
            "help": "global: the ascent gradient is averaged over all processes (N processes "
            "reproduce one on the global batch); per_device: each process perturbs with its own "
            "gradient (m-SAM with m = per-device batch, as the original JAX SAM).",
            "choices": list(ASCENT_SYNCS),
        },
    )
    decay_all_parameters: bool = field(
        default=False,
        metadata={
            "help": "Apply --weight_decay to every parameter, BatchNorm and biases included (the "
            "paper's public code: plain SGD weight decay); by default the Trainer exempts biases "
            "and LayerNorm/RMSNorm parameters."
        },
    )
    batchnorm_update: str = field(
        default="first_pass",
        metadata={
            "help": "Which passes update BatchNorm running statistics: first_pass (the pass at the "
            "unperturbed weights) or every_pass (the public code).",
            "choices": list(BATCHNORM_UPDATES),
        },
    )

    def __post_init__(self) -> None:
        if self.deepspeed or self.fsdp:
            raise ValueError(UNSUPPORTED_SHARDING)
        super().__post_init__()
        for name, value, allowed in (
            ("lookbehind_method", self.lookbehind_method, TRAINER_METHODS),
            ("ascent_sync", self.ascent_sync, ASCENT_SYNCS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
        if self.lookbehind_method != "none":
            validate_settings(**self.lookbehind_kwargs())

    def lookbehind_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for :class:`hf_lookbehind.Lookbehind` (without the optimizer and
        the model). ``max_grad_norm`` (a ``TrainingArguments`` field, 0 for none) clips every
        descent update."""
        return {
            "method": self.lookbehind_method,
            "k": self.lookbehind_k,
            "alpha": parse_alpha(self.lookbehind_alpha),
            "rho": self.rho,
            "perturbation": self.perturbation,
            "asam_eta": self.asam_eta,
            "adaptive_scope": self.adaptive_alpha_scope,
            "minibatch_switching": self.minibatch_switching,
            "batchnorm_update": self.batchnorm_update,
            "max_grad_norm": self.max_grad_norm or None,
        }
