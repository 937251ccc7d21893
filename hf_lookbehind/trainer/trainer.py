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

The pass protocol. With ``gradient_accumulation_steps`` n, the Trainer calls ``training_step``
once per micro-batch of the step's window (fetched beforehand by ``get_batch_samples``, the
first n - 1 calls inside ``no_sync``). Every call but the last returns a zero loss and does
nothing; the last runs the whole step: each forward/backward pass the engine asks for replays
all n micro-batches through the trainer's own ``training_step`` (all-reduce only on the last
micro-batch of a pass, none with per-device ascent), so every pass sees the gradient of the
whole accumulated batch, and the step's loss is that of the first pass. The Trainer's
``optimizer.step()`` afterwards is a no-op (:class:`~.engine.TrainerEngine`), and its gradient
clipping is the engine's, applied to every descent. With ``ascent_sync="per_micro_batch"``
(m-SAM) each micro-batch is a closure of its own, passed through ``step_micro_batches``.
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
import dataclasses
import logging
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from ..engine import Closure, Lookbehind, refuse_schedule_free
from .config import (
    LookbehindConfig,
    LookbehindTrainingArguments,
    check_base_optimizer_name,
    check_sharding,
    lookbehind_config,
    rebuilt_arguments_message,
    refuse_regenerated_batches,
)
from .engine import TrainerEngine, split_for_asam, taken_over
from .passes import FrozenForwards, ReferenceInBatch, StepPasses, frozen_modules
from .resume import CheckpointResume

logger = logging.getLogger(__name__)


def evaluation_prefix(logs: dict[str, float]) -> str:
    """``"eval_"`` (or the evaluation's own ``metric_key_prefix``) for an evaluation's log entry,
    which carries ``<prefix>_runtime``; ``""`` for any other entry."""
    for key in logs:
        if key.endswith("_runtime") and key != "train_runtime":
            return key[: -len("runtime")]
    return ""


class LookbehindMixin(CheckpointResume):
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
        built = isinstance((kwargs.get("optimizers") or (None,))[0], Lookbehind)
        self.lookbehind_config = lookbehind_config(self.args, lookbehind, type(self), built)
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
            config.lookbehind_settings.clipped(self.args.max_grad_norm)
            check_base_optimizer_name(self.args.optim, config.lookbehind_method)
            if self.optimizer is not None:
                refuse_schedule_free(self.optimizer)
        if config.ascent_sync == "per_device" and self.args.world_size == 1:
            logger.warning(
                "--ascent_sync per_device has no effect in one process: the process's own "
                "gradient is the batch's, so the run is --ascent_sync global"
            )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.args.world_size == 1:
            raise ValueError(
                f"launched as {launched} processes (WORLD_SIZE={launched}), but the Trainer "
                "set itself up as a single process, so every process would train on the whole "
                "dataset on its own. On a machine without GPUs pass --use_cpu (DDP over gloo); "
                "otherwise check that every process sees its GPU."
            )

    def _hp_search_setup(self, trial: Any) -> None:
        """A hyper-parameter search trial sets the Lookbehind flags of its parameters (``rho``,
        ``lookbehind_alpha``, ...) on the Lookbehind settings, whichever object holds them;
        the Trainer sets the others on its arguments. The trial's engine is built from them."""
        if trial is None:
            return super()._hp_search_setup(trial)
        names = {flag.name for flag in dataclasses.fields(LookbehindConfig)}
        hp_space, taken = self.hp_space, {}

        def without_lookbehind_flags(params: dict[str, Any]) -> dict[str, Any]:
            taken.update({key: value for key, value in params.items() if key in names})
            return {key: value for key, value in params.items() if key not in names}

        if isinstance(trial, dict):  # ray and wandb hand over the parameters themselves
            trial = without_lookbehind_flags(trial)
        elif trial is not None and hp_space is not None:
            self.hp_space = lambda optuna_trial: without_lookbehind_flags(hp_space(optuna_trial))
        try:
            super()._hp_search_setup(trial)
        finally:
            self.hp_space = hp_space
        if taken:
            self.lookbehind_config.apply_flags(taken)

    # -------------------------------------------------------------------------- optimizer
    @property
    def uses_lookbehind(self) -> bool:
        return self.lookbehind_config.lookbehind_method != "none"

    @property
    def lookbehind(self) -> TrainerEngine | None:
        """The engine, once the optimizer exists."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        return optimizer if isinstance(optimizer, TrainerEngine) else None

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
        if isinstance(base, Lookbehind):  # built by the user: its own settings train
            self.optimizer = taken_over(
                base, self.lookbehind_config, self.args.max_grad_norm, self.model
            )
            return self.optimizer
        if not self.uses_lookbehind:
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
            split_for_asam(base, self.model)
        self.optimizer = TrainerEngine(
            base,
            model=self.model,
            method_window=config.method_window(),
            settings=config.lookbehind_settings.clipped(self.args.max_grad_norm),
        )
        return self.optimizer

    # --------------------------------------------------------------------------- training
    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items_in_batch = super().get_batch_samples(
            epoch_iterator, num_batches, device
        )
        self._window = batch_samples
        return batch_samples, num_items_in_batch

    def _take_over_grad_scaler(self, engine: TrainerEngine) -> None:
        """Every pass must go through the GradScaler, so the engine drives it and the
        accelerate-wrapped optimizer's own scaler step is switched off."""
        scaler = getattr(self.optimizer, "scaler", None)
        if scaler is not None:
            engine.grad_scaler = scaler
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
        if engine.settings.micro_batch_ascent:
            return [
                passes.closure(self._micro_batch_pass(model, batch, num_items), [fetched])
                for batch, fetched in zip(prepared, window)
            ]
        return passes.closure(self._window_pass(model, engine, prepared, num_items), window)

    def _window_pass(self, model: nn.Module, engine, window, num_items_in_batch) -> Closure:
        def closure() -> torch.Tensor:
            total = torch.zeros((), device=self.args.device)
            for index, micro_batch in enumerate(window):
                all_reduce = index == len(window) - 1 and not engine.per_device_ascent
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

    def _prepare_for_training(self, max_steps: int, train_dataloader, resume_from_checkpoint):
        prepared = super()._prepare_for_training(
            max_steps, train_dataloader, resume_from_checkpoint
        )
        window = self.lookbehind_config.method_window()
        epochs = self.state.num_train_epochs
        if window is not None and epochs and window.start_epoch >= epochs:
            logger.warning(
                "the run ends within %s epochs, before --lookbehind_start_epoch %s: it trains "
                "with --baseline_method %s throughout",
                epochs,
                window.start_epoch,
                self.lookbehind_config.baseline_method,
            )
        return prepared

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
        """Every entry gets the count: an evaluation's (it has ``<prefix>_runtime``) as
        ``<prefix>_gradient_computations``, which loggers that file keys by prefix
        (TensorBoard's ``eval/``) keep with the evaluation, any other as
        ``gradient_computations``. Training entries also get the engine's diagnostics."""
        engine = self.lookbehind
        if engine is not None and "loss" in logs:
            logs.update(engine.stats().logs())
        logs[f"{evaluation_prefix(logs)}gradient_computations"] = self.gradient_computations
        super().log(logs, start_time)

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
