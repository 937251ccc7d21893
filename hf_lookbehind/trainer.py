"""``LookbehindTrainer``: a drop-in ``transformers.Trainer`` that trains with Lookbehind-SAM, and
``LookbehindMixin``, the same for any Trainer subclass (``Seq2SeqTrainer``, TRL's
``SFTTrainer``, ``DPOTrainer``, ``KTOTrainer``, ``RewardTrainer``):
``class LookbehindSFTTrainer(LookbehindMixin, SFTTrainer)``.

How a Trainer step maps onto the algorithm:

- Same-batch mode: one Trainer step is one outer step (k + 1 forward/backward passes over the
  step's whole batch); the slow-weight update happens before the step ends, so logging,
  evaluation and checkpoints at step boundaries see slow weights.
- Minibatch switching and lookahead: one Trainer step is one inner step on a new batch
  (2 passes, 1 for lookahead without perturbation); every k-th step updates the slow weights.
  Between steps the model holds the slow weights, so evaluation and saved models use them also
  mid-cycle, while the fast and perturbed weights wait in the optimizer state.

The learning-rate scheduler, ``max_steps`` and epochs count Trainer steps in both modes.
``gradient_accumulation_steps`` micro-batches make one batch: every pass replays all
micro-batches of the window (cached by the Trainer), so the perturbation uses the gradient of
the whole accumulated batch. Under DDP that gradient is averaged over the processes
(``ascent_sync="global"``).

Gradient clipping (``max_grad_norm``) applies to every descent update and never to the ascent
direction. With fp16, every pass goes through the accelerator's ``GradScaler`` (unscale and
scale update, no host synchronisation); an overflow in any pass discards the outer step without
touching slow or fast weights, like any non-finite gradient.

Under FSDP2 (``--fsdp full_shard`` or ``fsdp_version: 2`` in the accelerate config) the engine
works on the parameters' shards (see :mod:`hf_lookbehind.sharding`); every process checkpoints
its own shard of the engine's state. FSDP1 and DeepSpeed are refused.
"""

from __future__ import annotations

import contextlib
import logging
import os
import warnings
from typing import Any

import torch
from torch import nn
from transformers import Trainer
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import TrainOutput

from .checkpoints import (
    check_checkpoint,
    cycles,
    load_checkpoint_file,
    newest_complete_checkpoint,
    without_lookbehind_entries,
)
from .method_window import MethodWindow
from .optimizer import RUN_STATE, Lookbehind, saved_config
from .settings import refuse_schedule_free, validate_settings
from .trainer_passes import (
    Closure,
    FrozenForwards,
    ReferenceInBatch,
    StepPasses,
    frozen_modules,
)
from .training_args import (
    LookbehindConfig,
    LookbehindTrainingArguments,
    check_base_optimizer_name,
    check_sharding,
)

OPTIMIZER_SHARD = "lookbehind_optimizer_rank{rank}.pt"

logger = logging.getLogger(__name__)


