"""The Lookbehind flags of the Trainer layer: ``LookbehindConfig`` (the settings alone, for any
Trainer subclass and its own config class) and ``LookbehindTrainingArguments``
(``TrainingArguments`` plus the same fields).

A flag named as a setting of :class:`~hf_lookbehind.LookbehindSettings` (``rho``), or as one
with the prefix ``lookbehind_`` (``lookbehind_k``), sets that setting: the flags are a view of
it, and the config builds and validates one value of it, once, when it is built.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from dataclasses import dataclass, field
from typing import Any

from transformers import Trainer, TrainingArguments
from transformers.training_args import OptimizerNames

from ..engine import LookbehindSettings
from ..engine.settings import (
    ADAPTIVE_SCOPES,
    ASCENT_SYNCS,
    BATCHNORM_UPDATES,
    DEFAULT_ADAPTIVE_SCOPE,
    DEFAULT_ALPHA,
    DEFAULT_ASAM_ETA,
    DEFAULT_RHO,
    METHODS,
    PERTURBATIONS,
    SCHEDULE_FREE,
)
from .method_window import MethodWindow

TRAINER_METHODS = (*METHODS, "none")
UNSUPPORTED_SHARDING = (
    "LookbehindTrainer shards models with FSDP2 only (--fsdp full_shard --fsdp_config "
    "'{\"version\": 2}', or fsdp_version: 2 in the accelerate config, as in "
    "examples/accelerate_configs/fsdp2.yaml): the engine works on FSDP2's DTensor shards, while "
    "DeepSpeed and FSDP1 keep the parameters in flat buffers of their own. Without sharding, "
    "use DDP (accelerate launch --multi_gpu) or a single device."
)
BASELINE_METHODS = ("sam", "multistep", "multistep_avg")

logger = logging.getLogger(__name__)
_SETTINGS = {field.name for field in dataclasses.fields(LookbehindSettings)}
# The flags that --lookbehind_method none reads too (a method window is refused on its own).
_BASE_OPTIMIZER_FLAGS = (
    "lookbehind_method",
    "decay_all_parameters",
    "lookbehind_start_epoch",
    "lookbehind_end_epoch",
)


def setting_of(flag: str) -> str | None:
    """The engine setting a flag sets (``lookbehind_k`` -> ``k``), or None for a flag of the
    Trainer layer's own."""
    for name in (flag, flag.removeprefix("lookbehind_")):
        if name in _SETTINGS:
            return name
    return None


def in_flag_names(message: str) -> str:
    """An engine message in the flags' words: ``k=3`` becomes ``--lookbehind_k 3``, ``alpha
    must`` ``--lookbehind_alpha must``, ``unknown method`` ``unknown --lookbehind_method``."""
    flags = {flag.name for flag in dataclasses.fields(LookbehindConfig)}
    for setting in _SETTINGS:
        flag = setting if setting in flags else f"lookbehind_{setting}"
        if flag not in flags:
            continue
        message = re.sub(
            rf"(?<![\w-]){setting}=(?:'([^']*)'|([^\s,;)]+))",
            lambda m, flag=flag: f"--{flag} {m.group(1) if m.group(1) is not None else m.group(2)}",
            message,
        )
        message = re.sub(rf"(?<![\w-]){setting} (must|has|is)\b", rf"--{flag} \1", message)
        message = re.sub(rf"\bunknown {setting}\b", f"unknown --{flag}", message)
    return message


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


UPDATES_IN_BACKWARD = (
    "updates the weights inside the backward pass (per-layer hooks), so every pass of a "
    "Lookbehind step would move them, perturbed passes included, and the engine could neither "
    "keep the slow weights nor undo a failed step; use its whole-model form (galore_adamw, "
    "apollo_adamw, adamw_torch, ...) or train with it alone (--lookbehind_method none)"
)


def check_base_optimizer_name(optim: str, lookbehind_method: str) -> None:
    """Refuse an ``--optim`` the engine cannot wrap: schedule-free (see :data:`SCHEDULE_FREE`),
    and the optimizers that update inside the backward pass (layer-wise GaLore/APOLLO, LOMO,
    AdaLomo)."""
    name = OptimizerNames(optim).value
    if lookbehind_method == "none":
        return
    if name.startswith("schedule_free"):
        raise ValueError(f"--optim {name}: {SCHEDULE_FREE}")
    if name.endswith("layerwise") or name in ("lomo", "adalomo"):
        raise ValueError(f"--optim {name} {UPDATES_IN_BACKWARD}")


