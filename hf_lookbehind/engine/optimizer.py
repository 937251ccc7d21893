"""The Lookbehind optimizer wrapper (Algorithm 1 of Mordido et al., ICML 2024) and its baselines.

Notation: ``S`` slow weights, ``F`` fast weights, ``P`` perturbed weights, ``A`` the base
optimizer, ``g(w)`` the minibatch gradient at ``w``, ``eps(g, w)`` the SAM/ASAM ascent step.

``lookbehind`` (Algorithm 1)::

    P_0 = F_0 = S
    for i = 1..k:  P_i = P_{i-1} + eps(g(P_{i-1}), P_{i-1});  F_i = A(F_{i-1}, g(P_i))
    S <- S + alpha (F_k - S)          alpha static, or adaptive (eq. 7-8)

In same-batch mode one ``step()`` runs the whole outer step on one minibatch with k + 1
forward/backward passes: the gradient at ``P_i`` is both the descent gradient of inner step i
and the ascent gradient of inner step i + 1 (with dropout, the pair shares one mask where the
public code's 2k passes would draw two). In minibatch-switching mode (Sec. 6.2) one ``step()`` is
one inner step on a new minibatch (2 passes) and every k-th call updates ``S``. Baselines:
``sam`` (k = 1), ``multistep`` (k ascents, update ``S`` with the last gradient),
``multistep_avg`` (with the average of the k gradients), ``lookahead`` (Lookahead with SAM,
ASAM or no perturbation as inner optimizer, one inner step per call). The schedules are in
:mod:`~hf_lookbehind.engine.schedules`, the operations they call in
:mod:`~hf_lookbehind.engine.step`.

Memory and exactness: the model's parameters hold ``S`` between calls, in their own storage.
Inside a call the engine moves ``F`` and ``P`` in and out of the parameters by storage swaps,
so ``S`` and ``F`` never pass through an arithmetic round trip. Persistent extra buffers, in
parameter copies: 2 for lookbehind with static alpha, 3 with adaptive alpha, 1 for
sam/multistep, 2 for multistep_avg, 1 for lookahead without perturbation and 2 with. Nothing
in a step reads a tensor value on the host, and nothing in a step does Python work per
parameter tensor beyond a few attribute reads (see :mod:`~hf_lookbehind.engine.layout`).
"""

from __future__ import annotations

import dataclasses
import weakref
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from .batchnorm import RunningStatsGuard, batchnorm_modules
from .checkpoint import RUN_STATE, check_resumable, fresh_run_state, pack, unpack
from .diagnostics import BufferFootprint, LookbehindStats
from .distributed import world_size
from .hyperparameters import (
    ADAPTIVE_ALPHA,
    GROUP_KEYS,
    GROUP_SETTINGS,
    check_group,
    fill_groups,
    read_groups,
)
from .layout import Layout
from .perturbation import perturbation_for
from .schedules import micro_batch_ascent, schedule_for
from .settings import LookbehindSettings, refuse_schedule_free
from .sharding import local_shards
from .step import Closure, Step