class _TrainerLookbehind(Lookbehind):
    """The engine as the Trainer drives it: a method window (Sec. 5.4), and the Trainer's own
    ``optimizer.step()`` after the step is a no-op. Mixed precision and per-device ascent are
    the engine's (``grad_scaler``, ``ascent_sync``)."""

    def __init__(
        self, *args: Any, method_window: MethodWindow | None = None, **kwargs: Any
    ) -> None:
        self._per_parameter_state_dict = False
        super().__init__(*args, **kwargs)
        self.method_window = method_window

    def state_dict(self) -> dict[str, Any]:
        state_dict = super().state_dict()
        if not self._per_parameter_state_dict:
            return state_dict
        state = {key: value for key, value in state_dict["state"].items() if key != RUN_STATE}
        return {**state_dict, "state": state}

    @contextlib.contextmanager
    def per_parameter_state_dict(self):
        """Within it, ``state_dict()`` leaves out the run state (``state["lookbehind_run"]``),
        the one entry of the state that belongs to no parameter, for
        ``torch.distributed.checkpoint`` (the Trainer's FSDP save), which maps every entry to
        a parameter."""
        self._per_parameter_state_dict = True
        try:
            yield
        finally:
            self._per_parameter_state_dict = False

    def step(self, closure=None):  # type: ignore[override]
        if closure is None:  # the Trainer's optimizer.step(): the work is done already
            return None
        return super().step(closure)

    @property
    def k(self) -> int:
        return self._setup.k

    @property
    def gradient_computations(self) -> int:
        """The passes over the batch so far (a host count: no device read, unlike
        :meth:`stats`)."""
        return self._run["gradient_computations"]

    @property
    def last_descent_grad_norm(self) -> torch.Tensor | None:
        """``||g||`` of the last descent (a device tensor): the Trainer's ``grad_norm``."""
        return self._last_descent_grad_norm

    def drive_grad_scaler(self, scaler: torch.amp.GradScaler) -> None:
        """Unscale every pass and update the scale with ``scaler`` (the engine's
        ``grad_scaler``), taken over from accelerate's optimizer wrapper."""
        self._grad_scaler = scaler

    def run_pass_closures(self, closures) -> torch.Tensor:
        """One Trainer step: one closure, or for m-SAM one closure per micro-batch."""
        if self._setup.micro_batch_ascent:
            return self.step_micro_batches(closures)
        return self.step(closures)

    def follow_method_window(self, epoch: float) -> None:
        """Switch to the phase of ``epoch`` (Sec. 5.4); in switching and lookahead mode only
        once the current cycle is complete, so a switch never cuts an outer step."""
        if self.method_window is None or self.cycle_position != 0:
            return
        phase = self.method_window.settings_at(epoch)
        if any(self.settings[key] != value for key, value in phase.items()):
            self.reconfigure(**phase)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """With a method window, a checkpoint may come from either phase: take its setup first,
        so that its mid-cycle buffers resume exactly."""
        saved = saved_config(state_dict)
        if self.method_window is not None and saved is not None:
            phase = self.method_window.phase_of(saved)
            if phase is not None:
                self.reconfigure(**phase)
        super().load_state_dict(state_dict)


def _split_for_asam(optimizer: torch.optim.Optimizer, model: nn.Module) -> None:
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
    args: Any, lookbehind: LookbehindConfig | None, trainer_class: type
) -> LookbehindConfig:
    """The settings given as ``lookbehind=``, or those of LookbehindTrainingArguments given as
    ``args``: exactly one of the two."""
    inside = isinstance(args, LookbehindConfig)
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