def _flag(default: Any, help: str, choices: tuple | None = None) -> Any:
    metadata: dict[str, Any] = {"help": help}
    if choices is not None:
        metadata["choices"] = list(choices)
    return field(default=default, metadata=metadata)


@dataclass
class LookbehindConfig:
    """The settings of :class:`hf_lookbehind.Lookbehind` for a Trainer, apart from the Trainer's
    own arguments: give them to any Trainer subclass with :class:`~hf_lookbehind.LookbehindMixin`
    as ``lookbehind=LookbehindConfig(...)``, and parse them from the command line beside the
    trainer's own config (``HfArgumentParser((SFTConfig, LookbehindConfig))``). Every value is
    checked when the config is built. ``lookbehind_method="none"`` trains with the base optimizer
    alone (the SGD/Adam baseline).
    """

    lookbehind_method: str = _flag(
        "lookbehind",
        "lookbehind (Algorithm 1), sam, multistep, multistep_avg, lookahead, or none (the base "
        "optimizer alone).",
        TRAINER_METHODS,
    )
    perturbation: str = _flag(
        "sam",
        "Ascent step: sam (rho g/||g||), asam (rho T^2 g/||T g||, T = |w| + eta), fisher "
        "(Fisher-SAM) or none (lookahead only: plain Lookahead).",
        PERTURBATIONS,
    )
    rho: float | None = _flag(
        None, f"Neighbourhood radius of the ascent step; default {DEFAULT_RHO}."
    )
    asam_eta: float | None = _flag(
        None, f"eta of ASAM's T = |w| + eta (asam only); default {DEFAULT_ASAM_ETA}."
    )
    asam_weights_only: bool = _flag(
        True,
        "ASAM rescales only parameters whose name contains 'weight' (the public ASAM code); set "
        "False to rescale all.",
    )
    lookbehind_k: int | None = _flag(
        None, "Inner steps per outer step (ascent steps for multistep); default 2, 1 for sam."
    )
    lookbehind_alpha: float | None = _flag(
        None,
        f"Slow-weight step size in (0, 1]; lookbehind and lookahead only, default {DEFAULT_ALPHA}.",
    )
    lookbehind_adaptive_alpha: bool = _flag(
        False,
        "Adaptive alpha (eq. 7-8) at every slow-weight update instead of --lookbehind_alpha; "
        "lookbehind only.",
    )
    adaptive_alpha_scope: str | None = _flag(
        None,
        "Adaptive alpha only: one angle per parameter tensor (per_tensor, the public code) or "
        f"over all parameters (global, eq. 8); default {DEFAULT_ADAPTIVE_SCOPE}.",
        ADAPTIVE_SCOPES,
    )
    minibatch_switching: bool = _flag(
        False,
        "Lookbehind only: a new minibatch for every inner step (Sec. 6.2); one Trainer step is "
        "then one inner step (2 passes) and every k-th step updates the slow weights.",
    )
    ascent_sync: str = _flag(
        "global",
        "global: the ascent gradient is averaged over all processes (N processes reproduce one "
        "on the global batch); per_device: each process perturbs with its own gradient (m-SAM "
        "with m = per-device batch, as the original JAX SAM); per_micro_batch: every "
        "gradient-accumulation micro-batch on every process is perturbed with its own gradient "
        "(m-SAM with m = per_device_train_batch_size, Table 9; sam and same-batch lookbehind).",
        ASCENT_SYNCS,
    )
    batchnorm_update: str | None = _flag(
        None,
        "Which passes update BatchNorm running statistics: first_pass (the default: the pass at "
        "the unperturbed weights) or every_pass (the public code).",
        BATCHNORM_UPDATES,
    )
    decay_all_parameters: bool = _flag(
        False,
        "Apply --weight_decay to every parameter, BatchNorm and biases included (the paper's "
        "public code: plain SGD weight decay); by default the Trainer exempts biases and "
        "LayerNorm/RMSNorm parameters.",
    )
    lookbehind_start_epoch: float = _flag(
        0.0,
        "Sec. 5.4: train with --baseline_method until this epoch, then with --lookbehind_method "
        "(the base optimizer's state carries over).",
    )
    lookbehind_end_epoch: float | None = _flag(
        None,
        "Sec. 5.4: from this epoch on, train with --baseline_method again; default: "
        "--lookbehind_method to the end.",
    )
    baseline_method: str = _flag(
        "sam",
        "The method outside the epochs [--lookbehind_start_epoch, --lookbehind_end_epoch), with "
        "the same perturbation and rho (k: 1 for sam, --lookbehind_k for multistep).",
        BASELINE_METHODS,
    )

    def __post_init__(self) -> None:
        parent = getattr(super(), "__post_init__", None)
        if parent is not None:  # a TrainingArguments subclass: its own checks first
            parent()
        self.apply_flags({})

    def apply_flags(self, values: dict[str, Any]) -> None:
        """Set the Lookbehind flags of ``values`` (a hyper-parameter search trial's, say) and
        validate the setup they give, as when the config is built."""
        for name, value in values.items():
            setattr(self, name, value)
        for flag in dataclasses.fields(LookbehindConfig):
            allowed = flag.metadata.get("choices")
            value = getattr(self, flag.name)
            if allowed is not None and value is not None and value not in allowed:
                raise ValueError(f"unknown {flag.name} {value!r}; allowed: {', '.join(allowed)}")
        if self.lookbehind_method == "none":
            self._refuse_engine_flags()
            self._settings = None
        else:
            self._settings = self._built_settings()
            self._check_trainer_flags()
        self._window = self._built_window()

    @property
    def lookbehind_settings(self) -> LookbehindSettings | None:
        """The validated engine setup these flags give (None for ``--lookbehind_method none``);
        the Trainer adds its ``--max_grad_norm``."""
        return self._settings

    def lookbehind_kwargs(self, max_grad_norm: float | None = None) -> dict[str, Any]:
        """Keyword arguments for :class:`hf_lookbehind.Lookbehind` (without the optimizer and
        the model); ``max_grad_norm`` (0 or None: none) clips every descent update."""
        return self._settings.clipped(max_grad_norm).as_kwargs()

    def method_window(self) -> MethodWindow | None:
        """The epochs of ``--lookbehind_method`` and ``--baseline_method`` around them
        (Sec. 5.4), or None when the whole run uses ``--lookbehind_method``."""
        return self._window

    def given_settings(self) -> dict[str, Any]:
        """The engine settings the flags give: ``None`` for a flag left unset."""
        given = {}
        for flag in dataclasses.fields(LookbehindConfig):
            setting = setting_of(flag.name)
            if setting is not None:
                value = getattr(self, flag.name)
                given[setting] = None if value is False else value
        given["adaptive_alpha"] = given["adaptive_alpha"] or None
        given["minibatch_switching"] = bool(given["minibatch_switching"])
        return given

    def _built_settings(self) -> LookbehindSettings:
        try:
            return LookbehindSettings(**self.given_settings())
        except ValueError as error:
            raise ValueError(in_flag_names(str(error))) from None

    def _refuse_engine_flags(self) -> None:
        """``--lookbehind_method none``: the base optimizer alone reads no Lookbehind flag;
        each given value is checked first, as a setup that reads it would check it."""
        readers = {
            "asam_eta": {"perturbation": "asam"},
            "adaptive_alpha_scope": {"adaptive_alpha": True},
        }
        for flag in dataclasses.fields(LookbehindConfig):
            setting, value = setting_of(flag.name), getattr(self, flag.name)
            if setting and setting != "method" and value != flag.default:
                try:
                    LookbehindSettings(**readers.get(setting, {}), **{setting: value})
                except ValueError as error:
                    raise ValueError(in_flag_names(str(error))) from None
        given = [
            flag.name
            for flag in dataclasses.fields(LookbehindConfig)
            if flag.name not in _BASE_OPTIMIZER_FLAGS and getattr(self, flag.name) != flag.default
        ]
        if given:
            flags = ", ".join(f"--{name} {getattr(self, name)}" for name in given)
            raise ValueError(
                f"{flags}: no effect with --lookbehind_method none, which trains with the base "
                "optimizer alone; leave them unset, or choose a Lookbehind method"
            )

    def _check_trainer_flags(self) -> None:
        """The Trainer layer's own flags that the setup does not read are refused."""
        settings = self._settings
        if not self.asam_weights_only and settings.perturbation != "asam":
            raise ValueError(
                f"--asam_weights_only false has no effect: --perturbation "
                f"{settings.perturbation} is not ASAM; leave it unset"
            )
        for flag in dataclasses.fields(LookbehindConfig):
            setting, value = setting_of(flag.name), getattr(self, flag.name)
            if setting and value != flag.default and getattr(settings, setting) is None:
                logger.warning(
                    "--%s %s has no effect with --lookbehind_method %s (perturbation %s, "
                    "adaptive alpha %s); leave it unset",
                    flag.name,
                    value,
                    settings.method,
                    settings.perturbation,
                    settings.adaptive_alpha,
                )
        if self.baseline_method != "sam" and not self._has_method_window:
            logger.warning(
                "--baseline_method %s has no effect without --lookbehind_start_epoch or "
                "--lookbehind_end_epoch: the whole run uses --lookbehind_method %s",
                self.baseline_method,
                self.lookbehind_method,
            )

    @property
    def _has_method_window(self) -> bool:
        return self.lookbehind_start_epoch != 0.0 or self.lookbehind_end_epoch is not None

    def _built_window(self) -> MethodWindow | None:
        if not self._has_method_window:
            return None
        if self.lookbehind_method == "none":
            raise ValueError(
                "--lookbehind_start_epoch/--lookbehind_end_epoch switch between "
                "--lookbehind_method and --baseline_method; --lookbehind_method none has no engine"
            )
        inside = self._settings
        outside = inside.changed(
            method=self.baseline_method,
            k=None if self.baseline_method == "sam" else inside.k,
            minibatch_switching=False,
        )
        return MethodWindow(
            start_epoch=float(self.lookbehind_start_epoch),
            end_epoch=None
            if self.lookbehind_end_epoch is None
            else float(self.lookbehind_end_epoch),
            inside=inside,
            outside=outside,
        )


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


