"""The Lookbehind flags of the Trainer layer: ``LookbehindConfig`` (the settings alone, for any
Trainer subclass and its own config class) and ``LookbehindTrainingArguments``
(``TrainingArguments`` plus the same fields)."""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments
from transformers.training_args import OptimizerNames

from .alpha import ADAPTIVE_SCOPES
from .batchnorm import BATCHNORM_UPDATES
from .method_window import PHASE_KEYS, MethodWindow
from .perturbation import PERTURBATIONS
from .settings import (
    ADAPTIVE_SPELLING,
    DEFAULT_ADAPTIVE_SCOPE,
    DEFAULT_ALPHA,
    DEFAULT_ASAM_ETA,
    DEFAULT_RHO,
    METHODS,
    SCHEDULE_FREE,
    applicable_settings,
    parse_alpha,
    validate_settings,
)

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
# The Lookbehind flags that default to None ("not given"): the engine setting each one sets, and
# a setup that reads it (where a value given with --lookbehind_method none is checked).
GIVEN_FLAGS = {
    "lookbehind_k": ("k", {"method": "lookbehind"}),
    "lookbehind_alpha": ("alpha", {"method": "lookbehind"}),
    "rho": ("rho", {"method": "lookbehind"}),
    "asam_eta": ("asam_eta", {"method": "lookbehind", "perturbation": "asam"}),
    "adaptive_alpha_scope": ("adaptive_scope", {"method": "lookbehind", "adaptive_alpha": True}),
    "batchnorm_update": ("batchnorm_update", {"method": "lookbehind"}),
}
# The other Lookbehind flags, with the default that changes nothing without the engine.
ENGINE_FLAG_DEFAULTS = {
    "lookbehind_adaptive_alpha": False,
    "perturbation": "sam",
    "minibatch_switching": False,
    "asam_weights_only": True,
    "ascent_sync": "global",
    "baseline_method": "sam",
}

logger = logging.getLogger(__name__)


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


def check_base_optimizer_name(optim: str, lookbehind_method: str) -> None:
    """Refuse a schedule-free ``--optim`` under the engine (see :data:`SCHEDULE_FREE`)."""
    name = OptimizerNames(optim).value
    if lookbehind_method != "none" and name.startswith("schedule_free"):
        raise ValueError(f"--optim {name}: {SCHEDULE_FREE}")


class AlphaFlag(float):
    """The type of ``--lookbehind_alpha``: a number (checked to lie in (0, 1] with the other
    flags), or the deprecated spelling ``adaptive``, passed on as that text for
    :class:`LookbehindConfig` to turn into ``--lookbehind_adaptive_alpha``."""

    def __new__(cls, value: Any) -> AlphaFlag | str:
        if isinstance(value, str) and value.strip().lower() == "adaptive":
            return value
        return super().__new__(cls, value)


