"""One call of ``Lookbehind.step()``: :class:`Step`, the operations the schedules are written in.

A step owns what it changes: the parameters' values, the engine's buffers (named by what they
hold: ``SLOW`` S, ``FAST`` F, ``PERTURBED`` P, ``FIRST_FAST`` F_1, the gradient sums), the run
state, and the undo log that puts all of it back when the step is interrupted
(:mod:`hf_lookbehind.engine.undo`). Values pass from one operation to the next as return values
(:class:`Gradients`), never through attributes left for a later call.

Non-finite gradients: every pass checks the global gradient norm on the device. A NaN/inf in any
pass of an outer step (a cycle of k calls in switching and lookahead mode) discards the outer
step: ``S`` stays bit-identical and ``F``/``P`` restart from it. From the bad pass on, gradients
are zeroed: perturbations are zero and the base optimizer sees finite zero-gradient updates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from .alpha import adaptive_alpha
from .batchnorm import RunningStatsGuard, frozen_running_stats
from .distributed import agree_on_flag_, average_, world_size
from .hyperparameters import GroupValues
from .layout import Layout
from .multi_tensor import copy_values_, global_norm, per_tensor_norms, select_, zero_nonfinite_
from .perturbation import Perturbation
from .settings import LookbehindSettings
from .sharding import local_shards
from .undo import UndoLog

Closure = Callable[[], torch.Tensor]

SLOW = "lookbehind_slow"
FAST = "lookbehind_fast"
PERTURBED = "lookbehind_perturbed"
FIRST_FAST = "lookbehind_first_fast"
GRAD_SUM = "lookbehind_grad_sum"
LOCAL_GRAD = "lookbehind_local_grad"


def grad_sum(inner: int) -> str:
    """The buffer of the gradient sum of inner step ``inner`` (1-based; m-SAM)."""
    return f"{GRAD_SUM}_{inner}"


class Gradients(NamedTuple):
    """The gradients of one pass after the non-finite check."""

    index: list[int] | None  # positions of the parameters that received one; None: all
    grads: list[torch.Tensor]  # their gradients (``p.grad``): the descent's
    norm: torch.Tensor | None  # the descent's global norm (0-d; 0 after a non-finite value)
    ascent: list[torch.Tensor]  # the ascent's gradients (a process's own with per-device)
    ascent_norm: torch.Tensor


class Step:
    """The operations of one ``step()`` over the engine's buffers, run state and undo log."""

    def __init__(
        self,
        *,
        base: torch.optim.Optimizer,
        layout: Layout,
        buffers: dict[str, list[torch.Tensor]],
        run: dict[str, Any],
        settings: LookbehindSettings,
        values: GroupValues,
        ascent: Perturbation | None,
        guard: RunningStatsGuard | None,
        freeze_later_passes: bool,
        grad_scaler: torch.amp.GradScaler | None,
    ) -> None:
        self.base, self.layout, self.buffers, self.run = base, layout, buffers, run
        self.settings, self.values, self.ascent_step = settings, values, ascent
        self.guard, self.freeze_later_passes, self.grad_scaler = (
            guard,
            freeze_later_passes,
            grad_scaler,
        )
        self.k = settings.k
        self.per_device = settings.ascent_sync == "per_device" and world_size() > 1
        device = layout.device
        if run["cycle_nonfinite"] is None:
            run["cycle_nonfinite"] = torch.zeros((), dtype=torch.bool, device=device)
        if run["skipped_steps"] is None:
            run["skipped_steps"] = torch.zeros((), dtype=torch.int64, device=device)
        run["cycle_nonfinite"] = run["cycle_nonfinite"].to(device)
        self.nonfinite: torch.Tensor = run["cycle_nonfinite"]
        run["skipped_steps"] = run["skipped_steps"].to(device)
        self.position: int = run["cycle_position"]
        self.undo = UndoLog.begin(run, layout, buffers, guard)
        if self.position == 0:
            run["cycle_adaptive"] = values.adaptive
        self.adaptive: bool = run["cycle_adaptive"]
        self.diagnostics: dict[str, torch.Tensor | None] = {}

    # ------------------------------------------------------------------------------ passes
    def first_pass(self, closure: Closure, *, count: bool = True) -> tuple[torch.Tensor, Gradients]:
        """The pass at the weights the parameters hold on entry: its loss and gradients (the
        step's first ascent, whose norm the diagnostics keep)."""
        loss, grads = self._pass(closure, first=True, count=count)
        self.diagnostics.setdefault("ascent_grad_norm", grads.ascent_norm)
        return loss, grads

    def pass_(self, closure: Closure, *, count: bool = True) -> Gradients:
        """A later pass (at perturbed weights): its gradients."""
        return self._pass(closure, first=False, count=count)[1]

    def _pass(
        self, closure: Closure, *, first: bool, count: bool
    ) -> tuple[torch.Tensor, Gradients]:
        """Zero the gradients, run ``closure`` (forward + backward), unscale fp16 gradients and
        average per-device ones, then check them: a non-finite norm (or running statistic
        updated by this pass) marks the outer step as failed and zeroes the gradients."""
        if count:
            self.run["gradient_computations"] += 1
        self.base.zero_grad(set_to_none=True)
        guard = self.guard
        freeze = guard is not None and not first and self.freeze_later_passes
        frozen = frozen_running_stats(guard.modules) if freeze else contextlib.nullcontext()
        with torch.enable_grad(), frozen:
            loss = closure()
        statistics = [] if guard is None else guard.counted_pass(frozen=freeze)
        scaler = self.grad_scaler
        if scaler is not None and scaler.is_enabled():
            scaler.unscale_(self.base)
            scaler.update()
        params = self.layout.params
        grads = [p.grad for p in params]
        missing = [i for i, g in enumerate(grads) if g is None]
        index = None
        if missing:
            index = [i for i, g in enumerate(grads) if g is not None]
            grads = [grads[i] for i in index]
            if not grads:
                raise RuntimeError(
                    "the closure produced no gradient: it must compute the loss and call backward()"
                )
        if [g for g in grads if g.is_sparse]:
            raise ValueError(
                "a sparse gradient (nn.Embedding(sparse=True), nn.EmbeddingBag(sparse=True)): "
                "the ascent and the slow-weight update are dense, so the engine takes dense "
                "gradients only; build the layer with sparse=False"
            )
        local = self._keep_local(index, grads) if self.per_device else None
        sharded = self.layout.sharded
        norms = per_tensor_norms([*grads, *statistics], sharded)
        norm = torch.linalg.vector_norm(norms[: len(grads)] if statistics else norms)
        watched = norms.sum() if statistics else norm
        self.nonfinite.logical_or_(watched * 0 != 0)  # NaN or inf: 2 kernels, isfinite takes 5
        zero_nonfinite_(grads, ~self.nonfinite)
        norm = norm.masked_fill(self.nonfinite, 0.0)
        ascent, ascent_norm = grads, norm
        if local is not None:
            zero_nonfinite_(local, ~self.nonfinite)
            ascent, ascent_norm = local, global_norm(local, sharded)
        return loss, Gradients(index, grads, norm, ascent, ascent_norm)

    def _keep_local(self, index: list[int] | None, grads: list[torch.Tensor]) -> list[torch.Tensor]:
        """Per-device ascent: keep this process's gradients, then average ``grads``."""
        local = self._gradient_buffer(LOCAL_GRAD, index, grads)
        copy_values_(local, grads)
        average_(grads)
        return local

    # ----------------------------------------------------------------------------- buffers
    def _gradient_buffer(
        self, key: str, index: list[int] | None, grads: list[torch.Tensor]
    ) -> list[torch.Tensor]:
        """Buffer ``key``'s tensors at ``index``, allocated like ``grads`` where missing (a
        gradient-shaped buffer exists only for parameters that had a gradient)."""
        held = self.buffers.get(key)
        if held is None:
            held = self.buffers[key] = [None] * len(self.layout)  # type: ignore[list-item]
        index = list(range(len(held))) if index is None else index
        for j, i in enumerate(index):
            if held[i] is None:
                held[i] = torch.empty_like(grads[j])
        return [held[i] for i in index]

    def buffer(self, key: str) -> list[torch.Tensor]:
        return self.buffers[key]

    def copy_weights(self, key: str) -> list[torch.Tensor]:
        """``key <- the parameters' values`` (allocated on first use)."""
        self.buffers[key] = self.layout.copy_of_values(self.buffers.get(key))
        return self.buffers[key]

    def restore_slow(self) -> None:
        """The parameters take the values of ``SLOW`` (S) again."""
        copy_values_(self.layout.values(), self.buffers[SLOW])

    def hold_slow(self) -> None:
        """Same-batch and m-SAM: ``SLOW`` keeps S while the parameters move: the parameters
        take a copy of S, and their own storage waits in ``SLOW`` (an interruption swaps it
        back)."""
        self.copy_weights(SLOW)
        self.swap(SLOW)

    def swap(self, key: str) -> None:
        """Exchange the parameters' storage with buffer ``key`` (undone on an interruption)."""
        self.layout.swap(self.buffers[key])
        self.undo.swapped(key)

    def back_up(self, target: str, source: str) -> None:
        """Until the step ends, ``source`` holds the values ``target`` (a buffer, or
        ``"params"``) had: an interruption puts them back."""
        self.undo.backups.append((target, source))

    def moves_cycle(self) -> None:
        """Something the open cycle carries to the next call changes without a backup: an
        interruption from now on discards the cycle instead of restoring it."""
        self.undo.recoverable = False

    # ---------------------------------------------------------------------- ascent, descent
    def ascend(self, grads: Gradients) -> None:
        """``P <- P + eps(g)`` (eq. 3 or 4) with each group's rho; consumes ``grads.ascent``.
        After a clipped descent the direction is the same and the norm is measured anew, so the
        step keeps its radius rho (clipping never touches the ascent)."""
        rho, index = self.values.rho, grads.index
        if isinstance(rho, list) and index is not None:
            rho = [rho[i] for i in index]
        layout = self.layout
        params = layout.params if index is None else [layout.params[i] for i in index]
        scaled = layout.scaled if index is None else [layout.scaled[i] for i in index]
        self.ascent_step.ascend_(
            params,
            grads.ascent,
            rho=rho,
            scaled=scaled,
            grad_norm=None if self.settings.max_grad_norm is not None else grads.ascent_norm,
        )

    def update_base(self, grads: Gradients) -> None:
        """Apply the base optimizer to the parameters with ``grads`` (the ``.grad`` they hold),
        clipped to ``max_grad_norm``: the only place where descent happens."""
        if grads.grads:
            norm = (
                global_norm(grads.grads, self.layout.sharded) if grads.norm is None else grads.norm
            )
            if self.settings.max_grad_norm is not None:
                params = self.layout.params
                params = params if grads.index is None else [params[i] for i in grads.index]
                torch.nn.utils.clip_grads_with_norm_(
                    params, self.settings.max_grad_norm, norm, foreach=True
                )
            self.diagnostics["descent_grad_norm"] = norm
        self.moves_cycle()  # the base optimizer's state moves on
        self.base.step()

    def descend(self, grads: Gradients, *, record_first: bool = False) -> None:
        """``F <- A(F, g)`` with F swapped into the parameters; ``record_first`` keeps F_1 for
        adaptive alpha (eq. 7-8)."""
        self.swap(FAST)
        self.update_base(grads)
        if record_first:
            self.copy_weights(FIRST_FAST)
        self.swap(FAST)

    # ------------------------------------------------------------------ gradient sums (avg)
    def add_to_sum(self, key: str, grads: Gradients, summed: list[bool]) -> None:
        """``key += g`` over the passes of one step; ``summed[i]``: parameter i had a gradient
        in an earlier pass of the step (the others start their sum here), so a parameter without
        any gradient in the step keeps none, whatever earlier steps left."""
        self._gradient_buffer(key, grads.index, grads.grads)
        sums = self.buffers[key]
        index = list(range(len(sums))) if grads.index is None else grads.index
        started = [j for j, i in enumerate(index) if not summed[i]]
        added = [j for j, i in enumerate(index) if summed[i]]
        copy_values_([sums[index[j]] for j in started], [grads.grads[j] for j in started])
        if added:
            torch._foreach_add_([sums[index[j]] for j in added], [grads.grads[j] for j in added])
        for i in index:
            summed[i] = True

    def load_sum(self, key: str, summed: list[bool], divisor: float) -> Gradients:
        """Put ``key / divisor`` into ``.grad`` of the summed parameters and no gradient into the
        others, which are left alone as ``torch.optim`` leaves a parameter without gradient (the
        sums' storage and the gradients' swap places, so nothing is allocated). Passes before a
        non-finite one were summed unzeroed, so the result is gated by the non-finite flag."""
        sums, loaded, index = self.buffers[key], [], []
        for i, p in enumerate(self.layout.params):
            if not summed[i]:
                p.grad = None
                continue
            if p.grad is None:
                p.grad = torch.empty_like(sums[i])
            p.grad, sums[i] = sums[i], p.grad
            loaded.append(p.grad)
            index.append(i)
        if loaded:
            if divisor != 1.0:
                torch._foreach_div_(loaded, divisor)
            torch._foreach_mul_(loaded, self.keep_factor(loaded[0].dtype))
        return Gradients(index, loaded, None, loaded, None)  # type: ignore[arg-type]

    def average_sums(self, keys: list[str], summed: dict[str, list[bool]]) -> None:
        """m-SAM over processes: average the gradient sums, and fail the step everywhere if any
        process saw a non-finite value."""
        if world_size() > 1:
            sums = [self.buffers[key][i] for key in keys for i, s in enumerate(summed[key]) if s]
            average_(sums)
            agree_on_flag_(self.nonfinite)

    # ---------------------------------------------------------------- the outer step's end
    def keep_factor(self, dtype: torch.dtype) -> torch.Tensor:
        """1 while the outer step has seen only finite values, else 0."""
        return (~self.nonfinite).to(dtype)

    def measure_distance(self, perturbed: list[torch.Tensor], slow: list[torch.Tensor]) -> None:
        """``||P_k - S||`` for the diagnostics, computed in place in ``perturbed`` (scratch)."""
        torch._foreach_sub_(local_shards(perturbed), local_shards(slow))
        self.diagnostics["perturbation_distance"] = global_norm(perturbed, self.layout.sharded)

    def update_slow(self, slow: list[torch.Tensor]) -> None:
        """``S <- S + alpha (F_k - S)`` into ``slow`` (eq. 7-8 for adaptive alpha, each group's
        alpha otherwise), gated by the non-finite flag; then close the outer step."""
        fast = self.buffers[FAST]
        keep = self.keep_factor(slow[0].dtype)
        local_slow, local_fast = local_shards(slow), local_shards(fast)
        if self.adaptive:
            first = self.buffers[FIRST_FAST]
            torch._foreach_sub_(local_shards(first), local_slow)
            torch._foreach_sub_(local_fast, local_slow)
            alpha = adaptive_alpha(first, fast, self.settings.adaptive_alpha_scope or "per_tensor")
        else:
            static = self.values.alpha
            if isinstance(static, list):  # one value per parameter (the groups differ)
                alpha = torch.tensor(static, dtype=keep.dtype, device=keep.device)
            else:
                alpha = keep.new_full((), float(static))
            torch._foreach_sub_(local_fast, local_slow)
        # S + (keep alpha)(F - S); keep = 0 returns S exactly. One weight for the whole list is
        # one multi-tensor kernel; one weight per tensor has no single-kernel form in torch.
        weight = (alpha * keep).to(slow[0].dtype)
        if weight.dim() == 0:
            torch._foreach_mul_(local_fast, weight)
            torch._foreach_add_(local_slow, local_fast)
        else:
            torch._foreach_addcmul_(local_slow, local_fast, list(weight.unbind()))
        self.run["last_alpha"] = alpha
        self.close_outer_step()

    def keep_slow_if_skipped(self, slow: list[torch.Tensor]) -> None:
        """After a base update of S itself (SAM, Multistep): a failed step keeps S."""
        select_(self.layout.values(), slow, self.nonfinite)

    def close_outer_step(self) -> None:
        """Count a skip if the outer step saw a non-finite value; the cycle starts anew."""
        run = self.run
        run["skipped_steps"].add_(self.nonfinite.to(run["skipped_steps"].dtype))
        run["cycle_position"] = 0

    def end_inner_step(self) -> bool:
        """One inner step of a cycle done (switching and lookahead); True after the k-th."""
        self.run["cycle_position"] = (self.position + 1) % self.k
        return self.run["cycle_position"] == 0

    def finish(self) -> None:
        """The step returns: a skipped outer step restores the running statistics, and the
        non-finite flag is reset between outer steps."""
        if self.guard is not None:
            self.guard.restore(drop=self.nonfinite)
        if self.run["cycle_position"] == 0:
            self.nonfinite.zero_()