def refuse_regenerated_batches(trainer_class: type) -> None:
    """Every pass of a step must see the same batch: a trainer with a ``_prepare_inputs`` of
    its own (TRL's on-policy trainers generate completions there and hand out one buffered
    batch per call) is refused before any work."""
    if trainer_class._prepare_inputs is not Trainer._prepare_inputs:
        raise ValueError(
            f"{trainer_class.__name__} has a _prepare_inputs of its own (on-policy trainers "
            "such as TRL's GRPOTrainer, RLOOTrainer and DistillationTrainer generate "
            "completions there and hand out one buffered batch per call), so the passes of a "
            "Lookbehind step would not see one batch; LookbehindMixin trains on the dataset's "
            "batches (Trainer, Seq2SeqTrainer, TRL's SFTTrainer, DPOTrainer, KTOTrainer, "
            "RewardTrainer)"
        )


def rebuilt_arguments_message(trainer_class: type, error: TypeError) -> str:
    return (
        f"{trainer_class.__name__} rebuilt the LookbehindTrainingArguments given as args into a "
        f"config class of its own, which has no Lookbehind fields ({error}); give it that class "
        "(SFTConfig for SFTTrainer, DPOConfig for DPOTrainer, ...) as args and the Lookbehind "
        "settings as lookbehind=LookbehindConfig(...)"
    )


def lookbehind_config(
    args: Any, lookbehind: LookbehindConfig | None, trainer_class: type, built_engine: bool
) -> LookbehindConfig:
    """The settings given as ``lookbehind=``, or those of LookbehindTrainingArguments given as
    ``args``: exactly one of the two; none with an engine built by the user (``built_engine``:
    its own settings train)."""
    inside = isinstance(args, LookbehindConfig)
    if built_engine and lookbehind is None and not inside:
        return LookbehindConfig()
    if lookbehind is not None and inside:
        raise ValueError(
            f"{trainer_class.__name__}: the Lookbehind settings were given twice, in "
            f"{type(args).__name__} and as lookbehind=; give them once"
        )
    if lookbehind is None and not inside:
        raise TypeError(
            f"{trainer_class.__name__} needs the Lookbehind settings: "
            "lookbehind=LookbehindConfig(...) beside its arguments, or "
            f"LookbehindTrainingArguments as args (got {type(args).__name__})"
        )
    if lookbehind is not None and not isinstance(lookbehind, LookbehindConfig):
        raise TypeError(f"lookbehind must be a LookbehindConfig, got {type(lookbehind).__name__}")
    return lookbehind if lookbehind is not None else args
