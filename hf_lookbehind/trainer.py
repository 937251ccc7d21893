"""``LookbehindTrainer``: a drop-in ``transformers.Trainer`` that trains with Lookbehind-SAM.

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
import os
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from transformers import Trainer
from transformers.trainer import SCHEDULER_NAME

from .method_window import MethodWindow
from .multi_tensor import global_norm, zero_nonfinite_
from .optimizer import CONFIG, CheckedGradients, Lookbehind
from .training_args import LookbehindTrainingArguments, check_sharding

LOCAL_GRAD = "lookbehind_local_grad"
OPTIMIZER_SHARD = "lookbehind_optimizer_rank{rank}.pt"


class _TrainerLookbehind(Lookbehind):
    """The engine as the Trainer drives it: passes go through the accelerator's GradScaler,
    ``ascent_sync="per_device"`` perturbs with each process's own gradient, and the Trainer's
    own ``optimizer.step()`` after the step is a no-op."""

    def __init__(
        self,
        *args: Any,
        ascent_sync: str = "global",
        method_window: MethodWindow | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(*args, **kwargs)
        self.ascent_sync = ascent_sync
        self.method_window = method_window
        self.grad_scaler: torch.amp.GradScaler | None = None

    @property
    def per_device_ascent(self) -> bool:
        return (
            self.ascent_sync == "per_device"
            and dist.is_available()
            and dist.is_initialized()
            and dist.get_world_size() > 1
        )

    def step(self, closure=None):  # type: ignore[override]
        if closure is None:  # the Trainer's optimizer.step(): the work is done already
            return None
        return super().step(closure)

    def follow_method_window(self, epoch: float) -> None:
        """Switch to the phase of ``epoch`` (Sec. 5.4); in switching and lookahead mode only
        once the current cycle is complete, so a switch never cuts an outer step."""
        if self.method_window is None or self.cycle_position != 0:
            return
        phase = self.method_window.settings_at(epoch)
        if any(getattr(self, key) != value for key, value in phase.items()):
            self.reconfigure(**phase)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """With a method window, a checkpoint may come from either phase: take its setup first,
        so that its mid-cycle buffers resume exactly."""
        saved = state_dict["param_groups"][0].get(CONFIG)
        if self.method_window is not None and saved is not None:
            phase = self.method_window.phase_of(saved)
            if phase is not None:
                self.reconfigure(**phase)
        super().load_state_dict(state_dict)

    def after_backward(self) -> None:
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            self.grad_scaler.unscale_(self.base_optimizer)
            self.grad_scaler.update()
        if self.per_device_ascent:
            self._keep_local_and_average_gradients()

    def _keep_local_and_average_gradients(self) -> None:
        """Per-device ascent (m-SAM, m = per-device batch): the pass ran without DDP's
        all-reduce; keep this process's gradient for the ascent (one extra parameter-sized
        buffer) and average the gradients over the processes for the descent."""
        params, grads, _ = self.gradients()
        for p, grad in zip(params, grads):
            if LOCAL_GRAD not in self.lookbehind_state[p]:
                self.lookbehind_state[p][LOCAL_GRAD] = torch.empty_like(grad)
        torch._foreach_copy_([self.lookbehind_state[p][LOCAL_GRAD] for p in params], grads)
        world_size = dist.get_world_size()
        handles = [dist.all_reduce(grad, async_op=True) for grad in grads]
        for handle in handles:
            handle.wait()
        torch._foreach_div_(grads, float(world_size))

    def synchronize_gradient_sums(self, sums: list[torch.Tensor]) -> None:
        """m-SAM under DDP: every process ran its micro-batches without all-reduce; average the
        gradient sums over the processes, and skip the step everywhere if any process saw a
        non-finite gradient (its own sums were zeroed from that pass on)."""
        if not (dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return
        flag = self.nonfinite_flag.to(torch.int32)
        handles = [dist.all_reduce(t, async_op=True) for t in sums]
        handles.append(dist.all_reduce(flag, op=dist.ReduceOp.MAX, async_op=True))
        for handle in handles:
            handle.wait()
        torch._foreach_div_(sums, float(dist.get_world_size()))
        self.nonfinite_flag.copy_(flag.bool())

    def ascent_gradients(self, checked: CheckedGradients) -> CheckedGradients:
        if not self.per_device_ascent:
            return checked
        local = [self.lookbehind_state[p][LOCAL_GRAD] for p in checked.params]
        zero_nonfinite_(local, self.keep_factor(local[0].dtype))  # bad anywhere: averaged too
        return checked._replace(grads=local, norm=global_norm(local))


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


class LookbehindTrainer(Trainer):
    """``transformers.Trainer`` with Lookbehind-SAM/ASAM and its baselines.

    Takes a :class:`LookbehindTrainingArguments`; everything else is the Trainer's. The
    optimizer the Trainer builds (``--optim``, or ``optimizers=(optimizer, scheduler)``) becomes
    the base optimizer of :class:`hf_lookbehind.Lookbehind`.
    """

    args: LookbehindTrainingArguments

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not isinstance(self.args, LookbehindTrainingArguments):
            raise TypeError(
                "LookbehindTrainer needs LookbehindTrainingArguments, got "
                f"{type(self.args).__name__}"
            )
        fsdp_plugin = getattr(self.accelerator.state, "fsdp_plugin", None)
        check_sharding(  # also catches FSDP/DeepSpeed set up by the accelerate config
            deepspeed=self.is_deepspeed_enabled or self.is_fsdp_xla_enabled,
            fsdp_version=None if fsdp_plugin is None else getattr(fsdp_plugin, "fsdp_version", 1),
            ascent_sync=self.args.ascent_sync,
            fp16=self.accelerator.mixed_precision == "fp16",
        )
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > 1 and self.args.world_size == 1:
            raise ValueError(
                f"launched as {launched} processes (WORLD_SIZE={launched}), but the Trainer "
                "set itself up as a single process, so every process would train on the whole "
                "dataset on its own. On a machine without GPUs pass --use_cpu (DDP over gloo); "
                "otherwise check that every process sees its GPU."
            )
        self._window: list[dict[str, Any]] = []

    # -------------------------------------------------------------------------- optimizer
    @property
    def uses_lookbehind(self) -> bool:
        return self.args.lookbehind_method != "none"

    @property
    def lookbehind(self) -> _TrainerLookbehind | None:
        """The engine, once the optimizer exists."""
        optimizer = getattr(self.optimizer, "optimizer", self.optimizer)  # accelerate wraps it
        return optimizer if isinstance(optimizer, _TrainerLookbehind) else None

    def get_decay_parameter_names(self, model: nn.Module) -> list[str]:
        """Every parameter with ``--decay_all_parameters`` (the paper's public code); otherwise
        the Trainer's choice, which exempts biases and LayerNorm/RMSNorm parameters."""
        if self.args.decay_all_parameters:
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
        grouped = any("asam_scale" in group for group in base.param_groups)
        if self.args.perturbation == "asam" and self.args.asam_weights_only and not grouped:
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
            ascent_sync=self.args.ascent_sync,
            method_window=self.args.method_window(),
            **self.args.lookbehind_kwargs(),
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
        window = [self._prepare_inputs(micro_batch) for micro_batch in window]

        if engine.micro_batch_ascent:  # m-SAM: one closure per micro-batch, no all-reduce
            closures = [
                self._micro_batch_closure(model, micro_batch, num_items_in_batch)
                for micro_batch in window
            ]
            return engine.step(closures).detach()

        def closure() -> torch.Tensor:
            total = torch.zeros((), device=self.args.device)
            for index, micro_batch in enumerate(window):
                all_reduce = index == len(window) - 1 and not engine.per_device_ascent
                sync = contextlib.nullcontext() if all_reduce else self.accelerator.no_sync(model)
                with sync:
                    total = total + super(LookbehindTrainer, self).training_step(
                        model, micro_batch, num_items_in_batch
                    )
            return total

        loss = engine.step(closure)
        return loss.detach()

    def _micro_batch_closure(self, model: nn.Module, micro_batch, num_items_in_batch):
        def closure() -> torch.Tensor:
            with self.accelerator.no_sync(model):
                return super(LookbehindTrainer, self).training_step(
                    model, micro_batch, num_items_in_batch
                )

        return closure

    # --------------------------------------------------------------- FSDP2 checkpoints
    @property
    def saves_optimizer_shards(self) -> bool:
        """Under FSDP2 every process saves and loads its own shard of the engine's state (base
        optimizer state, mid-cycle buffers, run state) in ``OPTIMIZER_SHARD``. The Trainer's
        own FSDP path loads through ``torch.distributed.checkpoint``'s
        ``set_optimizer_state_dict``, whose template comes from a ``step(closure=None)`` that
        the engine does not run, so it cannot load the base optimizer's state or the buffers."""
        return self.is_fsdp_enabled and self.lookbehind is not None

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        super()._save_optimizer_and_scheduler(output_dir)
        if self.saves_optimizer_shards:
            shard = OPTIMIZER_SHARD.format(rank=self.args.process_index)
            torch.save(self.lookbehind.state_dict(), os.path.join(output_dir, shard))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        if checkpoint is None or not self.saves_optimizer_shards:
            return super()._load_optimizer_and_scheduler(checkpoint)
        shard = os.path.join(checkpoint, OPTIMIZER_SHARD.format(rank=self.args.process_index))
        if not os.path.isfile(shard):
            raise FileNotFoundError(
                f"{shard} not found: a FSDP2 checkpoint of LookbehindTrainer resumes with the "
                "number of processes that wrote it (one optimizer shard per process)"
            )
        self.lookbehind.load_state_dict(torch.load(shard, weights_only=True))
        scheduler = torch.load(os.path.join(checkpoint, SCHEDULER_NAME), weights_only=True)
        self.lr_scheduler.load_state_dict(scheduler)

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
            logs.update(lookbehind_metrics(engine))
        logs["gradient_computations"] = self.gradient_computations
        super().log(logs, start_time)


def lookbehind_metrics(engine: Lookbehind) -> dict[str, float]:
    """The engine's diagnostics as floats (host reads: call at logging time only)."""
    metrics = {}
    if engine.last_alpha is not None:
        metrics["lookbehind_alpha"] = engine.last_alpha.float().mean().item()
    if engine.last_ascent_grad_norm is not None:
        metrics["ascent_grad_norm"] = engine.last_ascent_grad_norm.item()
    if engine.last_perturbation_distance is not None:
        metrics["perturbation_distance"] = engine.last_perturbation_distance.item()
    if engine.skipped_steps is not None:
        metrics["skipped_steps"] = int(engine.skipped_steps.item())
    return metrics
