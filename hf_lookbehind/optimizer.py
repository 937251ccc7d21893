"""The Lookbehind optimizer wrapper (Algorithm 1 of Mordido et al., ICML 2024) and its baselines.

Notation: ``S`` slow weights, ``F`` fast weights, ``P`` perturbed weights, ``A`` the base
optimizer, ``g(w)`` the minibatch gradient at ``w``, ``eps(g, w)`` the SAM/ASAM ascent step.

``lookbehind`` (Algorithm 1)::

    P_0 = F_0 = S
    for i = 1..k:  P_i = P_{i-1} + eps(g(P_{i-1}), P_{i-1});  F_i = A(F_{i-1}, g(P_i))
    S <- S + alpha (F_k - S)          alpha static, or adaptive (eq. 7-8)

In same-batch mode one ``step()`` runs the whole outer step on one minibatch with k + 1
forward/backward passes: the gradient at ``P_i`` is both the descent gradient of inner step i
and the ascent gradient of inner step i + 1. With dropout all k + 1 passes draw their own masks,
so the pair (descent of step i, ascent of step i + 1) shares one mask, where the public code's
2k passes would draw two. In minibatch-switching mode (Sec. 6.2) one ``step()`` is one inner
step on a new minibatch (2 passes) and every k-th call updates ``S``.

Baselines: ``sam`` (k = 1), ``multistep`` (k ascent steps, update ``S`` with the last gradient),
``multistep_avg`` (update with the average of the k gradients at ``P_1..P_k``), ``lookahead``
(Lookahead with SAM, ASAM or no perturbation as inner optimizer, one inner step per call).

Memory and exactness: the model's parameters always hold ``S`` between calls. Inside a call the
engine moves ``F`` and ``P`` in and out of the parameters by storage swaps, so ``S`` and ``F``
never pass through an arithmetic round trip. Persistent extra buffers, in parameter copies:
2 for lookbehind with static alpha (``F`` and ``P``), 3 with adaptive alpha (``F_1``), 1 for
sam/multistep, 2 for multistep_avg (gradient sum), 1 for lookahead without perturbation and 2
with. Nothing in a step reads a tensor value on the host.

FSDP2 (parameters as ``DTensor`` shards, :mod:`hf_lookbehind.sharding`): the buffers are sharded
like the parameters, so each rank holds its share of them; swaps become exact value exchanges
of the local shards, and every norm and cosine is that of the whole tensors (per-shard partial
sums, one all-reduce). No step gathers a parameter.

Hyper-parameters and run state, as in ``torch.optim``: ``rho``, ``alpha`` and the adaptive-alpha
switch are entries of every parameter group (``lookbehind_rho``, ``lookbehind_alpha``,
``lookbehind_adaptive_alpha``), with the constructor's values as defaults, so a scheduler or a
training loop changes them between steps and the next step uses them (see :class:`Lookbehind`).
The run state (cycle position, counters, the setup a checkpoint records) lives in the
optimizer's ``state`` under ``"lookbehind_run"``.

Non-finite gradients: every pass checks the global gradient norm on the device. A NaN/inf in
any pass of an outer step (a cycle of k calls in switching and lookahead mode) discards the
outer step: ``S`` stays bit-identical and ``F``/``P`` restart from it, and
``skipped_steps`` counts it. From the bad pass on, gradients are zeroed: perturbations are
zero and the base optimizer sees finite zero-gradient updates, never NaN.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any, NamedTuple

import torch
from torch import nn

from ._schedules import BUFFERS, FAST, FIRST_FAST, PERTURBED, micro_batch_ascent, schedule_for
from .alpha import adaptive_alpha
from .batchnorm import RunningStatsGuard, batchnorm_modules, frozen_running_stats
from .distributed import agree_on_flag_, average_, world_size
from .multi_tensor import (
    copy_into_buffers,
    copy_values_,
    global_norm,
    per_tensor_norms,
    swap_storage,
    zero_nonfinite_,
)
from .perturbation import PERTURBATIONS, Perturbation, describe_perturbation, perturbation_for
from .settings import (
    ALPHA_METHODS,
    DEFAULT_ADAPTIVE_SCOPE,
    DEFAULT_ALPHA,
    applicable_settings,
    check_alpha_value,
    check_nonnegative,
    refuse_schedule_free,
    validate_settings,
)
from .sharding import local_shards

__all__ = ["BufferFootprint", "Lookbehind", "LookbehindStats"]

# Hyper-parameters kept in every parameter group: the setting each one gives a value to.
RHO = "lookbehind_rho"
ALPHA = "lookbehind_alpha"
ADAPTIVE_ALPHA = "lookbehind_adaptive_alpha"
GROUP_SETTINGS = {RHO: "rho", ALPHA: "alpha", ADAPTIVE_ALPHA: "adaptive_alpha"}
# Run state, kept in ``state[RUN_STATE]`` (and so in ``state_dict()["state"]``).
RUN_STATE = "lookbehind_run"
# Where older checkpoints kept the run state: entries of ``param_groups[0]``.
_GROUP_ZERO_RUN_STATE = {
    "lookbehind_cycle_position": "cycle_position",
    "lookbehind_cycle_nonfinite": "cycle_nonfinite",
    "lookbehind_skipped_steps": "skipped_steps",
    "lookbehind_last_alpha": "last_alpha",
    "lookbehind_gradient_computations": "gradient_computations",
    "lookbehind_config": "config",
}
# Which config entries a checkpoint must agree on to be resumed between outer steps (in the
# middle of a cycle, every entry must agree).
_FIXED_KEYS = (
    "method",
    "k",
    "minibatch_switching",
    "perturbation",
    "adaptive_scope",
    "micro_batch_ascent",
)

Closure = Callable[[], torch.Tensor]
# This process's own gradient, for per-device ascent.
LOCAL_GRAD = "lookbehind_local_grad"
_logger = logging.getLogger(__name__)


class CheckedGradients(NamedTuple):
    """The gradients of the last pass after the non-finite check: the parameters that received
    one, the gradients, each tensor's ASAM flag, and their global norm (a 0-d device tensor)."""

    params: list[torch.Tensor]
    grads: list[torch.Tensor]
    scaled: list[bool]
    norm: torch.Tensor


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


