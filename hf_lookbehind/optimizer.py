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

Non-finite gradients: every pass checks the global gradient norm on the device. A NaN/inf in
any pass of an outer step (a cycle of k calls in switching and lookahead mode) discards the
outer step: ``S`` stays bit-identical and ``F``/``P`` restart from it, and
``skipped_steps`` counts it. From the bad pass on, gradients are zeroed: perturbations are
zero and the base optimizer sees finite zero-gradient updates, never NaN.
"""

from __future__ import annotations

import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

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
from .schedules import BUFFERS, FAST, FIRST_FAST, PERTURBED, micro_batch_ascent, schedule_for
from .settings import METHODS, applicable_settings, refuse_schedule_free, validate_settings
from .sharding import local_shards

__all__ = [
    "BUFFERS",
    "METHODS",
    "BufferFootprint",
    "CheckedGradients",
    "Lookbehind",
    "LookbehindStats",
]

# Per-parameter buffers (``schedules.BUFFERS``) live in ``Lookbehind.lookbehind_state``, apart
# from the base optimizer's ``state`` (which optimizers such as Adam initialise only while it is
# empty), and travel inside the base optimizer's per-parameter entries of ``state_dict()``.

# Run state, kept in ``param_groups[0]``.
CYCLE_POSITION = "lookbehind_cycle_position"
CYCLE_NONFINITE = "lookbehind_cycle_nonfinite"
SKIPPED_STEPS = "lookbehind_skipped_steps"
LAST_ALPHA = "lookbehind_last_alpha"
GRADIENT_COMPUTATIONS = "lookbehind_gradient_computations"
CONFIG = "lookbehind_config"
# Which config entries a checkpoint must agree on to be resumed between outer steps (in the
# middle of a cycle, every entry must agree).
_FIXED_KEYS = (
    "method",
    "k",
    "minibatch_switching",
    "adaptive",
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
        alpha: slow-weight step size in (0, 1] (default 0.5), or ``"adaptive"`` (eq. 7-8,
            lookbehind only); for lookbehind and lookahead, refused for the other methods.
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
        micro_batch_ascent: m-SAM (Table 9): ``step`` takes a sequence of closures, one per
            micro-batch, each perturbed with its own gradient; the descent uses the sum of their
            gradients (see :func:`hf_lookbehind.schedules.micro_batch_ascent`). For ``sam`` and
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
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        method: str = "lookbehind",
        k: int | None = None,
        alpha: float | str | None = None,
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
        self.lookbehind_state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(
            dict
        )
        self.base_optimizer = base_optimizer
        self._apply_settings(settings)
        self._batchnorms = batchnorm_modules(model)
        self._running_stats = RunningStatsGuard(self._batchnorms)
        self.grad_scaler = grad_scaler
        self._fresh_statistics = False  # the last pass updated the BatchNorm statistics
        self._transaction = _StepTransaction()
        self.last_ascent_grad_norm: torch.Tensor | None = None
        self.last_perturbation_distance: torch.Tensor | None = None
        self.last_descent_grad_norm: torch.Tensor | None = None
        self._checked_norm: torch.Tensor | None = None
        self._init_run_state()

    def _apply_settings(self, settings: dict[str, Any]) -> None:
        self._settings = dict(settings)
        for name, value in settings.items():
            setattr(self, name, value)
        none = self.perturbation == "none"
        self._ascent = None if none else perturbation_for(self.perturbation, self.asam_eta)

    # ----------------------------------------------------------------- configuration and state
    @property
    def settings(self) -> dict[str, Any]:
        """The keyword arguments of the current setup (without the optimizer and the model), as
        :func:`~hf_lookbehind.settings.validate_settings` filled them in."""
        return dict(self._settings)

    @property
    def config(self) -> dict[str, Any]:
        """:attr:`settings` (the perturbation as it is described, with its hyper-parameters) and
        whether alpha is adaptive: what a checkpoint records."""
        config = {**self.settings, "adaptive": self.alpha == "adaptive"}
        config["perturbation"] = describe_perturbation(self.perturbation, config.pop("asam_eta"))
        return config

    def reconfigure(self, **changes: Any) -> None:
        """Switch to another setup between outer steps, keeping the base optimizer's state
        (Sec. 5.4: SAM/ASAM for some epochs, then Lookbehind, or the reverse). ``changes`` are
        constructor settings (``method``, ``k``, ``alpha``, ...); a setting not given keeps its
        value where the new method reads it (``k`` falls back to its default). The Lookbehind
        buffers are released; the next step allocates what the new setup needs."""
        if self.cycle_position != 0:
            raise RuntimeError(
                f"reconfigure() between outer steps only: {self.cycle_position} of {self.k} "
                "inner steps of the current cycle are done"
            )
        unknown = set(changes) - set(self.settings)
        if unknown:
            raise TypeError(f"unknown settings {sorted(unknown)}; allowed: {sorted(self.settings)}")
        carried = applicable_settings({**self.settings, "k": None, **changes})
        self._apply_settings(validate_settings(**{**carried, **changes}))
        self.lookbehind_state.clear()
        self._init_run_state()

    def _init_run_state(self) -> None:
        for group in self.param_groups:
            group.setdefault("asam_scale", True)
        run = self.param_groups[0]
        run.setdefault(CYCLE_POSITION, 0)
        run.setdefault(CYCLE_NONFINITE, None)
        run.setdefault(SKIPPED_STEPS, None)
        run.setdefault(LAST_ALPHA, None)
        run.setdefault(GRADIENT_COMPUTATIONS, 0)
        run[CONFIG] = self.config

    def stats(self) -> LookbehindStats:
        """The diagnostics for a log, as host numbers (one read per value: a synchronisation on
        a GPU, so call it at logging time)."""

        def read(value: torch.Tensor | None) -> float | None:
            return None if value is None else value.float().mean().item()

        skipped = self.skipped_steps
        return LookbehindStats(
            alpha=read(self.last_alpha),
            ascent_grad_norm=read(self.last_ascent_grad_norm),
            perturbation_distance=read(self.last_perturbation_distance),
            descent_grad_norm=read(self.last_descent_grad_norm),
            skipped_steps=0 if skipped is None else int(skipped.item()),
            gradient_computations=self.gradient_computations,
        )

    def buffer_footprint(self) -> BufferFootprint:
        """The persistent memory of the engine's buffers (fast, perturbed, first fast, gradient
        sums, local gradients), in bytes and in copies of the parameters it optimizes."""
        local = local_shards(
            [t for entry in self.lookbehind_state.values() for t in entry.values()]
        )
        params = local_shards(self.params)
        numel = sum(t.numel() for t in local)
        return BufferFootprint(
            bytes=sum(t.numel() * t.element_size() for t in local),
            parameter_copies=numel / max(sum(p.numel() for p in params), 1),
        )

    @property
    def cycle_position(self) -> int:
        """Inner steps done in the current outer step (always 0 in same-batch mode)."""
        return self.param_groups[0][CYCLE_POSITION]

    @property
    def skipped_steps(self) -> torch.Tensor | None:
        """Device counter of outer steps discarded for a non-finite gradient."""
        return self.param_groups[0][SKIPPED_STEPS]

    @property
    def gradient_computations(self) -> int:
        """Forward/backward passes over the batch so far (Table 10's "gradient computations"),
        kept in the state dict so that it continues across a resume."""
        return self.param_groups[0][GRADIENT_COMPUTATIONS]

    @property
    def last_alpha(self) -> torch.Tensor | None:
        """The alpha of the last slow-weight update: a 0-d tensor, or one per parameter
        tensor for ``adaptive_scope='per_tensor'`` (device tensors; read them when logging)."""
        return self.param_groups[0][LAST_ALPHA]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "base_optimizer" not in self.__dict__:  # called by Optimizer.__init__
            return super().add_param_group(param_group)
        if self.cycle_position != 0:
            raise RuntimeError(
                f"add_param_group() between outer steps only: {self.cycle_position} of {self.k} "
                "inner steps of the current cycle are done, and the open cycle's buffers cover "
                "the parameters it started with; add the group when cycle_position is 0"
            )
        self.base_optimizer.add_param_group(param_group)
        self.param_groups[-1].setdefault("asam_scale", True)

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.base_optimizer.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        """The base optimizer's state dict with the run state in ``param_groups[0]`` and, in the
        middle of a cycle (switching and lookahead mode), the Lookbehind buffers inside the
        per-parameter entries. Between outer steps the buffers hold nothing that the next
        step reads, so they are left out."""
        state_dict = super().state_dict()
        if self.cycle_position == 0:
            return state_dict
        packed = dict(state_dict["state"])
        for index, p in enumerate(self.params):
            buffers = {k: v for k, v in self.lookbehind_state.get(p, {}).items() if k in BUFFERS}
            if buffers:
                packed[index] = {**packed.get(index, {}), **buffers}
        return {**state_dict, "state": packed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load a checkpoint of this engine (or of its base optimizer alone). The setup must
        match the checkpoint's: in the middle of a cycle exactly, between outer steps up to the
        hyper-parameters a run may change (``rho``, a static ``alpha``, ``max_grad_norm``,
        ``batchnorm_update``), whose old and new values are logged."""
        self._check_resumed_setup(state_dict)
        base_entries, buffers = {}, {}
        base_entries, buffers = {}, {}
        for index, entry in state_dict["state"].items():
            base_entries[index] = {k: v for k, v in entry.items() if k not in BUFFERS}
            buffers[index] = {k: v for k, v in entry.items() if k in BUFFERS}
        self.base_optimizer.load_state_dict({**state_dict, "state": base_entries})
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.lookbehind_state.clear()
        params = self.params
        for index, entry in buffers.items():
            p = params[index]
            for key, value in entry.items():
                self.lookbehind_state[p][key] = value.to(device=p.device, dtype=p.dtype)
        self._init_run_state()

    def _check_resumed_setup(self, state_dict: dict[str, Any]) -> None:
        run = state_dict["param_groups"][0]
        saved = run.get(CONFIG)
        if saved is None:
            return
        saved = applicable_settings(saved)  # older checkpoints recorded unread settings too
        if saved.get("perturbation") in PERTURBATIONS:  # and named the perturbation only
            eta = saved.pop("asam_eta", None)
            saved["perturbation"] = describe_perturbation(saved["perturbation"], eta)
        position = run.get(CYCLE_POSITION, 0)
        changed = {
            key: (saved.get(key), value)
            for key, value in self.config.items()
            if key in saved and saved[key] != value
        }
        refused = changed if position else {k: v for k, v in changed.items() if k in _FIXED_KEYS}
        if refused:
            details = ", ".join(
                f"{key}={old!r} (now {new!r})" for key, (old, new) in refused.items()
            )
            where = (
                f"in the middle of a cycle ({position} of {saved.get('k')} inner steps done), "
                "where every setting must match"
                if position
                else "between outer steps, where only rho, a static alpha, max_grad_norm and "
                "batchnorm_update may change"
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

    def _check_cycle_buffers(self, state_dict: dict[str, Any], position: int) -> None:
        """A checkpoint saved mid-cycle must hold the open cycle's buffers for every
        parameter (without them the cycle cannot go on exactly)."""
        needed = (FAST,) if self.method == "lookahead" else (FAST, PERTURBED)
        entries = state_dict["state"]
        missing = [
            index
            for index in range(len(self.params))
            if any(key not in entries.get(index, {}) for key in needed)
        ]
        if missing:
            raise ValueError(
                f"checkpoint was saved in the middle of a cycle ({position} of {self.k} inner "
                f"steps done) but lacks the cycle's buffers {list(needed)} for parameters "
                f"{missing[:8]}{' ...' if len(missing) > 8 else ''}: it cannot be resumed "
                "exactly; resume from a checkpoint saved between outer steps"
            )

    # ------------------------------------------------------------ primitives of the schedules
    @property
    def params(self) -> list[torch.Tensor]:
        """Every parameter of every group, in ``state_dict`` order."""
        return [p for group in self.param_groups for p in group["params"]]

    def buffers(self, key: str) -> list[torch.Tensor]:
        """The buffer ``key`` of every parameter, in :attr:`params` order."""
        return [self.lookbehind_state[p][key] for p in self.params]

    def gradients(self) -> tuple[list[torch.Tensor], list[torch.Tensor], list[bool]]:
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
        run = self.param_groups[0]
        nonfinite, skipped = run[CYCLE_NONFINITE], run[SKIPPED_STEPS]
        if nonfinite is None:
            nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        if skipped is None:
            skipped = torch.zeros((), dtype=torch.int64, device=device)
        run[CYCLE_NONFINITE], run[SKIPPED_STEPS] = nonfinite.to(device), skipped.to(device)
        return run[CYCLE_NONFINITE], run[SKIPPED_STEPS]

    @property
    def nonfinite_flag(self) -> torch.Tensor:
        """Device flag: the current outer step has seen a non-finite gradient."""
        return self.param_groups[0][CYCLE_NONFINITE]

    def keep_factor(self, dtype: torch.dtype) -> torch.Tensor:
        """1 while the current outer step has seen only finite gradients, else 0."""
        return (~self.nonfinite_flag).to(dtype)

    def forward_backward(
        self, closure: Closure, *, first: bool, count: bool = True
    ) -> torch.Tensor:
        """One pass: zero the gradients, run ``closure`` (forward + backward), then the
        :meth:`after_backward` hook. ``first``: the pass at the weights held on entry (the only
        one that updates BatchNorm statistics with ``batchnorm_update='first_pass'``);
        ``count``: the pass counts as one gradient computation over the batch."""
        if count:
            self.param_groups[0][GRADIENT_COMPUTATIONS] += 1
        self.base_optimizer.zero_grad(set_to_none=True)
        freeze = not first and self.batchnorm_update == "first_pass"
        stats = frozen_running_stats(self._batchnorms) if freeze else contextlib.nullcontext()
        with torch.enable_grad(), stats:
            loss = closure()
        if self._batchnorms and not freeze:
            self._running_stats.count_pass()
            self._fresh_statistics = True
        self.after_backward()
        return loss

    def checked_gradients(self) -> CheckedGradients:
        """Gradients of the last pass and their global norm. A non-finite norm marks the outer
        step as failed; from then on the gradients (and so every later perturbation and base
        update of the outer step) are zeroed, so nothing downstream turns NaN and a loss scaler
        sees only the overflow that happened. The result passes through the
        :meth:`ascent_gradients` hook."""
        params, grads, scaled = self.gradients()
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
        return self.ascent_gradients(CheckedGradients(params, grads, scaled, self._checked_norm))

    def forget_checked_norm(self) -> None:
        """The gradients were replaced since the last check: the next base update measures
        them anew."""
        self._checked_norm = None

    def ascend(self, checked: CheckedGradients) -> None:
        """``P <- P + eps(g)`` (eq. 3 or 4). In same-batch mode a descent may have clipped ``g``
        in place first; the direction is the same, and the norm is then recomputed so that the
        step keeps its radius rho (clipping never touches the ascent)."""
        self._ascent.ascend_(
            checked.params,
            checked.grads,
            rho=self.rho,
            scaled=checked.scaled,
            grad_norm=None if self.max_grad_norm is not None else checked.norm,
        )

    def base_update(self) -> None:
        """Apply the base optimizer to the parameters with the current gradients (already
        zeroed by the check if the outer step saw a non-finite gradient), clipped to
        ``max_grad_norm``. This is the only place where descent happens."""
        params, grads, _ = self.gradients()
        if grads:
            # The norm of these gradients, unless they were replaced since the check (for FSDP2
            # shards, that of the whole gradients).
            checked = self._checked_norm
            norm = global_norm(grads) if checked is None else checked
            if self.max_grad_norm is not None:
                torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm, foreach=True)
            self.last_descent_grad_norm = norm
        self.cycle_changed()  # the base optimizer's state moves on
        self.base_optimizer.step()

    def swap(self, key: str) -> None:
        """Exchange the parameters' storage with the buffer ``key`` (see
        :func:`~hf_lookbehind.multi_tensor.swap_storage`); an exception later in the step swaps
        back."""
        swap_storage(self.params, self.lookbehind_state, key)
        self._transaction.swapped.append(key)

    def hold_backup(self, target: str, source: str) -> None:
        """Until the step ends, buffer ``source`` holds the values that ``target`` (a buffer
        key, or ``"params"``) had when the step began: an exception puts them back."""
        self._transaction.backups.append((target, source))

    def cycle_changed(self) -> None:
        """Something the open cycle carries to the next step changed without a backup: an
        exception from now on discards the cycle instead of restoring it."""
        self._transaction.recoverable = False

    def descend(self, *, record_first: bool = False) -> None:
        """``F <- A(F, g)`` with ``F`` swapped into the parameters for the update;
        ``record_first`` keeps ``F_1`` for adaptive alpha."""
        params = self.params
        self.swap(FAST)
        self.base_update()
        if record_first:
            copy_into_buffers(params, self.lookbehind_state, FIRST_FAST)
        self.swap(FAST)

    def finish_outer_step(self, slow: list[torch.Tensor]) -> None:
        """``S <- S + alpha (F_k - S)`` into ``slow`` (eq. 7-8 for adaptive alpha), gated by
        the non-finite flag; then count a skip and reset the flag."""
        fast = self.buffers(FAST)
        keep = self.keep_factor(slow[0].dtype)
        local_slow, local_fast = local_shards(slow), local_shards(fast)
        if self.alpha == "adaptive":
            first = self.buffers(FIRST_FAST)
            torch._foreach_sub_(local_shards(first), local_slow)
            torch._foreach_sub_(local_fast, local_slow)
            alpha = adaptive_alpha(first, fast, self.adaptive_scope)
        else:
            alpha = keep.new_full((), float(self.alpha))
            torch._foreach_sub_(local_fast, local_slow)
        # S + (keep alpha)(F - S); keep = 0 returns S exactly. One weight for the whole list
        # is one multi-tensor kernel; one weight per tensor (adaptive, per_tensor) has no
        # single-kernel form in torch (a list of 0-d weights runs tensor by tensor on CUDA).
        weight = (alpha * keep).to(slow[0].dtype)
        if weight.dim() == 0:
            torch._foreach_mul_(local_fast, weight)
            torch._foreach_add_(local_slow, local_fast)
        else:
            torch._foreach_addcmul_(local_slow, local_fast, list(weight.unbind()))
        self.param_groups[0][LAST_ALPHA] = alpha
        self.close_cycle()

    def advance_cycle(self) -> None:
        """One inner step of a cycle done (switching and lookahead mode); wraps to 0 after k."""
        run = self.param_groups[0]
        run[CYCLE_POSITION] = (run[CYCLE_POSITION] + 1) % self.k

    def close_cycle(self) -> None:
        """End an outer step: count a skip if it saw a non-finite gradient (the flag is reset
        when the step returns, after the BatchNorm statistics were restored)."""
        nonfinite, skipped = self.nonfinite_flag, self.param_groups[0][SKIPPED_STEPS]
        skipped.add_(nonfinite.to(skipped.dtype))
        self.param_groups[0][CYCLE_POSITION] = 0

    def record_perturbation_distance(
        self, perturbed: list[torch.Tensor], slow: list[torch.Tensor]
    ) -> None:
        """``||P_k - S||``, computed in place in ``perturbed`` (scratch afterwards)."""
        torch._foreach_sub_(local_shards(perturbed), local_shards(slow))
        self.last_perturbation_distance = global_norm(perturbed)

    # ------------------------------------------------------ mixed precision and processes
    @property
    def per_device_ascent(self) -> bool:
        """``ascent_sync="per_device"`` with more than one process."""
        return self.ascent_sync == "per_device" and world_size() > 1

    def after_backward(self) -> None:
        """After every pass, before the check: unscale fp16 gradients (and update the scale),
        and for per-device ascent keep this process's gradient and average them."""
        if self.grad_scaler is not None and self.grad_scaler.is_enabled():
            self.grad_scaler.unscale_(self.base_optimizer)
            self.grad_scaler.update()
        if self.per_device_ascent:
            params, grads, _ = self.gradients()
            for p, grad in zip(params, grads, strict=True):
                if LOCAL_GRAD not in self.lookbehind_state[p]:
                    self.lookbehind_state[p][LOCAL_GRAD] = torch.empty_like(grad)
            copy_values_([self.lookbehind_state[p][LOCAL_GRAD] for p in params], grads)
            average_(grads)

    def ascent_gradients(self, checked: CheckedGradients) -> CheckedGradients:
        """The gradients the next ascent uses: the checked (averaged) ones, or with per-device
        ascent this process's own (zeroed too when the step failed anywhere)."""
        if not self.per_device_ascent:
            return checked
        local = [self.lookbehind_state[p][LOCAL_GRAD] for p in checked.params]
        zero_nonfinite_(local, ~self.nonfinite_flag)
        return checked._replace(grads=local, norm=global_norm(local))

    def synchronize_gradient_sums(self, sums: list[torch.Tensor]) -> None:
        """m-SAM: with more than one process, average the k gradient sums over them, and skip
        the step everywhere if any process saw a non-finite value."""
        if world_size() > 1:
            average_(sums)
            agree_on_flag_(self.nonfinite_flag)

    # ------------------------------------------------------------------------------- step
    @torch.no_grad()
    def step(  # type: ignore[override]
        self, closure: Closure | Sequence[Closure] | None = None
    ) -> torch.Tensor:
        """One step on one minibatch; ``closure`` computes the loss on it and calls
        ``backward()`` (the engine zeroes gradients itself). With ``micro_batch_ascent`` it may
        be a sequence of closures, one per micro-batch. Returns the loss of the first pass, at
        the weights the parameters held on entry."""
        if closure is None:
            raise ValueError(
                "Lookbehind.step needs a closure that computes the loss on the minibatch and "
                "calls backward(); it runs it once per forward/backward pass"
            )
        if self.micro_batch_ascent:
            closures = [closure] if callable(closure) else list(closure)
            return self._run_transaction(lambda: micro_batch_ascent(self, closures))
        if not callable(closure):
            raise TypeError(
                "a sequence of closures (one per micro-batch) needs micro_batch_ascent=True"
            )
        schedule = schedule_for(self.method, self.minibatch_switching)
        return self._run_transaction(lambda: schedule(self, closure))

    def _run_transaction(self, run: Callable[[], torch.Tensor]) -> torch.Tensor:
        """Run one step's schedule so that every exit leaves the model at the slow weights: a
        skipped step (non-finite value) restores the BatchNorm statistics too, and an exception
        restores the parameters, statistics and run state (see :meth:`_roll_back`)."""
        self._begin_step()
        try:
            loss = run()
        except BaseException as error:
            self._roll_back(error)
            raise
        self._end_step()
        return loss

    def _begin_step(self) -> None:
        run = self.param_groups[0]
        flag = run[CYCLE_NONFINITE]
        # Between outer steps the flag is always reset; mid-cycle it carries the cycle's state.
        held = None if flag is None or run[CYCLE_POSITION] == 0 else flag.clone()
        self._transaction = _StepTransaction(
            cycle_position=run[CYCLE_POSITION],
            gradient_computations=run[GRADIENT_COMPUTATIONS],
            nonfinite=held,
        )
        if self._batchnorms:
            self._running_stats.save()

    def _end_step(self) -> None:
        flag = self.nonfinite_flag
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
        transaction, state, params = self._transaction, self.lookbehind_state, self.params
        for key in reversed(transaction.swapped):
            swap_storage(params, state, key)
        for target, source in reversed(transaction.backups):
            held = [p.data for p in params] if target == "params" else self.buffers(target)
            copy_values_(held, self.buffers(source))
        self._running_stats.restore()
        self.base_optimizer.zero_grad(set_to_none=True)
        run = self.param_groups[0]
        run[GRADIENT_COMPUTATIONS] = transaction.gradient_computations
        nonfinite, skipped = self._run_tensors(params[0].device)
        if transaction.recoverable:
            run[CYCLE_POSITION] = transaction.cycle_position
            if transaction.nonfinite is None:
                nonfinite.zero_()
            else:
                nonfinite.copy_(transaction.nonfinite)
            outcome = "the optimizer's state is as before the step"
        else:
            run[CYCLE_POSITION] = 0
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


@dataclass
class _StepTransaction:
    """What a step must undo on an exception: the storage swaps it made, the buffers holding
    values from before the step, and the run state it began with."""

    cycle_position: int = 0
    gradient_computations: int = 0
    nonfinite: torch.Tensor | None = None
    swapped: list[str] = field(default_factory=list)
    backups: list[tuple[str, str]] = field(default_factory=list)
    recoverable: bool = True
