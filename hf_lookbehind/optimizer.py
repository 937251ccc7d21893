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

Non-finite gradients: every pass checks the global gradient norm on the device. A NaN/inf in
any pass of an outer step (a cycle of k calls in switching and lookahead mode) discards the
outer step: ``S`` stays bit-identical and ``F``/``P`` restart from it, and
``skipped_steps`` counts it. From the bad pass on, gradients are zeroed: perturbations are
zero and the base optimizer sees finite zero-gradient updates, never NaN.
"""

from __future__ import annotations

import contextlib
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from .alpha import ADAPTIVE_SCOPES, adaptive_alpha
from .batchnorm import BATCHNORM_UPDATES, batchnorm_modules, frozen_running_stats
from .multi_tensor import (
    copy_into_buffers,
    global_norm,
    lerp_,
    swap_storage,
    zero_nonfinite_,
)
from .perturbation import PERTURBATIONS, ascend_

METHODS = ("lookbehind", "sam", "multistep", "multistep_avg", "lookahead")

# Per-parameter buffers. They live in ``Lookbehind.lookbehind_state``, apart from the base
# optimizer's ``state`` (which optimizers such as Adam initialise only while it is empty), and
# travel inside the base optimizer's per-parameter entries of ``state_dict()``.
FAST = "lookbehind_fast"
PERTURBED = "lookbehind_perturbed"
FIRST_FAST = "lookbehind_first_fast"
GRAD_SUM = "lookbehind_grad_sum"
BUFFERS = (FAST, PERTURBED, FIRST_FAST, GRAD_SUM)

# Run state, kept in ``param_groups[0]``.
CYCLE_POSITION = "lookbehind_cycle_position"
CYCLE_NONFINITE = "lookbehind_cycle_nonfinite"
SKIPPED_STEPS = "lookbehind_skipped_steps"
LAST_ALPHA = "lookbehind_last_alpha"
CONFIG = "lookbehind_config"
# Which config entries a checkpoint must agree on to be resumed.
_RESUME_KEYS = ("method", "k", "minibatch_switching", "adaptive")

Closure = Callable[[], torch.Tensor]


def _check_fraction(alpha: float | str, method: str) -> None:
    if alpha == "adaptive":
        if method != "lookbehind":
            raise ValueError(f"alpha='adaptive' is defined for method='lookbehind', not {method!r}")
        return
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be a number in (0, 1] or 'adaptive', got {alpha!r}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def _check_nonnegative(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0.0 <= value < float("inf")
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def validate_settings(
    *,
    method: str,
    k: int | None,
    alpha: float | str,
    rho: float,
    perturbation: str,
    asam_eta: float,
    adaptive_scope: str,
    minibatch_switching: bool,
    batchnorm_update: str,
    max_grad_norm: float | None = None,
) -> int:
    """Check a Lookbehind setup; raise ``ValueError`` saying what is wrong and what is allowed.
    Returns ``k`` with its default filled in (2, or 1 for sam)."""
    _check_choice("method", method, METHODS)
    if k is None:
        k = 1 if method == "sam" else 2
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if method == "sam" and k != 1:
        raise ValueError(f"method='sam' takes k=1, got k={k}; use method='multistep'")
    _check_fraction(alpha, method)
    _check_nonnegative("rho", rho)
    _check_nonnegative("asam_eta", asam_eta)
    _check_choice("perturbation", perturbation, PERTURBATIONS)
    if perturbation == "none" and method != "lookahead":
        raise ValueError(f"perturbation='none' is for method='lookahead', not {method!r}")
    _check_choice("adaptive_scope", adaptive_scope, ADAPTIVE_SCOPES)
    _check_choice("batchnorm_update", batchnorm_update, BATCHNORM_UPDATES)
    if minibatch_switching and method != "lookbehind":
        raise ValueError(
            f"minibatch_switching is a lookbehind mode; method={method!r} has no such mode "
            "(lookahead always takes one minibatch per inner step)"
        )
    if max_grad_norm is not None:
        _check_nonnegative("max_grad_norm", max_grad_norm)
        if max_grad_norm == 0:
            raise ValueError("max_grad_norm must be > 0, or None for no clipping")
    return k


class Lookbehind(torch.optim.Optimizer):
    """Lookbehind-SAM/ASAM and its baselines around any ``torch.optim.Optimizer``.

    Args:
        base_optimizer: the optimizer ``A`` that updates the fast weights (SGD, Adam, ...).
        method: ``lookbehind``, ``sam``, ``multistep``, ``multistep_avg`` or ``lookahead``.
        k: inner steps per outer step (ascent steps for multistep); default 2, and 1 for sam.
        alpha: slow-weight step size in (0, 1], or ``"adaptive"`` (eq. 7-8, lookbehind only).
        rho: neighbourhood radius of the ascent step.
        perturbation: ``sam`` (eq. 3), ``asam`` (eq. 4) or ``none`` (lookahead only).
        asam_eta: eta of ASAM's ``T = |w| + eta``. Which tensors ASAM rescales is the
            ``asam_scale`` setting of each parameter group (default True; see
            :func:`hf_lookbehind.asam_param_groups` for the public ASAM code's grouping).
        adaptive_scope: ``per_tensor`` (one angle per tensor, the public code) or ``global``.
        minibatch_switching: lookbehind only; one inner step per ``step()`` on a new minibatch.
        model: the model, needed only to control BatchNorm statistics.
        batchnorm_update: ``first_pass`` (default: only the first forward pass of each
            ``step()`` updates BatchNorm running statistics, which in same-batch mode is the
            pass at the slow weights that are evaluated) or ``every_pass`` (the public code).
            Without ``model`` the engine does not touch BatchNorm and every pass updates.
        max_grad_norm: clip the global gradient norm of every descent update to this value
            (never the ascent direction); ``None`` does not clip.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        method: str = "lookbehind",
        k: int | None = None,
        alpha: float | str = 0.5,
        rho: float = 0.05,
        perturbation: str = "sam",
        asam_eta: float = 0.01,
        adaptive_scope: str = "per_tensor",
        minibatch_switching: bool = False,
        model: nn.Module | None = None,
        batchnorm_update: str = "first_pass",
        max_grad_norm: float | None = None,
    ) -> None:
        if not isinstance(base_optimizer, torch.optim.Optimizer):
            raise TypeError(
                f"base_optimizer must be a torch.optim.Optimizer, got {type(base_optimizer)}"
            )
        k = validate_settings(
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
        )
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module or None, got {type(model)}")
        if any(group.get("maximize", False) for group in base_optimizer.param_groups):
            raise ValueError("Lookbehind minimises; the base optimizer must not set maximize=True")

        super().__init__(base_optimizer.param_groups, base_optimizer.defaults)
        self.param_groups = base_optimizer.param_groups
        self.state = base_optimizer.state
        self.lookbehind_state: defaultdict[torch.Tensor, dict[str, torch.Tensor]] = defaultdict(
            dict
        )
        self.base_optimizer = base_optimizer
        self.method = method
        self.k = k
        self.alpha = alpha
        self.rho = float(rho)
        self.perturbation = perturbation
        self.asam_eta = float(asam_eta)
        self.adaptive_scope = adaptive_scope
        self.minibatch_switching = bool(minibatch_switching)
        self.batchnorm_update = batchnorm_update
        self.max_grad_norm = max_grad_norm
        self._batchnorms = batchnorm_modules(model)
        self.last_ascent_grad_norm: torch.Tensor | None = None
        self.last_perturbation_distance: torch.Tensor | None = None
        self.last_descent_grad_norm: torch.Tensor | None = None
        self._checked_norm: torch.Tensor | None = None
        self._init_run_state()

    # ----------------------------------------------------------------- configuration and state
    @property
    def config(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "k": self.k,
            "alpha": self.alpha,
            "adaptive": self.alpha == "adaptive",
            "rho": self.rho,
            "perturbation": self.perturbation,
            "asam_eta": self.asam_eta,
            "adaptive_scope": self.adaptive_scope,
            "minibatch_switching": self.minibatch_switching,
            "batchnorm_update": self.batchnorm_update,
            "max_grad_norm": self.max_grad_norm,
        }

    def _init_run_state(self) -> None:
        for group in self.param_groups:
            group.setdefault("asam_scale", True)
        run = self.param_groups[0]
        run.setdefault(CYCLE_POSITION, 0)
        run.setdefault(CYCLE_NONFINITE, None)
        run.setdefault(SKIPPED_STEPS, None)
        run.setdefault(LAST_ALPHA, None)
        run[CONFIG] = self.config

    @property
    def cycle_position(self) -> int:
        """Inner steps done in the current outer step (always 0 in same-batch mode)."""
        return self.param_groups[0][CYCLE_POSITION]

    @property
    def skipped_steps(self) -> torch.Tensor | None:
        """Device counter of outer steps discarded for a non-finite gradient."""
        return self.param_groups[0][SKIPPED_STEPS]

    @property
    def last_alpha(self) -> torch.Tensor | None:
        """The alpha of the last slow-weight update: a 0-d tensor, or one per parameter
        tensor for ``adaptive_scope='per_tensor'`` (device tensors; read them when logging)."""
        return self.param_groups[0][LAST_ALPHA]

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        if "base_optimizer" not in self.__dict__:  # called by Optimizer.__init__
            return super().add_param_group(param_group)
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
        for index, p in enumerate(self._params):
            buffers = {k: v for k, v in self.lookbehind_state.get(p, {}).items() if k in BUFFERS}
            if buffers:
                packed[index] = {**packed.get(index, {}), **buffers}
        return {**state_dict, "state": packed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict["param_groups"][0].get(CONFIG)
        if saved is not None:
            mismatched = [key for key in _RESUME_KEYS if saved.get(key) != self.config[key]]
            if mismatched:
                details = ", ".join(
                    f"{key}={saved.get(key)!r} (now {self.config[key]!r})" for key in mismatched
                )
                raise ValueError(
                    f"checkpoint was written with a different Lookbehind setup: {details}"
                )
        base_entries, buffers = {}, {}
        for index, entry in state_dict["state"].items():
            base_entries[index] = {k: v for k, v in entry.items() if k not in BUFFERS}
            buffers[index] = {k: v for k, v in entry.items() if k in BUFFERS}
        self.base_optimizer.load_state_dict({**state_dict, "state": base_entries})
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
        self.lookbehind_state.clear()
        params = self._params
        for index, entry in buffers.items():
            p = params[index]
            for key, value in entry.items():
                self.lookbehind_state[p][key] = value.to(device=p.device, dtype=p.dtype)
        self._init_run_state()

    # ----------------------------------------------------------------------- building blocks
    @property
    def _params(self) -> list[torch.Tensor]:
        return [p for group in self.param_groups for p in group["params"]]

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
        run = self.param_groups[0]
        nonfinite, skipped = run[CYCLE_NONFINITE], run[SKIPPED_STEPS]
        if nonfinite is None:
            nonfinite = torch.zeros((), dtype=torch.bool, device=device)
        if skipped is None:
            skipped = torch.zeros((), dtype=torch.int64, device=device)
        run[CYCLE_NONFINITE], run[SKIPPED_STEPS] = nonfinite.to(device), skipped.to(device)
        return run[CYCLE_NONFINITE], run[SKIPPED_STEPS]

    def _forward_backward(self, closure: Closure, *, first: bool) -> torch.Tensor:
        """One pass: zero the gradients, run ``closure`` (forward + backward)."""
        self.base_optimizer.zero_grad(set_to_none=True)
        freeze = not first and self.batchnorm_update == "first_pass"
        stats = frozen_running_stats(self._batchnorms) if freeze else contextlib.nullcontext()
        with torch.enable_grad(), stats:
            return closure()

    def _checked_gradients(self):
        """Gradients of the last pass and their global norm. A non-finite norm marks the outer
        step as failed; from then on the gradients (and so every later perturbation and base
        update of the outer step) are zeroed, so nothing downstream turns NaN and a loss scaler
        sees only the overflow that happened."""
        params, grads, scaled = self._gradients()
        if not grads:
            raise RuntimeError(
                "the closure produced no gradient: it must compute the loss and call backward()"
            )
        norm = global_norm(grads)
        nonfinite, _ = self._run_tensors(grads[0].device)
        nonfinite.logical_or_(~torch.isfinite(norm))
        keep = self._keep(grads[0].dtype)
        zero_nonfinite_(grads, keep)
        self._checked_norm = torch.nan_to_num(norm * keep.to(norm.dtype), nan=0.0)
        return params, grads, scaled, self._checked_norm

    def _ascend(self, params, grads, scaled, norm) -> None:
        """``P <- P + eps(g)``. In same-batch mode a descent may have clipped ``g`` in place
        first; the direction is the same, and the norm is then recomputed so that the step
        keeps its radius rho (clipping never touches the ascent)."""
        ascend_(
            params,
            grads,
            rho=self.rho,
            perturbation=self.perturbation,
            asam_eta=self.asam_eta,
            asam_scaled=scaled,
            grad_norm=None if self.max_grad_norm is not None else norm,
        )

    def _keep(self, dtype: torch.dtype) -> torch.Tensor:
        """1 while the current outer step has seen only finite gradients, else 0."""
        return (~self.param_groups[0][CYCLE_NONFINITE]).to(dtype)

    def base_update(self) -> None:
        """Apply the base optimizer to the parameters with the current gradients (already
        zeroed by the check if the outer step saw a non-finite gradient), clipped to
        ``max_grad_norm``. This is the only place where descent happens."""
        params, grads, _ = self._gradients()
        if grads:
            if self.max_grad_norm is not None:
                self.last_descent_grad_norm = torch.nn.utils.clip_grad_norm_(
                    params, self.max_grad_norm, foreach=True
                )
            else:  # the norm of these gradients, unless they were replaced since the check
                checked = self._checked_norm
                self.last_descent_grad_norm = global_norm(grads) if checked is None else checked
        self.base_optimizer.step()

    def _descend(self, *, record_first: bool = False) -> None:
        """``F <- A(F, g)`` with ``F`` swapped into the parameters for the update."""
        params = self._params
        swap_storage(params, self.lookbehind_state, FAST)
        self.base_update()
        if record_first:
            copy_into_buffers(params, self.lookbehind_state, FIRST_FAST)
        swap_storage(params, self.lookbehind_state, FAST)

    def _finish_outer_step(self, slow: list[torch.Tensor]) -> None:
        """``S <- S + alpha (F_k - S)`` into ``slow`` (eq. 7-8 for adaptive alpha), gated by
        the non-finite flag; then count a skip and reset the flag."""
        params = self._params
        fast = [self.lookbehind_state[p][FAST] for p in params]
        keep = self._keep(slow[0].dtype)
        run = self.param_groups[0]
        if self.alpha == "adaptive":
            first = [self.lookbehind_state[p][FIRST_FAST] for p in params]
            torch._foreach_sub_(first, slow)
            torch._foreach_sub_(fast, slow)
            alpha = adaptive_alpha(first, fast, self.adaptive_scope)
            weights = (alpha * keep).expand(len(params)).to(slow[0].dtype)
            torch._foreach_addcmul_(slow, fast, list(weights.unbind()))
        else:
            lerp_(slow, fast, keep * float(self.alpha))  # Python scalar x gate: no host copy
            alpha = keep.new_full((), float(self.alpha))
        run[LAST_ALPHA] = alpha
        self._close_cycle()

    def _close_cycle(self) -> None:
        nonfinite, skipped = (
            self.param_groups[0][CYCLE_NONFINITE],
            self.param_groups[0][SKIPPED_STEPS],
        )
        skipped.add_(nonfinite.to(skipped.dtype))
        nonfinite.zero_()
        self.param_groups[0][CYCLE_POSITION] = 0

    def _perturbation_distance(self, perturbed: list[torch.Tensor], slow: list[torch.Tensor]):
        """``||P_k - S||``, computed in place in ``perturbed`` (scratch afterwards)."""
        torch._foreach_sub_(perturbed, slow)
        self.last_perturbation_distance = global_norm(perturbed)

    # ------------------------------------------------------------------------------- steps
    @torch.no_grad()
    def step(self, closure: Closure | None = None) -> torch.Tensor:  # type: ignore[override]
        """One step on one minibatch; ``closure`` computes the loss on it and calls
        ``backward()`` (the engine zeroes gradients itself). Returns the loss of the first
        pass, at the weights the parameters held on entry."""
        if closure is None:
            raise ValueError(
                "Lookbehind.step needs a closure that computes the loss on the minibatch and "
                "calls backward(); it runs it once per forward/backward pass"
            )
        if self.method == "lookahead":
            return self._lookahead_step(closure)
        if self.method == "lookbehind":
            if self.minibatch_switching:
                return self._lookbehind_switching_step(closure)
            return self._lookbehind_same_batch_step(closure)
        return self._multistep_step(closure)

    def _lookbehind_same_batch_step(self, closure: Closure) -> torch.Tensor:
        params = self._params
        loss = self._forward_backward(closure, first=True)
        checked = self._checked_gradients()
        self.last_ascent_grad_norm = checked[3]
        copy_into_buffers(params, self.lookbehind_state, FAST)  # F_0 = S
        copy_into_buffers(params, self.lookbehind_state, PERTURBED)  # keeps S while P moves
        for inner in range(1, self.k + 1):
            self._ascend(*checked)  # P_{i-1} -> P_i
            self._forward_backward(closure, first=False)
            checked = self._checked_gradients()
            self._descend(record_first=inner == 1 and self.alpha == "adaptive")
        slow = [self.lookbehind_state[p][PERTURBED] for p in params]
        self._perturbation_distance([p.data for p in params], slow)
        self._finish_outer_step(slow)
        swap_storage(params, self.lookbehind_state, PERTURBED)  # params <- new S
        return loss

    def _lookbehind_switching_step(self, closure: Closure) -> torch.Tensor:
        params = self._params
        position = self.cycle_position
        if position == 0:
            copy_into_buffers(params, self.lookbehind_state, FAST)
            copy_into_buffers(params, self.lookbehind_state, PERTURBED)
        swap_storage(params, self.lookbehind_state, PERTURBED)  # params <- P_{i-1}, buffer <- S
        loss = self._forward_backward(closure, first=True)
        checked = self._checked_gradients()
        self.last_ascent_grad_norm = checked[3]
        self._ascend(*checked)  # P_i
        self._forward_backward(closure, first=False)
        self._checked_gradients()
        self._descend(record_first=position == 0 and self.alpha == "adaptive")
        swap_storage(params, self.lookbehind_state, PERTURBED)  # params <- S, buffer <- P_i
        self.param_groups[0][CYCLE_POSITION] = position + 1
        if position + 1 == self.k:
            slow = [p.data for p in params]
            self._perturbation_distance([self.lookbehind_state[p][PERTURBED] for p in params], slow)
            self._finish_outer_step(slow)
        return loss

    def _lookahead_step(self, closure: Closure) -> torch.Tensor:
        params = self._params
        position = self.cycle_position
        if position == 0:
            copy_into_buffers(params, self.lookbehind_state, FAST)
        swap_storage(params, self.lookbehind_state, FAST)  # params <- F_{i-1}, buffer <- S
        loss = self._forward_backward(closure, first=True)
        checked = self._checked_gradients()
        self.last_ascent_grad_norm = checked[3]
        if self.perturbation != "none":
            copy_into_buffers(params, self.lookbehind_state, PERTURBED)  # keeps F_{i-1}
            self._ascend(*checked)
            self._forward_backward(closure, first=False)
            self._checked_gradients()
            swap_storage(params, self.lookbehind_state, PERTURBED)  # params <- F_{i-1}
        self.base_update()  # F_i
        swap_storage(params, self.lookbehind_state, FAST)  # params <- S, buffer <- F_i
        self.param_groups[0][CYCLE_POSITION] = position + 1
        if position + 1 == self.k:
            self._finish_outer_step([p.data for p in params])
        return loss

    def _multistep_step(self, closure: Closure) -> torch.Tensor:
        params = self._params
        loss = self._forward_backward(closure, first=True)
        checked = self._checked_gradients()
        self.last_ascent_grad_norm = checked[3]
        copy_into_buffers(params, self.lookbehind_state, PERTURBED)  # keeps S
        for inner in range(1, self.k + 1):
            self._ascend(*checked)
            self._forward_backward(closure, first=False)
            checked = self._checked_gradients()
            if self.method == "multistep_avg":
                params_with_grad, grads, _ = self._gradients()
                self._accumulate_gradients(params_with_grad, grads, first=inner == 1)
        slow = [self.lookbehind_state[p][PERTURBED] for p in params]
        self._perturbation_distance([p.data for p in params], slow)
        torch._foreach_copy_([p.data for p in params], slow)  # params <- S; buffer keeps S
        if self.method == "multistep_avg":
            self._load_average_gradients()
        self.base_update()
        # A skipped step restores S exactly: lerp with weight 1 returns its end point.
        nonfinite = self.param_groups[0][CYCLE_NONFINITE]
        lerp_([p.data for p in params], slow, nonfinite.to(slow[0].dtype))
        self._close_cycle()
        return loss

    def _accumulate_gradients(self, params, grads, *, first: bool) -> None:
        if first:
            for p, grad in zip(params, grads, strict=True):
                if GRAD_SUM not in self.lookbehind_state[p]:
                    self.lookbehind_state[p][GRAD_SUM] = torch.empty_like(grad)
            torch._foreach_copy_([self.lookbehind_state[p][GRAD_SUM] for p in params], grads)
        else:
            torch._foreach_add_([self.lookbehind_state[p][GRAD_SUM] for p in params], grads)

    def _load_average_gradients(self) -> None:
        self._checked_norm = None  # the averaged gradients are not the checked ones
        params = [p for p in self._params if p.grad is not None]
        for p in params:
            p.grad, self.lookbehind_state[p][GRAD_SUM] = self.lookbehind_state[p][GRAD_SUM], p.grad
        if params:
            average = [p.grad for p in params]
            torch._foreach_div_(average, float(self.k))
            # Passes before a non-finite one were summed unzeroed: gate the average too.
            torch._foreach_mul_(average, self._keep(average[0].dtype))