class LookbehindMixin:
    """Lookbehind-SAM/ASAM and its baselines for any ``transformers.Trainer`` subclass::

        class LookbehindSFTTrainer(LookbehindMixin, SFTTrainer):
            pass

        trainer = LookbehindSFTTrainer(
            model=model, args=SFTConfig(...), lookbehind=LookbehindConfig(lookbehind_k=2), ...
        )

    The settings come as ``lookbehind=LookbehindConfig(...)`` beside the trainer's own
    arguments, which stay the trainer's config class with its defaults (a trainer that rebuilds
    its config keeps them), or inside :class:`LookbehindTrainingArguments` given as ``args``.
    The optimizer the trainer builds (``--optim``, or ``optimizers=(optimizer, scheduler)``)
    becomes the base optimizer of :class:`hf_lookbehind.Lookbehind`.

    Every pass of a step runs the trainer's own ``training_step``. What the trainer records in
    the attributes :attr:`first_pass_records` while it computes the loss (TRL's metrics and
    token count) is kept from the first pass over each batch only, and a model the trainer calls
    besides the trained one (a reference or teacher model) runs once per batch (see
    :mod:`hf_lookbehind.trainer_passes`). ``total_flos`` counts every pass.
    """

    # Attributes a trainer's loss records into (TRL's trainers): kept from the first pass.
    first_pass_records: tuple[str, ...] = ("_metrics", "_total_train_tokens")

    def __init__(self, *args: Any, lookbehind: LookbehindConfig | None = None, **kwargs: Any):
        refuse_regenerated_batches(type(self))
        try:
            super().__init__(*args, **kwargs)
        except TypeError as error:
            if isinstance(kwargs.get("args"), LookbehindTrainingArguments):
                raise TypeError(rebuilt_arguments_message(type(self), error)) from error
            raise
        self.lookbehind_config = lookbehind_config(self.args, lookbehind, type(self))
        self._check_setup()
        self._window: list[dict[str, Any]] = []

    def _check_setup(self) -> None:
        """Refuse, before any work, a setup the engine cannot train: sharding other than FSDP2,
        settings that do not fit the Trainer's ``max_grad_norm``, a schedule-free base
        optimizer, processes that did not find each other."""
        config = self.lookbehind_config
        fsdp_plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        check_sharding(  # also catches FSDP/DeepSpeed set up by the accelerate config
            deepspeed=self.is_deepspeed_enabled or self.is_fsdp_xla_enabled,
            fsdp_version=None if fsdp_plugin is None else getattr(fsdp_plugin, "fsdp_version", 1),
            ascent_sync=config.ascent_sync,
            fp16=self.accelerator.mixed_precision == "fp16",
        )
        if self.uses_lookbehind:
            validate_settings(**config.lookbehind_kwargs(self.args.max_grad_norm))
            check_base_optimizer_name(self.args.optim, config.lookbehind_method)
            if self.optimizer is not None:
                refuse_schedule_free(self.optimizer)
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.args.world_size == 1:
            raise ValueError(
                f"launched as {launched} processes (WORLD_SIZE={launched}), but the Trainer "
                "set itself up as a single process, so every process would train on the whole "
                "dataset on its own. On a machine without GPUs pass --use_cpu (DDP over gloo); "
                "otherwise check that every process sees its GPU."
            )

    # -------------------------------------------------------------------------- optimizer
    @property
    def uses_lookbehind(self) -> bool:
        return self.lookbehind_config.lookbehind_method != "none"

    @property
    def lookbehind(self) -> _TrainerLookbehind | None:
        """The engine, once the optimizer exists."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        return optimizer if isinstance(optimizer, _TrainerLookbehind) else None

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Every parameter with ``--decay_all_parameters`` (the paper's public code); otherwise
        the Trainer's choice, which exempts biases and LayerNorm/RMSNorm parameters."""
        if self.lookbehind_config.decay_all_parameters:
            return [name for name, _ in model.named_parameters()]
        return super().get_decay_parameter_names(model)

    def create_optimizer(self, model: nn.Module | None = None) -> torch.optim.Optimizer:
        """The Trainer's optimizer (built from ``--optim`` or passed in ``optimizers``),
        wrapped in the Lookbehind engine as its base optimizer. A later ``train()`` on the same
        Trainer gets the engine itself back, unwrapped from the accelerator's optimizer of the
        earlier run, so that it is neither wrapped twice nor rebuilt."""
        engine = self.lookbehind
        if engine is not None:
            self.optimizer = engine
            return engine
        base = super().create_optimizer(model)
        if not self.uses_lookbehind or isinstance(base, Lookbehind):
            return base
        refuse_schedule_free(base)
        grouped = any("asam_scale" in group for group in base.param_groups)
        config = self.lookbehind_config
        if config.perturbation == "asam" and config.asam_weights_only and not grouped:
            if self.lr_scheduler is not None:
                raise ValueError(
                    "--asam_weights_only regroups the optimizer's parameters, which the "
                    "scheduler passed in `optimizers` was built on: give the optimizer groups "
                    "with 'asam_scale' (hf_lookbehind.asam_param_groups) or set "
                    "--asam_weights_only false"
                )
            _split_for_asam(base, self.model)
        self.optimizer = _TrainerLookbehind(
            base,
            model=self.model,
            method_window=config.method_window(),
            **config.lookbehind_kwargs(self.args.max_grad_norm),
        )
        return self.optimizer

    # --------------------------------------------------------------------------- training
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(
            epoch_iterator, num_batches, device
        )
        self._window = batch_samples
        return batch_samples, num_items_in_batch

    def _take_over_grad_scaler(self, engine: _TrainerLookbehind) -> None:
        """Every pass must go through the GradScaler, so the engine drives it and the
        accelerate-wrapped optimizer's own scaler step is switched off."""
        scaler = getattr(self.optimizer, "scaler", None)
        if scaler is not None:
            engine.drive_grad_scaler(scaler)
            self.optimizer.scaler = None

    def training_step(
        self,
        model: nn.Module,
        inputs: dict[str, torch.Tensor | Any],
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor:
        engine = self.lookbehind
        if engine is None:
            return super().training_step(model, inputs, num_items_in_batch)
        # The accumulation window the Trainer fetched for this step (a call from outside the
        # training loop is a window of its own).
        window = self._window if any(inputs is m for m in self._window) else [inputs]
        if inputs is not window[-1]:
            # Earlier micro-batches of the window: replayed by every pass of the last call.
            return torch.zeros((), device=self.args.device)
        self._window = []
        self._take_over_grad_scaler(engine)
        engine.follow_method_window(self.state.epoch or 0.0)
        model.train()  # the reference runs in the mode the trainer's own step sets
        reference = ReferenceInBatch(self)
        prepared = [reference.added_to(self._prepare_inputs(batch)) for batch in window]
        passes = StepPasses(
            self, self.first_pass_records, FrozenForwards(frozen_modules(self, engine))
        )
        closures = self._pass_closures(model, engine, passes, window, prepared, num_items_in_batch)
        with passes.frozen.installed(), reference.taken_from_batch():
            loss = engine.run_pass_closures(closures)
        self._count_extra_passes(passes)
        return loss.detach()

    def _pass_closures(self, model, engine, passes: StepPasses, window, prepared, num_items):
        """The closure that runs one pass over the whole window, or for m-SAM one closure per
        micro-batch (no all-reduce); ``window`` holds the micro-batches as the Trainer fetched
        them (counted for the FLOs), ``prepared`` as every pass gets them."""
        if engine.settings["micro_batch_ascent"]:
            return [
                passes.closure(self._micro_batch_pass(model, batch, num_items), [fetched])
                for batch, fetched in zip(prepared, window)
            ]
        return passes.closure(self._window_pass(model, engine, prepared, num_items), window)

    def _window_pass(self, model: nn.Module, engine, window, num_items_in_batch) -> Closure:
        def closure() -> torch.Tensor:
            total = torch.zeros((), device=self.args.device)
            for index, micro_batch in enumerate(window):
                all_reduce = index == len(window) - 1 and not engine._per_device_ascent
                sync = contextlib.nullcontext() if all_reduce else self.accelerator.no_sync(model)
                with sync:
                    total = total + super(LookbehindMixin, self).training_step(
                        model, micro_batch, num_items_in_batch
                    )
            return total

        return closure

    def _micro_batch_pass(self, model: nn.Module, micro_batch, num_items_in_batch) -> Closure:
        def closure() -> torch.Tensor:
            with self.accelerator.no_sync(model):
                return super(LookbehindMixin, self).training_step(
                    model, micro_batch, num_items_in_batch
                )

        return closure

    def _count_extra_passes(self, passes: StepPasses) -> None:
        """The Trainer counts the FLOs of one pass per micro-batch; add the step's others."""
        for micro_batches, extra in passes.extra_passes():
            flos = sum(float(self.floating_point_ops(batch)) for batch in micro_batches)
            self.current_flos += extra * flos

    # -------------------------------------------------------------------------- checkpoints
    @property
    def saves_optimizer_shards(self) -> bool:
        """Under FSDP2 every process saves and loads its own shard of the engine's state (base
        optimizer state, mid-cycle buffers, run state) in ``OPTIMIZER_SHARD``. The Trainer's
        own FSDP path loads through ``torch.distributed.checkpoint``'s
        ``set_optimizer_state_dict``, whose template comes from a ``step(closure=None)`` that
        the engine does not run, so it cannot load the base optimizer's state or the buffers."""
        return self.is_fsdp_enabled and self.lookbehind is not None

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> TrainOutput:
        """The Trainer's ``train()``. ``resume_from_checkpoint=True`` takes the newest
        checkpoint whose saving finished; a checkpoint is checked before any work (see
        :func:`check_checkpoint`)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = newest_complete_checkpoint(self.args.output_dir)
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            model = None if self.is_fsdp_enabled else self.model
            check_checkpoint(str(resume_from_checkpoint), model)
        output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)
        self._report_an_open_last_cycle()
        return output

    def _announce_an_open_last_cycle(self, max_steps: int) -> None:
        """Before training: in switching and lookahead mode, the inner steps after the last
        complete cycle never reach the slow weights that the final model holds."""
        engine = self.lookbehind
        if engine is None or engine.method_window is not None or not cycles(engine.settings):
            return
        left = (engine.cycle_position + max_steps - self.state.global_step) % engine.k
        if left:
            folded = max_steps - left
            logger.warning(
                "with max_steps=%d, the cycles of k=%d inner steps end at step %d: the last %d "
                "inner steps will not reach the slow weights, so the final model will hold the "
                "slow weights of step %d; set max_steps to %d or %d to fold every step in",
                max_steps,
                engine.k,
                folded,
                left,
                folded,
                folded,
                folded + engine.k,
            )

    def _report_an_open_last_cycle(self) -> None:
        engine = self.lookbehind
        if engine is None or engine.cycle_position == 0:
            return
        logger.warning(
            "the final model holds the slow weights of the last complete cycle of k=%d inner "
            "steps; the last %d inner steps were not folded in (they stay in the optimizer "
            "state, so a run resumed from a checkpoint of this step completes the cycle)",
            engine.k,
            engine.cycle_position,
        )

    def _optimizer_file(self, checkpoint: str) -> str:
        if self.saves_optimizer_shards:
            return os.path.join(checkpoint, OPTIMIZER_SHARD.format(rank=self.args.process_index))
        return os.path.join(checkpoint, OPTIMIZER_NAME)

    def _read_optimizer_state(self, path: str) -> dict[str, Any] | None:
        """The optimizer state in ``path``; None if the file is missing and nothing but the base
        optimizer's state is lost without it (no Lookbehind cycle was open)."""
        if os.path.isfile(path):
            if self.saves_optimizer_shards:
                return load_checkpoint_file(path)
            on_device = self.args.world_size > 1 and self.args.device.type != "cpu"
            return load_checkpoint_file(path, self.args.device if on_device else "cpu")
        if self.saves_optimizer_shards:
            raise FileNotFoundError(
                f"{path} not found: a FSDP2 checkpoint of LookbehindTrainer resumes with the "
                "number of processes that wrote it (one optimizer shard per process)"
            )
        self._refuse_an_open_cycle(path)
        logger.warning(
            "%s is missing: resuming with a new base optimizer, whose state (momentum, Adam's "
            "moments) starts anew, as do the engine's counters (gradient_computations, "
            "skipped_steps)",
            path,
        )
        return None

    def _refuse_an_open_cycle(self, optimizer_file: str) -> None:
        """Without the optimizer file, ``global_step`` of ``trainer_state.json`` tells whether the
        checkpoint cut a Lookbehind cycle, whose fast and perturbed weights were in that file."""
        engine = self.lookbehind
        if engine is None:
            return
        if engine.method_window is not None and cycles(engine.method_window.inside):
            raise ValueError(
                f"{optimizer_file} is missing, and with --lookbehind_start_epoch/"
                "--lookbehind_end_epoch the step count does not tell whether the checkpoint "
                "cut a Lookbehind cycle; restore the file, or resume from an earlier checkpoint"
            )
        step = self.state.global_step
        position = step % engine.k if cycles(engine.settings) else 0
        if position:
            raise ValueError(
                f"{optimizer_file} is missing, but the checkpoint (global_step {step} in "
                f"{TRAINER_STATE_NAME}) is {position} of {engine.k} inner steps into a Lookbehind "
                "cycle, whose fast and perturbed weights were in that file; restore it, or resume "
                f"from a checkpoint at a cycle boundary (a global_step that is a multiple of "
                f"{engine.k})"
            )

    def _load_scheduler(self, path: str) -> None:
        """The schedule of ``path``; without the file, the new schedule stepped once per step
        of ``trainer_state.json``'s ``global_step`` (as the Trainer steps it)."""
        if os.path.isfile(path):
            self.lr_scheduler.load_state_dict(load_checkpoint_file(path))
            return
        if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise FileNotFoundError(
                f"{path} is missing, and a reduce-on-plateau schedule cannot be rebuilt from the "
                "step count; restore the file, or resume from an earlier checkpoint"
            )
        steps = self.state.global_step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
            for _ in range(steps):
                self.lr_scheduler.step()
        logger.warning(
            "%s is missing: the learning-rate schedule was rebuilt by stepping it %d times "
            "(global_step in %s)",
            path,
            steps,
            TRAINER_STATE_NAME,
        )

    def _follow_scheduler(self) -> None:
        """A new base optimizer starts at the learning rates of the resumed schedule."""
        for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
            group["lr"] = lr

    def _load_optimizer_state(self, path: str, state_dict: dict[str, Any]) -> None:
        """Load ``state_dict`` (read from ``path``); ``--lookbehind_method none`` drops the
        entries of a Lookbehind checkpoint (the model file holds the slow weights)."""
        if self.lookbehind is None:
            state_dict, dropped = without_lookbehind_entries(state_dict)
            if dropped:
                logger.warning(
                    "%s was written by the Lookbehind engine; --lookbehind_method none drops "
                    "its entries %s and keeps the base optimizer's state (the model file holds "
                    "the slow weights)",
                    path,
                    ", ".join(dropped),
                )
        elif saved_config(state_dict) is None:
            logger.warning(
                "%s was written without the Lookbehind engine: the engine starts its first "
                "cycle here, with the base optimizer's state",
                path,
            )
        try:
            self.optimizer.load_state_dict(state_dict)
        except ValueError as error:
            raise ValueError(
                f"{path} does not fit this run: {error}; resume with the settings it was "
                "written with, or start a new run"
            ) from error

    # ---------------------------------------------------------------------------- logging
    @property
    def gradient_computations(self) -> int:
        """Forward/backward passes over the batch so far (Table 10): the engine's count, which
        resumes with the optimizer state; one per step for the base optimizer alone."""
        engine = self.lookbehind
        if engine is not None:
            return engine.gradient_computations
        return 0 if self.uses_lookbehind else self.state.global_step

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Every entry, evaluation included, gets ``gradient_computations``; training entries
        also get the engine's diagnostics."""
        engine = self.lookbehind
        if engine is not None and "loss" in logs:
            logs.update(engine.stats().logs())
        logs["gradient_computations"] = self.gradient_computations
        super().log(logs, start_time)

    # ------------------------------------- overrides of private Trainer methods (transformers 5.x)
    def _prepare_for_training(self, max_steps: int, train_dataloader, resume_from_checkpoint):
        prepared = super()._prepare_for_training(
            max_steps, train_dataloader, resume_from_checkpoint
        )
        self._announce_an_open_last_cycle(max_steps)  # the checkpoint's cycle is loaded now
        return prepared

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        if not self.saves_optimizer_shards:
            super()._save_optimizer_and_scheduler(output_dir)
            return
        # The Trainer's FSDP save goes through torch.distributed.checkpoint, which takes only
        # per-parameter entries; the engine's own shard file holds everything.
        with self.lookbehind.per_parameter_state_dict():
            super()._save_optimizer_and_scheduler(output_dir)
        torch.save(self.lookbehind.state_dict(), self._optimizer_file(output_dir))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """Where the Trainer would skip a missing optimizer or scheduler file (and with it the
        other one): refuse if the checkpoint cut a Lookbehind cycle, else load what is there and
        say what starts anew; a truncated file is named."""
        if checkpoint is None or (self.is_fsdp_enabled and not self.saves_optimizer_shards):
            return super()._load_optimizer_and_scheduler(checkpoint)
        optimizer_file = self._optimizer_file(checkpoint)
        state_dict = self._read_optimizer_state(optimizer_file)
        self._load_scheduler(os.path.join(checkpoint, SCHEDULER_NAME))
        if state_dict is None:
            self._follow_scheduler()
        else:
            self._load_optimizer_state(optimizer_file, state_dict)

    def _clip_grad_norm(self, model: nn.Module):
        engine = self.lookbehind
        if engine is None:
            return super()._clip_grad_norm(model)
        return engine.last_descent_grad_norm  # the engine clipped every descent already

    def _get_grad_norm(self, model: nn.Module, grad_norm=None):
        engine = self.lookbehind
        if engine is None:
            return super()._get_grad_norm(model, grad_norm)
        return engine.last_descent_grad_norm


class LookbehindTrainer(LookbehindMixin, Trainer):
    """``transformers.Trainer`` with Lookbehind-SAM/ASAM and its baselines: takes
    :class:`LookbehindTrainingArguments`, or ``TrainingArguments`` and
    ``lookbehind=LookbehindConfig(...)``; everything else is the Trainer's."""