@dataclass
class LookbehindConfig:
    """The settings of :class:`hf_lookbehind.Lookbehind` for a Trainer, apart from the Trainer's
    own arguments: give them to any Trainer subclass with :class:`~hf_lookbehind.LookbehindMixin`
    as ``lookbehind=LookbehindConfig(...)``, and parse them from the command line beside the
    trainer's own config (``HfArgumentParser((SFTConfig, LookbehindConfig))``). Every value is
    checked when the config is built. ``lookbehind_method="none"`` trains with the base optimizer
    alone (the SGD/Adam baseline).
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
    rho: float | None = field(
        default=None,
        metadata={"help": f"Neighbourhood radius of the ascent step; default {DEFAULT_RHO}."},
    )
    asam_eta: float | None = field(
        default=None,
        metadata={"help": f"eta of ASAM's T = |w| + eta (asam only); default {DEFAULT_ASAM_ETA}."},
    )
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
    lookbehind_alpha: AlphaFlag | None = field(
        default=None,
        metadata={
            "help": "Slow-weight step size in (0, 1]; lookbehind and lookahead only, default "
            f"{DEFAULT_ALPHA}. ('adaptive' is the deprecated spelling of "
            "--lookbehind_adaptive_alpha.)"
        },
    )
    lookbehind_adaptive_alpha: bool = field(
        default=False,
        metadata={
            "help": "Adaptive alpha (eq. 7-8) at every slow-weight update instead of "
            "--lookbehind_alpha; lookbehind only."
        },
    )
    adaptive_alpha_scope: str | None = field(
        default=None,
        metadata={
            "help": "Adaptive alpha only: one angle per parameter tensor (per_tensor, the public "
            f"code) or over all parameters (global, eq. 8); default {DEFAULT_ADAPTIVE_SCOPE}.",
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
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # a TrainingArguments subclass: its own checks first
            parent()
        for name, value, allowed in (
            ("lookbehind_method", self.lookbehind_method, TRAINER_METHODS),
            ("ascent_sync", self.ascent_sync, ASCENT_SYNCS),
            ("perturbation", self.perturbation, PERTURBATIONS),
            ("baseline_method", self.baseline_method, BASELINE_METHODS),
        ):
            if value not in allowed:
                raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")
        self._take_deprecated_alpha_spelling()
        if self.lookbehind_method == "none":
            self._refuse_lookbehind_flags()
        else:
            self._check_flags_against(validate_settings(**self.lookbehind_kwargs()))
        self.method_window()

    def _take_deprecated_alpha_spelling(self) -> None:
        """``--lookbehind_alpha adaptive`` (or ``lookbehind_alpha="adaptive"``) becomes
        ``--lookbehind_adaptive_alpha``, with a ``FutureWarning``; a number becomes a float."""
        value = parse_alpha(self.lookbehind_alpha)
        if value == "adaptive":
            warnings.warn(ADAPTIVE_SPELLING, FutureWarning, stacklevel=4)
            self.lookbehind_alpha, self.lookbehind_adaptive_alpha = None, True
        else:
            self.lookbehind_alpha = value

    def _refuse_lookbehind_flags(self) -> None:
        """``--lookbehind_method none``: every Lookbehind flag given is checked as the engine
        would check it, then refused, since the base optimizer alone reads none of them."""
        for name, (setting, setup) in GIVEN_FLAGS.items():
            value = getattr(self, name)
            if value is not None:
                validate_settings(**setup, **{setting: value})
        given = [name for name in GIVEN_FLAGS if getattr(self, name) is not None]
        given += [
            name for name, default in ENGINE_FLAG_DEFAULTS.items() if getattr(self, name) != default
        ]
        if given:
            flags = ", ".join(f"--{name} {getattr(self, name)}" for name in given)
            raise ValueError(
                f"{flags}: no effect with --lookbehind_method none, which trains with the base "
                "optimizer alone; leave them unset, or choose a Lookbehind method"
            )

    def _check_flags_against(self, settings: dict[str, Any]) -> None:
        """The Trainer's own flags that the engine's ``settings`` (validated, defaults filled
        in, None where unread) do not read are refused; an engine flag given at its default
        where it is not read (the engine lets it pass) is named in a warning."""
        unread = [
            (
                not self.asam_weights_only and settings["perturbation"] != "asam",
                "--asam_weights_only false",
                f"--perturbation {settings['perturbation']} is not ASAM",
            ),
        ]
        for refused, flag, reason in unread:
            if refused:
                raise ValueError(f"{flag} has no effect: {reason}; leave it unset")
        if self.baseline_method != "sam" and not self._has_method_window:
            logger.warning(
                "--baseline_method %s has no effect without --lookbehind_start_epoch or "
                "--lookbehind_end_epoch: the whole run uses --lookbehind_method %s",
                self.baseline_method,
                self.lookbehind_method,
            )
        for name, (setting, _) in GIVEN_FLAGS.items():
            if getattr(self, name) is not None and settings[setting] is None:
                logger.warning(
                    "--%s %s has no effect with --lookbehind_method %s (perturbation %s, "
                    "adaptive alpha %s); leave it unset",
                    name,
                    getattr(self, name),
                    settings["method"],
                    settings["perturbation"],
                    settings["adaptive_alpha"],
                )

    @property
    def _has_method_window(self) -> bool:
        return self.lookbehind_start_epoch != 0.0 or self.lookbehind_end_epoch is not None

    def method_window(self) -> MethodWindow | None:
        """The epochs of ``--lookbehind_method`` and ``--baseline_method`` around them
        (Sec. 5.4), or None when the whole run uses ``--lookbehind_method``. Both phases'
        settings are validated."""
        if not self._has_method_window:
            return None
        if self.lookbehind_method == "none":
            raise ValueError(
                "--lookbehind_start_epoch/--lookbehind_end_epoch switch between "
                "--lookbehind_method and --baseline_method; --lookbehind_method none has no engine"
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

    def lookbehind_kwargs(self, max_grad_norm: float | None = None) -> dict[str, Any]:
        """Keyword arguments for :class:`hf_lookbehind.Lookbehind` (without the optimizer and
        the model), None where a flag was not given, so that the engine fills in its defaults
        where the method reads them and refuses what it would not read. ``max_grad_norm`` (the
        Trainer's ``--max_grad_norm``, 0 or None for none) clips every descent update."""
        return {
            "method": self.lookbehind_method,
            "k": self.lookbehind_k,
            "alpha": self.lookbehind_alpha,
            "adaptive_alpha": self.lookbehind_adaptive_alpha or None,
            "rho": self.rho,
            "perturbation": self.perturbation,
            "asam_eta": self.asam_eta,
            "adaptive_scope": self.adaptive_alpha_scope,
            "minibatch_switching": self.minibatch_switching,
            "batchnorm_update": self.batchnorm_update,
            "max_grad_norm": max_grad_norm or None,
            "micro_batch_ascent": self.ascent_sync == "per_micro_batch",
            "ascent_sync": "per_device" if self.ascent_sync == "per_device" else "global",
        }


@dataclass
class LookbehindTrainingArguments(LookbehindConfig, TrainingArguments):
    """``TrainingArguments`` with the fields of :class:`LookbehindConfig` (for
    :class:`~hf_lookbehind.LookbehindTrainer`, and any ``Trainer`` subclass that keeps the
    arguments it is given)."""

    def __post_init__(self) -> None:
        if self.deepspeed:
            raise ValueError(UNSUPPORTED_SHARDING)
        super().__post_init__()
        fsdp = getattr(self, "fsdp_plugin_args", None)  # None without --fsdp
        check_sharding(
            deepspeed=False,
            fsdp_version=None if not fsdp else fsdp.get("fsdp_version"),
            ascent_sync=self.ascent_sync,
            fp16=self.fp16,
        )
        check_base_optimizer_name(self.optim, self.lookbehind_method)

    def lookbehind_kwargs(self, max_grad_norm: float | None = None) -> dict[str, Any]:
        """:meth:`LookbehindConfig.lookbehind_kwargs`; ``max_grad_norm`` defaults to
        ``--max_grad_norm``."""
        return super().lookbehind_kwargs(
            self.max_grad_norm if max_grad_norm is None else max_grad_norm
        )