class Lookbehind(torch.optim.Optimizer):
    """Lookbehind-SAM/ASAM and its baselines around any ``torch.optim.Optimizer``.

    Args:
        base_optimizer: the optimizer ``A`` that updates the fast weights (SGD, Adam, ...).
        method: ``lookbehind``, ``sam``, ``multistep``, ``multistep_avg`` or ``lookahead``.
        k: inner steps per outer step (ascent steps for multistep); default 2, and 1 for sam.
        alpha: slow-weight step size in (0, 1] (default 0.5); lookbehind and lookahead only.
            ``"adaptive"`` is the deprecated spelling of ``adaptive_alpha=True``.
        adaptive_alpha: alpha by eq. 7-8 at every slow-weight update instead of the static
            alpha (default False; lookbehind only).
        rho: neighbourhood radius of the ascent step (default 0.05).
        perturbation: the ascent step: ``sam`` (eq. 3), ``asam`` (eq. 4), ``fisher``
            (Fisher-SAM), ``none`` (lookahead only), or any
            :class:`~hf_lookbehind.perturbation.Perturbation` (a SAM variant of your own).
        asam_eta: eta of ASAM's ``T = |w| + eta`` (default 0.01; ASAM only). Which tensors ASAM
            rescales is the ``asam_scale`` setting of each parameter group (default True; see
            :func:`hf_lookbehind.asam_param_groups` for the public ASAM code's grouping).
        adaptive_scope: ``per_tensor`` (default; one angle per tensor, the public code) or
            ``global``; adaptive alpha only.
        minibatch_switching: lookbehind only; one inner step per ``step()`` on a new minibatch.
        model: the model, needed only to control BatchNorm statistics.
        batchnorm_update: with ``model``, ``first_pass`` (default: only the first forward pass
            of each ``step()`` updates BatchNorm running statistics, which in same-batch mode is
            the pass at the slow weights that are evaluated) or ``every_pass`` (the public
            code). Without ``model`` the engine cannot reach BatchNorm: every pass updates, and
            asking for ``first_pass`` is an error.
        max_grad_norm: clip the global gradient norm of every descent update to this value
            (never the ascent direction); ``None`` does not clip.
        micro_batch_ascent: m-SAM (Table 9): :meth:`step_micro_batches` takes one closure per
            micro-batch, each perturbed with its own gradient; the descent uses the sum of their
            gradients. For ``sam`` and
            same-batch ``lookbehind``. Under DDP, run each micro-batch's closure without
            all-reduce (``model.no_sync()``): the engine averages the gradient sums.
        ascent_sync: ``global`` (default: the gradients a pass leaves are the ascent's) or
            ``per_device``: under DDP each process perturbs with its own gradient and descends
            with the average (m-SAM with m the per-process batch); the closure must run without
            all-reduce (``model.no_sync()``), and the engine averages (see
            :mod:`hf_lookbehind.distributed`).
        grad_scaler: a ``torch.amp.GradScaler`` for fp16: the closure scales the loss
            (``grad_scaler.scale(loss).backward()``), and the engine unscales every pass and
            updates the scale; an overflow skips the outer step. Do not call
            ``grad_scaler.step``/``update`` yourself.

    A setting given where the method does not read it is refused, so none is silently ignored.

    ``rho``, ``alpha`` and ``adaptive_alpha`` are the defaults of the parameter-group entries
    ``lookbehind_rho``, ``lookbehind_alpha`` and ``lookbehind_adaptive_alpha`` (a group of the
    base optimizer that already has one keeps its value). Change them between steps, by hand or
    from a schedule, as ``lr``: every step reads ``rho`` at each ascent, ``alpha`` at the
    slow-weight update, and the adaptive switch when an outer step begins (in switching and
    lookahead mode the switch applies from the next cycle). Per group: with ``rho_g`` the
    radius of group g, the ascent is ``eps_g = rho_g d_g / ||d||`` (SAM: ``d = g``), the norm
    still that of the whole model, so equal values give eq. 3/4 and a group with
    ``rho_g = 0`` is not perturbed; ``alpha_g`` is the step size of the group's slow weights.
    The adaptive switch must be the same in every group. :meth:`load_state_dict` restores the
    groups' values (scheduled ones included) as it restores ``lr``, except a constructor value
    changed since the checkpoint, which then applies to every group (logged).

    Public surface beyond ``torch.optim.Optimizer``: :meth:`step`, :meth:`step_micro_batches`,
    :meth:`stats`, :meth:`buffer_footprint`, :meth:`reconfigure`, :attr:`settings`,
    :attr:`cycle_position` and ``base_optimizer``.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        method: str = "lookbehind",
        k: int | None = None,
        alpha: float | str | None = None,
        adaptive_alpha: bool | None = None,
        rho: float | None = None,
        perturbation: str | Perturbation = "sam",
        asam_eta: float | None = None,
        adaptive_scope: str | None = None,
        minibatch_switching: bool = False,
        model: nn.Module | None = None,
        batchnorm_update: str | None = None,
        max_grad_norm: float | None = None,
        micro_batch_ascent: bool = False,
        ascent_sync: str = "global",
        grad_scaler: torch.amp.GradScaler | None = None,
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
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model)}")
        if model is None and batchnorm_update == "first_pass":
            raise ValueError(
                f"batchnorm_update={batchnorm_update!r} needs model=: the engine controls the "
                "BatchNorm layers of the model it is given (without a model every pass updates "
                "the running statistics)"
            )
        settings = validate_settings(
            method=method,
            k=k,
            alpha=alpha,
            adaptive_alpha=adaptive_alpha,
            rho=rho,
            perturbation=perturbation,
            asam_eta=asam_eta,
            adaptive_scope=adaptive_scope,
            minibatch_switching=minibatch_switching,
            batchnorm_update=batchnorm_update,
            max_grad_norm=max_grad_norm,
            micro_batch_ascent=micro_batch_ascent,
            ascent_sync=ascent_sync,
        )
        if model is not None and settings["batchnorm_update"] is None:
            settings["batchnorm_update"] = "first_pass"
        if any(group.get("maximize", False) for group in base_optimizer.param_groups):
            raise ValueError("Lookbehind minimises; the base optimizer must not set maximize=True")

        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state
        self.base_optimizer = base_optimizer
        # Per-parameter buffers (``_schedules.BUFFERS``), apart from the base optimizer's
        # ``state`` (which optimizers such as Adam initialise only while it is empty); they
        # travel inside its per-parameter entries of ``state_dict()``.
        self._lookbehind_state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(
            dict
        )
        self._apply_settings(settings)
        self._batchnorms = batchnorm_modules(model)
        self._running_stats = RunningStatsGuard(self._batchnorms)
        self._grad_scaler = grad_scaler
        self._fresh_statistics = False  # the last pass updated the BatchNorm statistics
        self._transaction = _StepTransaction()
        self._values = _GroupValues()
        self._last_ascent_grad_norm: torch.Tensor | None = None
        self._last_perturbation_distance: torch.Tensor | None = None
        self._last_descent_grad_norm: torch.Tensor | None = None
        self._checked_norm: torch.Tensor | None = None
        self._init_run_state()
        self._read_group_values()  # a bad value given in a group fails here, before any work

    def _apply_settings(self, settings: dict[str, Any]) -> None:
        self._setup = SimpleNamespace(**settings)
        none = settings["perturbation"] == "none"
        self._ascent = (
            None if none else perturbation_for(settings["perturbation"], settings["asam_eta"])
        )

    # ----------------------------------------------------------------- configuration and state
    @property
    def settings(self) -> dict[str, Any]:
        """The keyword arguments of the current setup (without the optimizer and the model), as
        :func:`~hf_lookbehind.settings.validate_settings` filled them in. ``rho``, ``alpha``
        and ``adaptive_alpha`` are the parameter groups' defaults; the groups hold the values
        in use."""
        return dict(vars(self._setup))

    @property
    def _config(self) -> dict[str, Any]:
        """:attr:`settings` with the perturbation as it is described, with its
        hyper-parameters: what a checkpoint records."""
        config = self.settings
        config["perturbation"] = describe_perturbation(
            config["perturbation"], config.pop("asam_eta")
        )
        return config

    def reconfigure(self, **changes: Any) -> None:
        """Switch to another setup between outer steps, keeping the base optimizer's state
        (Sec. 5.4: SAM/ASAM for some epochs, then Lookbehind, or the reverse). ``changes`` are
        constructor settings (``method``, ``k``, ``alpha``, ...); a setting not given keeps its
        value where the new method reads it (``k`` falls back to its default, and the groups
        keep their ``rho``/``alpha`` values). ``rho``, ``alpha`` or ``adaptive_alpha`` given
        here apply to every group. The Lookbehind buffers are released; the next step allocates
        what the new setup needs."""
        if self.cycle_position != 0:
            raise RuntimeError(
                f"reconfigure() between outer steps only: {self.cycle_position} of "
                f"{self._setup.k} inner steps of the current cycle are done"
            )
        settings = self.settings
        unknown = set(changes) - set(settings)
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}; allowed: {sorted(settings)}")
        carried = applicable_settings({**settings, "k": None, **changes})
        if "alpha" in changes:  # a static alpha, or the switch's deprecated spelling
            carried["adaptive_alpha"] = None
        if changes.get("adaptive_alpha"):
            carried["alpha"] = None
        self._apply_settings(validate_settings(**{**carried, **changes}))
        self._lookbehind_state.clear()
        self._init_run_state()
        given = {GROUP_KEYS[name] for name in changes if name in GROUP_KEYS}
        if "alpha" in changes:
            given.add(ADAPTIVE_ALPHA)  # alpha="adaptive", or a static alpha, sets the switch too
        self._fill_group_values(overwrite=given)
        self._read_group_values()

    def _init_run_state(self) -> None:
        for group in self.param_groups:
            group.setdefault("asam_scale", True)
        run = self._run
        run.setdefault("cycle_position", 0)
        run.setdefault("cycle_adaptive", False)
        run.setdefault("cycle_nonfinite", None)
        run.setdefault("skipped_steps", None)
        run.setdefault("last_alpha", None)
        run.setdefault("gradient_computations", 0)
        run["config"] = self._config

    @property
    def _run(self) -> dict[str, Any]:
        """The run state: ``state[RUN_STATE]``."""
        return self.state.setdefault(RUN_STATE, {})

    def _fill_group_values(self, overwrite: Sequence[str]) -> None:
        """Give every group the hyper-parameters the method reads (the setting's value where a
        group has none, or for the keys in ``overwrite``), and drop those it does not read."""
        for group in self.param_groups:
            for key, name in GROUP_SETTINGS.items():
                value = getattr(self._setup, name)
                if value is None:
                    group.pop(key, None)
                elif key in overwrite or key not in group:
                    group[key] = value

    def _check_group(self, where: str, group: dict[str, Any]) -> None:
        """Refuse a group's hyper-parameter that the method does not read, or a bad value."""
        for key, name in GROUP_SETTINGS.items():
            if key in group and getattr(self._setup, name) is None:
                raise ValueError(
                    f"{where} sets {key}={group[key]!r}, which method={self._setup.method!r} "
                    f"with perturbation={self._setup.perturbation!r} does not read; "
                    "remove it"
                )
        if RHO in group:
            check_nonnegative(f"{where}[{RHO!r}]", group[RHO])
        if ALPHA in group:
            check_alpha_value(f"{where}[{ALPHA!r}]", group[ALPHA])
        switch = group.get(ADAPTIVE_ALPHA, False)
        if not isinstance(switch, bool):
            raise ValueError(f"{where}[{ADAPTIVE_ALPHA!r}] must be True or False, got {switch!r}")
        if switch and self._setup.method != "lookbehind":
            raise ValueError(
                f"{where}[{ADAPTIVE_ALPHA!r}] is True, but adaptive alpha is defined for "
                f"method='lookbehind', not {self._setup.method!r}"
            )

    def _read_group_values(self) -> None:
        """Check the groups' hyper-parameters and keep them for this step: a bad value, or one
        the method does not read, fails here, before the step does any work. A group without
        one (added to the base optimizer directly) gets the setting's value."""
        for index, group in enumerate(self.param_groups):
            self._check_group(f"param_groups[{index}]", group)
        self._fill_group_values(overwrite=())
        groups = self.param_groups
        switches = {group[ADAPTIVE_ALPHA] for group in groups if ADAPTIVE_ALPHA in group}
        if len(switches) > 1:
            raise ValueError(
                f"{ADAPTIVE_ALPHA!r} differs between the parameter groups: one slow-weight "
                "update takes adaptive alpha (eq. 7-8) for all of them or for none"
            )
        rhos = [float(group[RHO]) for group in groups if RHO in group]
        alphas = [float(group[ALPHA]) for group in groups if ALPHA in group]
        rho: float | dict[int, float] | None = rhos[0] if rhos else None
        alpha: float | list[float] | None = alphas[0] if alphas else None
        # One value for all groups (the usual case) needs no per-parameter lookup.
        if len(set(rhos)) > 1:
            rho = {id(p): value for value, g in zip(rhos, groups) for p in g["params"]}
        if len(set(alphas)) > 1:
            alpha = [value for value, g in zip(alphas, groups) for _ in g["params"]]
        self._values = _GroupValues(
            rho=rho, alpha=alpha, adaptive=bool(switches and switches.pop())
        )

    def stats(self) -> LookbehindStats:
        """The diagnostics for a log, as host numbers (one read per value: a synchronisation on
        a GPU, so call it at logging time)."""

        def read(value: torch.Tensor | None) -> float | None:
            return None if value is None else value.float().mean().item()

        run = self._run
        skipped = run["skipped_steps"]
        return LookbehindStats(
            alpha=read(run["last_alpha"]),
            ascent_grad_norm=read(self._last_ascent_grad_norm),
            perturbation_distance=read(self._last_perturbation_distance),
            descent_grad_norm=read(self._last_descent_grad_norm),
            skipped_steps=0 if skipped is None else int(skipped.item()),
            gradient_computations=run["gradient_computations"],
        )

    def buffer_footprint(self) -> BufferFootprint:
        """The persistent memory of the engine's buffers (fast, perturbed, first fast, gradient
        sums, local gradients), in bytes and in copies of the parameters it optimizes."""
        local = local_shards(
            [t for entry in self._lookbehind_state.values() for t in entry.values()]
        )
        params = local_shards(self._params)
        numel = sum(t.numel() for t in local)
        return BufferFootprint(
            bytes=sum(t.numel() * t.element_size() for t in local),
            parameter_copies=numel / max(sum(p.numel() for p in params), 1),
        )

    @property
    def cycle_position(self) -> int:
        """Inner steps done in the current outer step (always 0 in same-batch mode): between
        outer steps when 0, where the model holds the slow weights of a finished update."""
        return self._run["cycle_position"]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "base_optimizer" not in self.__dict__:  # called by Optimizer.__init__
            return super().add_param_group(param_group)
        if self.cycle_position != 0:
            raise RuntimeError(
                f"add_param_group() between outer steps only: {self.cycle_position} of "
                f"{self._setup.k} inner steps of the current cycle are done, and the open "
                "cycle's buffers cover the parameters it started with; add the group when "
                "cycle_position is 0"
            )
        self._check_group("the new parameter group", param_group)
        self.base_optimizer.add_param_group(param_group)
        self.param_groups[-1].setdefault("asam_scale", True)
        self._read_group_values()

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict with the run state in ``state["lookbehind_run"]``,
        the hyper-parameters in the groups and, in the middle of a cycle (switching and
        lookahead mode), the Lookbehind buffers inside the per-parameter entries. Between outer
        steps the buffers hold nothing that the next step reads, so they are left out."""
        state_dict = super().state_dict()
        if self.cycle_position == 0:
            return state_dict
        packed = dict(state_dict["state"])
        for index, p in enumerate(self._params):
            entry = self._lookbehind_state.get(p, {})
            buffers = {k: v for k, v in entry.items() if k in BUFFERS}
            if buffers:
                packed[index] = {**packed.get(index, {}), **buffers}
        return {**state_dict, "state": packed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this engine (or of its base optimizer alone, or one written
        before the run state moved out of ``param_groups[0]``). The setup must match the
        checkpoint's: in the middle of a cycle exactly, between outer steps up to the
        hyper-parameters a run may change (``rho``, ``alpha``, ``adaptive_alpha``,
        ``max_grad_norm``, ``batchnorm_update``), whose old and new values are logged. The
        groups' ``rho``/``alpha`` values come from the checkpoint, unless the constructor's
        value changed since."""
        state_dict = upgraded_state_dict(state_dict)
        changed = self._check_resumed_setup(state_dict)
        base_entries, buffers = {}, {}
        for index, entry in state_dict["state"].items():
            if index == RUN_STATE:
                continue
            base_entries[index] = {k: v for k, v in entry.items() if k not in BUFFERS}
            buffers[index] = {k: v for k, v in entry.items() if k in BUFFERS}
        self.base_optimizer.load_state_dict({**state_dict, "state": base_entries})
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self._lookbehind_state.clear()
        params = self._params
        for index, entry in buffers.items():
            p = params[index]
            for key, value in entry.items():
                self._lookbehind_state[p][key] = value.to(device=p.device, dtype=p.dtype)
        run = state_dict["state"].get(RUN_STATE)
        self.state[RUN_STATE] = {} if run is None else dict(run)
        self._init_run_state()
        self._fill_group_values(
            overwrite={GROUP_KEYS[name] for name in changed if name in GROUP_KEYS}
        )
        self._read_group_values()

    def _check_resumed_setup(self, state_dict: dict[str, Any]) -> list[str]:
        """Refuse a checkpoint whose setup cannot be resumed with this one; return the
        settings that changed where a change is allowed (each logged)."""
        saved = saved_config(state_dict)
        if saved is None:
            return []
        run = state_dict["state"].get(RUN_STATE, {})
        position = run.get("cycle_position", 0)
        changed = {
            key: (saved.get(key), value)
            for key, value in self._config.items()
            if key in saved and saved[key] != value
        }
        refused = (
            changed
            if position
            else {
                key: (old, new)
                for key, (old, new) in changed.items()
                # adaptive_scope follows the adaptive switch (None without it), which may change
                if key in _FIXED_KEYS and not (key == "adaptive_scope" and None in (old, new))
            }
        )
        if refused:
            details = ", ".join(
                f"{key}={old!r} (now {new!r})" for key, (old, new) in refused.items()
            )
            where = (
                f"in the middle of a cycle ({position} of {saved.get('k')} inner steps done), "
                "where every setting must match"
                if position
                else "between outer steps, where only rho, alpha, adaptive_alpha, max_grad_norm "
                "and batchnorm_update may change"
            )
            raise ValueError(
                f"checkpoint was written with a different Lookbehind setup: {details}; it was "
                f"saved {where}"
            )
        for key, (old, new) in changed.items():
            _logger.warning(
                "resuming with %s=%r (the checkpoint was written with %r)", key, new, old
            )
        if position:
            self._check_cycle_buffers(state_dict, position)
        return list(changed)

    def _check_cycle_buffers(self, state_dict: dict[str, Any], position: int) -> None:
        """A checkpoint saved mid-cycle must hold the open cycle's buffers for every
        parameter (without them the cycle cannot go on exactly)."""
        needed = (FAST,) if self._setup.method == "lookahead" else (FAST, PERTURBED)
        entries = state_dict["state"]
        missing = [
            index
            for index in range(len(self._params))
            if any(key not in entries.get(index, {}) for key in needed)
        ]
        if missing:
            raise ValueError(
                f"checkpoint was saved in the middle of a cycle ({position} of {self._setup.k} "
                f"inner steps done) but lacks the cycle's buffers {list(needed)} for parameters "
                f"{missing[:8]}{' ...' if len(missing) > 8 else ''}: it cannot be resumed "
                "exactly; resume from a checkpoint saved between outer steps"
            )

    # ------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Closure | None = None
    ) -> torch.Tensor:
        """One step on one minibatch; ``closure`` computes the loss on it and calls
        ``backward()`` (the engine zeroes gradients itself). Returns the loss of the first pass,
        at the weights the parameters held on entry."""
        if closure is None:
            raise ValueError(
                "Lookbehind.step needs a closure that computes the loss on the minibatch and "
                "calls backward(); it runs it once per forward/backward pass"
            )
        if not callable(closure):
            if not self._setup.micro_batch_ascent:
                raise TypeError(
                    "a sequence of closures (one per micro-batch) needs micro_batch_ascent=True "
                    "and step_micro_batches()"
                )
            warnings.warn(
                "step(closures) with a sequence of micro-batch closures is deprecated: call "
                "step_micro_batches(closures)",
                FutureWarning,
                stacklevel=2,
            )
            return self.step_micro_batches(closure)
        if self._setup.micro_batch_ascent:
            return self.step_micro_batches([closure])
        schedule = schedule_for(self._setup.method, self._setup.minibatch_switching)
        return self._run_transaction(lambda: schedule(self, closure))

    @torch.no_grad()
    def step_micro_batches(self, closures: Sequence[Closure]) -> torch.Tensor:
        """m-SAM (``micro_batch_ascent=True``): one step on a batch given as micro-batches, one
        closure each (each closure's loss is its share of the batch loss, as in gradient
        accumulation); every micro-batch is perturbed with its own gradient and the descent
        uses the sum of their gradients (see :func:`hf_lookbehind._schedules.micro_batch_ascent`).
        Returns the summed loss of the first passes."""
        if not self._setup.micro_batch_ascent:
            raise ValueError(
                "step_micro_batches() is m-SAM: construct the engine with micro_batch_ascent=True"
            )
        closures = list(closures)
        if not closures or not all(callable(closure) for closure in closures):
            raise TypeError("step_micro_batches needs one or more closures, one per micro-batch")
        return self._run_transaction(lambda: micro_batch_ascent(self, closures))

    def _run_transaction(self, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run one step's schedule so that every exit leaves the model at the slow weights: a
        skipped step (non-finite value) restores the BatchNorm statistics too, and an exception
        restores the parameters, statistics and run state (see :meth:`_roll_back`)."""
        self._read_group_values()
        self._begin_step()
        try:
            loss = run()
        except BaseException as error:
            self._roll_back(error)
            raise
        self._end_step()
        return loss

    def _begin_step(self) -> None:
        run = self._run
        flag = run["cycle_nonfinite"]
        position = run["cycle_position"]
        # Between outer steps the flag is always reset; mid-cycle it carries the cycle's state.
        held = None if flag is None or position == 0 else flag.clone()
        self._transaction = _StepTransaction(
            cycle_position=position,
            cycle_adaptive=run["cycle_adaptive"],
            gradient_computations=run["gradient_computations"],
            nonfinite=held,
        )
        if position == 0:
            run["cycle_adaptive"] = self._values.adaptive
        if self._batchnorms:
            self._running_stats.save()

    def _end_step(self) -> None:
        flag = self._run["cycle_nonfinite"]
        if flag is None:
            return
        if self._batchnorms:
            self._running_stats.restore(drop=flag)
        if self.cycle_position == 0:
            flag.zero_()

    def _roll_back(self, error: BaseException) -> None:
        """After an exception inside a step: swap every buffer back, put back the values that
        the step's backups hold, restore the BatchNorm statistics and the run state. If the
        step had changed nothing that outlives it, the engine is as before the step; otherwise
        (the base optimizer had updated, or a mid-cycle buffer had moved) the open outer step
        is discarded as for a non-finite gradient: the slow weights are kept and
        ``skipped_steps`` counts it."""
        transaction, state, params = self._transaction, self._lookbehind_state, self._params
        for key in reversed(transaction.swapped):
            swap_storage(params, state, key)
        for target, source in reversed(transaction.backups):
            held = [p.data for p in params] if target == "params" else self._buffers(target)
            copy_values_(held, self._buffers(source))
        self._running_stats.restore()
        self.base_optimizer.zero_grad(set_to_none=True)
        run = self._run
        run["gradient_computations"] = transaction.gradient_computations
        nonfinite, skipped = self._run_tensors(params[0].device)
        if transaction.recoverable:
            run["cycle_position"] = transaction.cycle_position
            run["cycle_adaptive"] = transaction.cycle_adaptive
            if transaction.nonfinite is None:
                nonfinite.zero_()
            else:
                nonfinite.copy_(transaction.nonfinite)
            outcome = "the optimizer's state is as before the step"
        else:
            run["cycle_position"] = 0
            skipped.add_(1)
            nonfinite.zero_()
            outcome = (
                "the open outer step was discarded as for a non-finite gradient (counted in "
                "skipped_steps); the base optimizer keeps the updates it had made in it"
            )
        _logger.warning(
            "Lookbehind step interrupted by %r: the model holds the slow weights; %s",
            error,
            outcome,
        )
        error.add_note(f"Lookbehind: the model holds the slow weights; {outcome}.")

    # ------------------------------------------------ primitives of the schedules (private)
    @property
    def _params(self) -> list[torch.Tensor]:
        """Every parameter of every group, in ``state_dict`` order."""
        return [p for group in self.param_groups for p in group["params"]]

    @property
    def _adaptive(self) -> bool:
        """Whether the open outer step updates ``S`` with adaptive alpha (eq. 7-8)."""
        return self._run["cycle_adaptive"]

    def _buffers(self, key: str) -> list[torch.Tensor]:
        """The buffer ``key`` of every parameter, in :attr:`_params` order."""
        return [self._lookbehind_state[p][key] for p in self._params]

    def _gradients(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[bool]]:
        """Parameters that received a gradient, their gradients, and their ASAM flags."""
        params, grads, scaled = [], [], []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    params.append(p)
                    grads.append(p.grad)
                    scaled.append(bool(group["asam_scale"]))
        return params, grads, scaled

    def _run_tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        run = self._run
        nonfinite, skipped = run["cycle_nonfinite"], run["skipped_steps"]
        if nonfinite is None:
            nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        if skipped is None:
            skipped = torch.zeros((), dtype=torch.int64, device=device)
        run["cycle_nonfinite"], run["skipped_steps"] = nonfinite.to(device), skipped.to(device)
        return run["cycle_nonfinite"], run["skipped_steps"]

    @property
    def _nonfinite_flag(self) -> torch.Tensor:
        """Device flag: the current outer step has seen a non-finite gradient."""
        return self._run["cycle_nonfinite"]

    def _keep_factor(self, dtype: torch.dtype) -> torch.Tensor:
        """1 while the current outer step has seen only finite gradients, else 0."""
        return (~self._nonfinite_flag).to(dtype)

    def _forward_backward(
        self, closure: Closure, *, first: bool, count: bool = True
    ) -> torch.Tensor:
        """One pass: zero the gradients, run ``closure`` (forward + backward), then
        :meth:`_after_backward`. ``first``: the pass at the weights held on entry (the only
        one that updates BatchNorm statistics with ``batchnorm_update='first_pass'``);
        ``count``: the pass counts as one gradient computation over the batch."""
        if count:
            self._run["gradient_computations"] += 1
        self.base_optimizer.zero_grad(set_to_none=True)
        freeze = not first and self._setup.batchnorm_update == "first_pass"
        stats = frozen_running_stats(self._batchnorms) if freeze else contextlib.nullcontext()
        with torch.enable_grad(), stats:
            loss = closure()
        if self._batchnorms and not freeze:
            self._running_stats.count_pass()
            self._fresh_statistics = True
        self._after_backward()
        return loss

    def _checked_gradients(self) -> CheckedGradients:
        """Gradients of the last pass and their global norm. A non-finite norm marks the outer
        step as failed; from then on the gradients (and so every later perturbation and base
        update of the outer step) are zeroed, so nothing downstream turns NaN and a loss scaler
        sees only the overflow that happened. The result passes through
        :meth:`_ascent_gradients`."""
        params, grads, scaled = self._gradients()
        if not grads:
            raise RuntimeError(
                "the closure produced no gradient: it must compute the loss and call backward()"
            )
        # The BatchNorm statistics a pass updated ride along in the same multi-tensor norm: a
        # non-finite statistic fails the outer step like a non-finite gradient.
        statistics = self._running_stats.floats if self._fresh_statistics else []
        self._fresh_statistics = False
        norms = per_tensor_norms([*grads, *statistics])
        norm = torch.linalg.vector_norm(norms[: len(grads)] if statistics else norms)
        watched = norms.sum() if statistics else norm
        nonfinite, _ = self._run_tensors(grads[0].device)
        nonfinite.logical_or_(watched * 0 != 0)  # NaN or inf: two kernels where isfinite takes five
        zero_nonfinite_(grads, ~nonfinite)
        self._checked_norm = norm.masked_fill(nonfinite, 0.0)
        return self._ascent_gradients(CheckedGradients(params, grads, scaled, self._checked_norm))

    def _record_ascent_norm(self, checked: CheckedGradients) -> None:
        """Keep ``||g||`` of the step's first ascent for :meth:`stats`."""
        self._last_ascent_grad_norm = checked.norm

    def _forget_checked_norm(self) -> None:
        """The gradients were replaced since the last check: the next base update measures
        them anew."""
        self._checked_norm = None

    def _ascend(self, checked: CheckedGradients) -> None:
        """``P <- P + eps(g)`` (eq. 3 or 4) with each group's rho. In same-batch mode a descent
        may have clipped ``g`` in place first; the direction is the same, and the norm is then
        recomputed so that the step keeps its radius rho (clipping never touches the ascent)."""
        rho = self._values.rho
        if isinstance(rho, dict):
            rho = [rho[id(p)] for p in checked.params]
        self._ascent.ascend_(
            checked.params,
            checked.grads,
            rho=rho,
            scaled=checked.scaled,
            grad_norm=None if self._setup.max_grad_norm is not None else checked.norm,
        )

    def _base_update(self) -> None:
        """Apply the base optimizer to the parameters with the current gradients (already
        zeroed by the check if the outer step saw a non-finite gradient), clipped to
        ``max_grad_norm``. This is the only place where descent happens."""
        params, grads, _ = self._gradients()
        if grads:
            # The norm of these gradients, unless they were replaced since the check (for FSDP2
            # shards, that of the whole gradients).
            checked = self._checked_norm
            norm = global_norm(grads) if checked is None else checked
            if self._setup.max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(
                    params, self._setup.max_grad_norm, norm, foreach=True
                )
            self._last_descent_grad_norm = norm
        self._cycle_changed()  # the base optimizer's state moves on
        self.base_optimizer.step()

    def _swap(self, key: str) -> None:
        """Exchange the parameters' storage with the buffer ``key`` (see
        :func:`~hf_lookbehind.multi_tensor.swap_storage`); an exception later in the step swaps
        back."""
        swap_storage(self._params, self._lookbehind_state, key)
        self._transaction.swapped.append(key)

    def _hold_backup(self, target: str, source: str) -> None:
        """Until the step ends, buffer ``source`` holds the values that ``target`` (a buffer
        key, or ``"params"``) had when the step began: an exception puts them back."""
        self._transaction.backups.append((target, source))

    def _cycle_changed(self) -> None:
        """Something the open cycle carries to the next step changed without a backup: an
        exception from now on discards the cycle instead of restoring it."""
        self._transaction.recoverable = False

    def _descend(self, *, record_first: bool = False) -> None:
        """``F <- A(F, g)`` with ``F`` swapped into the parameters for the update;
        ``record_first`` keeps ``F_1`` for adaptive alpha."""
        params = self._params
        self._swap(FAST)
        self._base_update()
        if record_first:
            copy_into_buffers(params, self._lookbehind_state, FIRST_FAST)
        self._swap(FAST)

    def _finish_outer_step(self, slow: list[torch.Tensor]) -> None:
        """``S <- S + alpha (F_k - S)`` into ``slow`` (eq. 7-8 for adaptive alpha; each group's
        alpha otherwise), gated by the non-finite flag; then count a skip and reset the flag."""
        fast = self._buffers(FAST)
        keep = self._keep_factor(slow[0].dtype)
        local_slow, local_fast = local_shards(slow), local_shards(fast)
        if self._adaptive:
            first = self._buffers(FIRST_FAST)
            torch._foreach_sub_(local_shards(first), local_slow)
            torch._foreach_sub_(local_fast, local_slow)
            scope = self._setup.adaptive_scope or DEFAULT_ADAPTIVE_SCOPE
            alpha = adaptive_alpha(first, fast, scope)
        else:
            static = self._values.alpha
            if isinstance(static, list):  # one value per group
                alpha = torch.tensor(static, dtype=keep.dtype, device=keep.device)
            else:
                alpha = keep.new_full((), float(static))
            torch._foreach_sub_(local_fast, local_slow)
        # S + (keep alpha)(F - S); keep = 0 returns S exactly. One weight for the whole list
        # is one multi-tensor kernel; one weight per tensor (adaptive per_tensor, or alpha per
        # group) has no single-kernel form in torch (a list of 0-d weights runs tensor by
        # tensor on CUDA).
        weight = (alpha * keep).to(slow[0].dtype)
        if weight.dim() == 0:
            torch._foreach_mul_(local_fast, weight)
            torch._foreach_add_(local_slow, local_fast)
        else:
            torch._foreach_addcmul_(local_slow, local_fast, list(weight.unbind()))
        self._run["last_alpha"] = alpha
        self._close_cycle()

    def _advance_cycle(self) -> None:
        """One inner step of a cycle done (switching and lookahead mode); wraps to 0 after k."""
        run = self._run
        run["cycle_position"] = (run["cycle_position"] + 1) % self._setup.k

    def _close_cycle(self) -> None:
        """End an outer step: count a skip if it saw a non-finite gradient (the flag is reset
        when the step returns, after the BatchNorm statistics were restored)."""
        run = self._run
        run["skipped_steps"].add_(self._nonfinite_flag.to(run["skipped_steps"].dtype))
        run["cycle_position"] = 0

    def _record_perturbation_distance(
        self, perturbed: list[torch.Tensor], slow: list[torch.Tensor]
    ) -> None:
        """``||P_k - S||``, computed in place in ``perturbed`` (scratch afterwards)."""
        torch._foreach_sub_(local_shards(perturbed), local_shards(slow))
        self._last_perturbation_distance = global_norm(perturbed)

    # ------------------------------------------------------ mixed precision and processes
    @property
    def _per_device_ascent(self) -> bool:
        """``ascent_sync="per_device"`` with more than one process."""
        return self._setup.ascent_sync == "per_device" and world_size() > 1

    def _after_backward(self) -> None:
        """After every pass, before the check: unscale fp16 gradients (and update the scale),
        and for per-device ascent keep this process's gradient and average them."""
        scaler = self._grad_scaler
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(self.base_optimizer)
            scaler.update()
        if self._per_device_ascent:
            params, grads, _ = self._gradients()
            for p, grad in zip(params, grads, strict=True):
                if LOCAL_GRAD not in self._lookbehind_state[p]:
                    self._lookbehind_state[p][LOCAL_GRAD] = torch.empty_like(grad)
            copy_values_([self._lookbehind_state[p][LOCAL_GRAD] for p in params], grads)
            average_(grads)

    def _ascent_gradients(self, checked: CheckedGradients) -> CheckedGradients:
        """The gradients the next ascent uses: the checked (averaged) ones, or with per-device
        ascent this process's own (zeroed too when the step failed anywhere)."""
        if not self._per_device_ascent:
            return checked
        local = [self._lookbehind_state[p][LOCAL_GRAD] for p in checked.params]
        zero_nonfinite_(local, ~self._nonfinite_flag)
        return checked._replace(grads=local, norm=global_norm(local))

    def _synchronize_gradient_sums(self, sums: list[torch.Tensor]) -> None:
        """m-SAM: with more than one process, average the k gradient sums over them, and skip
        the step everywhere if any process saw a non-finite value."""
        if world_size() > 1:
            average_(sums)
            agree_on_flag_(self._nonfinite_flag)


GROUP_KEYS = {name: key for key, name in GROUP_SETTINGS.items()}


@dataclass(frozen=True)
class _GroupValues:
    """The groups' hyper-parameters for one step: rho (one value, or one per parameter id),
    the static alpha (one value, or one per parameter in ``_params`` order) and the adaptive
    switch; ``None`` where the method reads none."""

    rho: float | dict[int, float] | None = None
    alpha: float | list[float] | None = None
    adaptive: bool = False


@dataclass
class _StepTransaction:
    """What a step must undo on an exception: the storage swaps it made, the buffers holding
    values from before the step, and the run state it began with."""

    cycle_position: int = 0
    cycle_adaptive: bool = False
    gradient_computations: int = 0
    nonfinite: torch.Tensor | None = None
    swapped: list[str] = field(default_factory=list)
    backups: list[tuple[str, str]] = field(default_factory=list)
    recoverable: bool = True


def upgraded_state_dict(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A state dict with the run state where this version keeps it: checkpoints written before
    it moved out of ``param_groups[0]`` (and recorded ``alpha="adaptive"``) are rewritten, the
    others returned as they are."""
    groups = state_dict["param_groups"]
    if not groups or not any(key in groups[0] for key in _GROUP_ZERO_RUN_STATE):
        return state_dict
    first = dict(groups[0])
    run = {name: first.pop(key) for key, name in _GROUP_ZERO_RUN_STATE.items() if key in first}
    config = run.get("config")
    if config is not None:
        config = dict(config)
        adaptive = config.pop("adaptive", False)
        reads_alpha = config.get("method") in ALPHA_METHODS
        config["adaptive_alpha"] = bool(adaptive) if reads_alpha else None
        if config.get("alpha") == "adaptive":
            config["alpha"] = DEFAULT_ALPHA
        run["config"] = config
    run["cycle_adaptive"] = bool(config and config["adaptive_alpha"])
    return {
        **state_dict,
        "state": {**state_dict["state"], RUN_STATE: run},
        "param_groups": [first, *groups[1:]],
    }


def saved_config(state_dict: dict[str, Any]) -> dict[str, Any] | None:
    """The Lookbehind setup a state dict was written with (the engine's settings, the
    perturbation described), or None for a base optimizer's own state dict."""
    run = upgraded_state_dict(state_dict)["state"].get(RUN_STATE)
    saved = None if run is None else run.get("config")
    if saved is None:
        return None
    saved = applicable_settings(saved)  # older checkpoints recorded unread settings too
    if saved.get("perturbation") in PERTURBATIONS:  # and named the perturbation only
        eta = saved.pop("asam_eta", None)
        saved["perturbation"] = describe_perturbation(saved["perturbation"], eta)
    else:
        saved.pop("asam_eta", None)
    return saved