# The engine wrapping each base optimizer: two engines on one would share its run state.
_ENGINES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class Lookbehind(torch.optim.Optimizer):
    """Lookbehind-SAM/ASAM and its baselines around any ``torch.optim.Optimizer``.

    Args:
        base_optimizer: the optimizer ``A`` that updates the fast weights (SGD, Adam, ...).
        settings: the setup as one :class:`~hf_lookbehind.LookbehindSettings`, or its fields
            as keyword arguments (``method``, ``k``, ``alpha``, ``adaptive_alpha``, ``rho``,
            ``perturbation``, ``asam_eta``, ``adaptive_scope``, ``minibatch_switching``,
            ``batchnorm_update``, ``max_grad_norm``, ``micro_batch_ascent``, ``ascent_sync``;
            each documented there). A setting the method does not read is refused.
        model: the model, needed only to control BatchNorm statistics: with it, only the first
            pass of each ``step()`` updates them (``batchnorm_update="first_pass"``, the
            default; ``every_pass`` is the public code's rule).
        grad_scaler: a ``torch.amp.GradScaler`` for fp16: the closure scales the loss, and the
            engine unscales every pass and updates the scale; an overflow skips the outer step.

    ``rho``, ``alpha`` and ``adaptive_alpha`` are the defaults of the parameter-group entries
    ``lookbehind_rho``, ``lookbehind_alpha`` and ``lookbehind_adaptive_alpha``: change them
    between steps as ``lr`` (see :mod:`~hf_lookbehind.engine.hyperparameters`).
    :meth:`load_state_dict` restores them as it restores ``lr``, except a setting changed since
    the checkpoint, which then applies to every group (logged). Under DDP and FSDP2 see
    :mod:`~hf_lookbehind.engine.distributed` and :mod:`~hf_lookbehind.engine.sharding`.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        settings: LookbehindSettings | None = None,
        *,
        model: nn.Module | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
        **setting_values: Any,
    ) -> None:
        if isinstance(base_optimizer, Lookbehind):
            raise TypeError(
                "base_optimizer is already a Lookbehind engine; wrap the plain optimizer (SGD, "
                "Adam, ...) once, and use reconfigure() to change the method"
            )
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer)}"
            )
        refuse_schedule_free(base_optimizer)
        if settings is not None and setting_values:
            raise TypeError("give the settings once: as a LookbehindSettings or as keywords")
        settings = settings if settings is not None else LookbehindSettings(**setting_values)
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model)}")
        if model is None and settings.batchnorm_update == "first_pass":
            raise ValueError(
                "batchnorm_update='first_pass' needs model=: the engine controls the BatchNorm "
                "layers of the model it is given (without a model every pass updates the "
                "running statistics)"
            )
        if model is not None and settings.batchnorm_update is None:
            settings = dataclasses.replace(settings, batchnorm_update="first_pass")
        if any(group.get("maximize", False) for group in base_optimizer.param_groups):
            raise ValueError("Lookbehind minimises; the base optimizer must not set maximize=True")
        if base_optimizer in _ENGINES:  # taken over: keep the groups' values this setup reads
            for group in base_optimizer.param_groups:
                for key, name in GROUP_SETTINGS.items():
                    if getattr(settings, name) is None:
                        group.pop(key, None)
        for index, group in enumerate(base_optimizer.param_groups):
            check_group(f"param_groups[{index}]", group, settings)

        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state
        self.base_optimizer = base_optimizer
        _ENGINES[base_optimizer] = weakref.ref(self)  # a newer engine takes it over
        self.state.pop(RUN_STATE, None)  # an earlier engine's run state is not this one's
        modules = batchnorm_modules(model)
        self._guard = RunningStatsGuard(modules) if modules else None
        self._grad_scaler = grad_scaler
        self._diagnostics: dict[str, torch.Tensor | None] = {}
        self._configure(settings, overwrite=())

    def _configure(self, settings: LookbehindSettings, overwrite: Sequence[str]) -> None:
        """Take ``settings``: the ascent, the run state's record, the groups' values; the
        buffers are released (the next step allocates what the setup needs)."""
        self._settings = settings
        none = settings.perturbation == "none"
        self._ascent = None if none else perturbation_for(settings.perturbation, settings.asam_eta)
        fresh_run_state(self.state.setdefault(RUN_STATE, {}), settings)
        self._prepare()
        self._buffers: dict[str, list[torch.Tensor]] = {}
        fill_groups(self.param_groups, settings, overwrite)
        read_groups(self.param_groups, settings, self._layout.group_of)

    def _prepare(self) -> None:
        """Prepare the per-tensor work (see :class:`~hf_lookbehind.engine.layout.Layout`)."""
        for group in self.param_groups:
            group.setdefault("asam_scale", True)
        self._layout = Layout(self.param_groups)

    # ------------------------------------------------------------------------ the setup
    @property
    def settings(self) -> LookbehindSettings:
        """The current setup. ``rho``, ``alpha`` and ``adaptive_alpha`` are the parameter
        groups' defaults; the groups hold the values in use."""
        return self._settings

    @property
    def cycle_position(self) -> int:
        """Inner steps done in the current outer step (always 0 in same-batch mode): between
        outer steps when 0, where the model holds the slow weights of a finished update."""
        return self.state[RUN_STATE]["cycle_position"]

    @property
    def gradient_computations(self) -> int:
        """Forward/backward passes over the batch so far (Table 10), a host count."""
        return self.state[RUN_STATE]["gradient_computations"]

    @property
    def last_descent_grad_norm(self) -> torch.Tensor | None:
        """``||g||`` of the last descent, before clipping (a 0-d device tensor)."""
        return self._diagnostics.get("descent_grad_norm")

    @property
    def per_device_ascent(self) -> bool:
        """Whether each process perturbs with its own gradient (``ascent_sync="per_device"``
        with more than one process): the closure must then run without all-reduce."""
        return self._settings.ascent_sync == "per_device" and world_size() > 1

    @property
    def grad_scaler(self) -> torch.amp.GradScaler | None:
        """The fp16 ``GradScaler`` every pass is unscaled with (and the scale updated), or
        None; set it to take over a scaler (the Trainer hands it the accelerator's)."""
        return self._grad_scaler

    @grad_scaler.setter
    def grad_scaler(self, grad_scaler: torch.amp.GradScaler | None) -> None:
        self._grad_scaler = grad_scaler

    def reconfigure(self, **changes: Any) -> None:
        """Switch to another setup between outer steps, keeping the base optimizer's state
        (Sec. 5.4: SAM/ASAM for some epochs, then Lookbehind, or the reverse): see
        :meth:`LookbehindSettings.changed`. ``rho``, ``alpha`` or ``adaptive_alpha`` given here
        apply to every group."""
        if self.cycle_position != 0:
            raise RuntimeError(
                f"reconfigure() between outer steps only: {self.cycle_position} of "
                f"{self._settings.k} inner steps of the current cycle are done"
            )
        overwrite = {GROUP_KEYS[name] for name in changes if name in GROUP_KEYS}
        if "alpha" in changes:
            overwrite.add(ADAPTIVE_ALPHA)  # a static alpha ends adaptive alpha
        self._configure(self._settings.changed(**changes), overwrite)

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "base_optimizer" not in self.__dict__:  # called by Optimizer.__init__
            return super().add_param_group(param_group)
        if self.cycle_position != 0:
            raise RuntimeError(
                f"add_param_group() between outer steps only: {self.cycle_position} of "
                f"{self._settings.k} inner steps of the current cycle are done, and the open "
                "cycle's buffers cover the parameters it started with; add the group when "
                "cycle_position is 0"
            )
        check_group("the new parameter group", param_group, self._settings)
        self.base_optimizer.add_param_group(param_group)
        self._prepare()
        self._buffers = {}
        read_groups(self.param_groups, self._settings, self._layout.group_of)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    # ------------------------------------------------------------------------ diagnostics
    def stats(self) -> LookbehindStats:
        """The diagnostics for a log, as host numbers (one read per value: a synchronisation on
        a GPU, so call it at logging time)."""

        def read(value: torch.Tensor | None) -> float | None:
            return None if value is None else value.float().mean().item()

        run, diagnostics = self.state[RUN_STATE], self._diagnostics
        skipped = run["skipped_steps"]
        return LookbehindStats(
            alpha=read(run["last_alpha"]),
            ascent_grad_norm=read(diagnostics.get("ascent_grad_norm")),
            perturbation_distance=read(diagnostics.get("perturbation_distance")),
            descent_grad_norm=read(diagnostics.get("descent_grad_norm")),
            skipped_steps=0 if skipped is None else int(skipped.item()),
            gradient_computations=run["gradient_computations"],
        )

    def buffer_footprint(self) -> BufferFootprint:
        """The persistent memory of the engine's buffers, in bytes and in copies of the
        parameters it optimizes."""
        held = [t for tensors in self._buffers.values() for t in tensors if t is not None]
        local, params = local_shards(held), local_shards(self._layout.params)
        return BufferFootprint(
            bytes=sum(t.numel() * t.element_size() for t in local),
            parameter_copies=sum(t.numel() for t in local) / max(sum(p.numel() for p in params), 1),
        )

    # ------------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict with the run state in ``state["lookbehind_run"]``,
        the hyper-parameters in the groups and, in the middle of a cycle, the cycle's buffers
        in the per-parameter entries (see :mod:`~hf_lookbehind.engine.checkpoint`)."""
        return pack(super().state_dict(), self._buffers, self.cycle_position)

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this engine, or of its base optimizer alone. The setup must
        match the checkpoint's: in the middle of a cycle exactly, between outer steps up to
        ``rho``, ``alpha``, ``adaptive_alpha``, ``max_grad_norm`` and ``batchnorm_update``,
        whose old and new values are logged."""
        changed = check_resumable(self._settings, state_dict, len(self._layout))
        base_state, buffers, run = unpack(state_dict)
        self.base_optimizer.load_state_dict(base_state)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.state[RUN_STATE] = fresh_run_state(run or {}, self._settings)
        self._prepare()
        params = self._layout.params
        self._buffers = {
            key: [by_index[i].to(device=p.device, dtype=p.dtype) for i, p in enumerate(params)]
            for key, by_index in buffers.items()
            if len(by_index) == len(params)
        }
        fill_groups(
            self.param_groups, self._settings, {GROUP_KEYS[n] for n in changed if n in GROUP_KEYS}
        )
        read_groups(self.param_groups, self._settings, self._layout.group_of)

    # ------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        """One step on one minibatch; ``closure`` computes the loss on it and calls
        ``backward()`` (the engine zeroes gradients itself). Returns the loss of the first pass,
        at the weights the parameters held on entry."""
        if closure is None:
            raise ValueError(
                "Lookbehind.step needs a closure that computes the loss on the minibatch and "
                "calls backward(); it runs it once per forward/backward pass"
            )
        if not callable(closure):
            raise TypeError(
                "step() takes one closure; m-SAM takes one per micro-batch: construct the engine "
                "with ascent_sync='per_micro_batch' and call step_micro_batches(closures)"
            )
        if self._settings.micro_batch_ascent:
            return self.step_micro_batches([closure])
        schedule = schedule_for(self._settings.method, self._settings.minibatch_switching)
        return self._run(lambda step: schedule(step, closure))

    @torch.no_grad()
    def step_micro_batches(self, closures: Sequence[Closure]) -> torch.Tensor:
        """m-SAM (``ascent_sync="per_micro_batch"``): one step on a batch given as
        micro-batches, one closure each (each closure's loss is its share of the batch loss);
        every micro-batch is perturbed with its own gradient and the descent uses the sum of
        their gradients (see
        :func:`~hf_lookbehind.engine.schedules.micro_batch_ascent`). Returns the summed loss of
        the first passes."""
        if not self._settings.micro_batch_ascent:
            raise ValueError(
                "step_micro_batches() is m-SAM: construct the engine with "
                "ascent_sync='per_micro_batch'"
            )
        closures = list(closures)
        if not closures or not all(callable(closure) for closure in closures):
            raise TypeError("step_micro_batches needs one or more closures, one per micro-batch")
        return self._run(lambda step: micro_batch_ascent(step, closures))

    def _run(self, schedule: Callable[[Step], torch.Tensor]) -> torch.Tensor:
        """Run one step's schedule so that every exit leaves the model at the slow weights: a
        skipped outer step restores the running statistics too, and an exception everything
        the step changed (see :mod:`~hf_lookbehind.engine.undo`)."""
        owner = _ENGINES.get(self.base_optimizer)
        if owner is None or owner() is not self:
            raise RuntimeError(
                "another Lookbehind engine was built on this engine's base optimizer and took "
                "over its run state; step with that engine, or give each engine its own base "
                "optimizer"
            )
        if not self._layout.current(self.param_groups):
            self._follow_changed_parameters()
        settings = self._settings
        step = Step(
            base=self.base_optimizer,
            layout=self._layout,
            buffers=self._buffers,
            run=self.state[RUN_STATE],
            settings=settings,
            values=read_groups(self.param_groups, settings, self._layout.group_of),
            ascent=self._ascent,
            guard=self._guard,
            freeze_later_passes=settings.batchnorm_update == "first_pass",
            grad_scaler=self._grad_scaler,
        )
        try:
            loss = schedule(step)
        except BaseException as error:
            step.undo.roll_back(self.base_optimizer, error)
            raise
        step.finish()
        self._diagnostics.update(step.diagnostics)
        return loss

    def _follow_changed_parameters(self) -> None:
        """The groups' parameter lists were replaced, or the parameters changed dtype or device
        since the last step (``model.double()``, ``model.to(...)``): prepare them anew; an
        open cycle's buffers follow them."""
        self._prepare()
        params = self._layout.params
        if self.cycle_position == 0:
            self._buffers.clear()
            return
        for tensors in self._buffers.values():
            tensors[:] = [
                None if t is None else t.to(device=p.device, dtype=p.dtype)
                for t, p in zip(tensors, params, strict=True)
            ]
