"""``LookbehindTrainingArguments``: ``TrainingArguments`` plus the Lookbehind flags."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .alpha import ADAPTIVE_SCOPES
from .batchnorm import BATCHNORM_UPDATES
from .method_window import PHASE_KEYS, MethodWindow
from .perturbation import PERTURBATIONS
from .settings import METHODS, applicable_settings, parse_alpha, validate_settings

TRAINER_METHODS = (*METHODS, "none")
UNSUPPORTED_SHARDING = (
    "LookbehindTrainer shards models with FSDP2 only (--fsdp full_shard --fsdp_config "
    "'{\"version\": 2}', or fsdp_version: 2 in the accelerate config, as in "
    "examples/accelerate_configs/fsdp2.yaml): the engine works on FSDP2's DTensor shards, while "
    "DeepSpeed and FSDP1 keep the parameters in flat buffers of their own. Without sharding, "
    "use DDP (accelerate launch --multi_gpu) or a single device."
)
ASCENT_SYNCS = ("global", "per_device", "per_micro_batch")
BASELINE_METHODS = ("sam", "multistep", "multistep_avg")


def check_sharding(
    *, deepspeed: bool, fsdp_version: int | None, ascent_sync: str, fp16: bool
) -> None:
    """Refuse a sharding setup the engine does not support, saying what is allowed.
    ``fsdp_version`` is None without FSDP."""
    if deepspeed or fsdp_version not in (None, 2):
        raise ValueError(UNSUPPORTED_SHARDING)
    if fsdp_version is None:
        return
    if ascent_sync != "global":
        raise ValueError(
            f"--ascent_sync {ascent_sync} needs DDP: under FSDP2 every backward reduce-scatters "
            "the gradients, so no process keeps a gradient of its own; use --ascent_sync global "
            "or DDP"
        )
    if fp16:
        raise ValueError("fp16 loss scaling is not supported under FSDP2; use --bf16")


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
            "gradient (m-SAM with m = per-device batch, as the original JAX SAM); "
            "per_micro_batch: every gradient-accumulation micro-batch on every process is "
            "perturbed with its own gradient (m-SAM with m = per_device_train_batch_size, "
            "Table 9; sam and same-batch lookbehind).",
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
    lookbehind_start_epoch: float = field(
        default=0.0,
        metadata={
            "help": "Sec. 5.4: train with --baseline_method until this epoch, then with "
            "--lookbehind_method (the base optimizer's state carries over)."
        },
    )
    lookbehind_end_epoch: float | None = field(
        default=None,
        metadata={
            "help": "Sec. 5.4: from this epoch on, train with --baseline_method again; default: "
            "--lookbehind_method to the end."
        },
    )
    baseline_method: str = field(
        default="sam",
        metadata={
            "help": "The method outside the epochs [--lookbehind_start_epoch, "
            "--lookbehind_end_epoch), with the same perturbation and rho (k: 1 for sam, "
            "--lookbehind_k for multistep).",
            "choices": list(BASELINE_METHODS),
        },
    )
    batchnorm_update: str | None = field(
        default=None,
        metadata={
            "help": "Which passes update BatchNorm running statistics: first_pass (the default: "
            "the pass at the unperturbed weights) or every_pass (the public code).",
            "choices": list(BATCHNORM_UPDATES),
        },
    )

    def __post_init__(self) -> None:
        if self.deepspeed:
            raise ValueError(UNSUPPORTED_SHARDING)
        super().__post_init__()
        for name, value, allowed in (
            ("lookbehind_method", self.lookbehind_method, TRAINER_METHODS),
            ("ascent_sync", self.ascent_sync, ASCENT_SYNCS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
        fsdp = getattr(self, "fsdp_plugin_args", None)  # None without --fsdp
        check_sharding(
            deepspeed=False,
            fsdp_version=None if not fsdp else fsdp.get("fsdp_version"),
            ascent_sync=self.ascent_sync,
            fp16=self.fp16,
        )
        if self.lookbehind_method != "none":
            validate_settings(**self.lookbehind_kwargs())
        self.method_window()

    def method_window(self) -> MethodWindow | None:
        """The epochs of ``--lookbehind_method`` and ``--baseline_method`` around them
        (Sec. 5.4), or None when the whole run uses ``--lookbehind_method``. Both phases'
        settings are validated."""
        if self.lookbehind_start_epoch == 0.0 and self.lookbehind_end_epoch is None:
            return None
        if self.lookbehind_method == "none":
            raise ValueError(
                "--lookbehind_start_epoch/--lookbehind_end_epoch switch between "
                "--lookbehind_method and --baseline_method; --lookbehind_method none has no engine"
            )
        if self.baseline_method not in BASELINE_METHODS:
            raise ValueError(
                f"unknown baseline_method {self.baseline_method!r}; allowed: "
                f"{', '.join(BASELINE_METHODS)}"
            )
        inside = self.lookbehind_kwargs()
        inside = validate_settings(**inside)
        outside = applicable_settings(
            {
                **inside,
                "method": self.baseline_method,
                "k": None if self.baseline_method == "sam" else self.lookbehind_k,
                "minibatch_switching": False,
            }
        )
        outside = validate_settings(**outside)
        return MethodWindow(
            start_epoch=float(self.lookbehind_start_epoch),
            end_epoch=None
            if self.lookbehind_end_epoch is None
            else float(self.lookbehind_end_epoch),
            inside={key: inside[key] for key in PHASE_KEYS},
            outside={key: outside[key] for key in PHASE_KEYS},
        )

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
            "micro_batch_ascent": self.ascent_sync == "per_micro_batch",
        }
