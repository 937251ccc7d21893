"""The step schedules: which passes, ascents and descents one ``Lookbehind.step()`` runs.

Each schedule is a small function over the engine's primitives (:class:`hf_lookbehind.Lookbehind`:
``forward_backward``, ``checked_gradients``, ``ascend``, ``descend``, ``base_update``,
``finish_outer_step``, ...). Notation: ``S`` slow, ``F`` fast, ``P`` perturbed weights; the
parameters hold ``S`` between calls.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch

from .multi_tensor import copy_into_buffers, copy_values_, lerp_, swap_storage

if TYPE_CHECKING:
    from .optimizer import Closure, Lookbehind

FAST = "lookbehind_fast"
PERTURBED = "lookbehind_perturbed"
FIRST_FAST = "lookbehind_first_fast"
GRAD_SUM = "lookbehind_grad_sum"
BUFFERS = (FAST, PERTURBED, FIRST_FAST, GRAD_SUM)


def lookbehind_same_batch(engine: Lookbehind, closure: Closure) -> torch.Tensor:
    """Algorithm 1 on one minibatch with k + 1 passes: the gradient at ``P_i`` is the descent
    gradient of inner step i and the ascent gradient of inner step i + 1."""
    params = engine.params
    loss = engine.forward_backward(closure, first=True)
    checked = engine.checked_gradients()
    engine.last_ascent_grad_norm = checked.norm
    copy_into_buffers(params, engine.lookbehind_state, FAST)  # F_0 = S
    copy_into_buffers(params, engine.lookbehind_state, PERTURBED)  # keeps S while P moves
    for inner in range(1, engine.k + 1):
        engine.ascend(checked)  # P_{i-1} -> P_i
        engine.forward_backward(closure, first=False)
        checked = engine.checked_gradients()
        engine.descend(record_first=inner == 1 and engine.alpha == "adaptive")
    slow = engine.buffers(PERTURBED)
    engine.record_perturbation_distance([p.data for p in params], slow)
    engine.finish_outer_step(slow)
    swap_storage(params, engine.lookbehind_state, PERTURBED)  # params <- new S
    return loss


def lookbehind_switching(engine: Lookbehind, closure: Closure) -> torch.Tensor:
    """One inner step of Algorithm 1 on a new minibatch (Sec. 6.2, 2 passes); the k-th call of
    a cycle updates ``S``."""
    params = engine.params
    position = engine.cycle_position
    if position == 0:
        copy_into_buffers(params, engine.lookbehind_state, FAST)
        copy_into_buffers(params, engine.lookbehind_state, PERTURBED)
    swap_storage(params, engine.lookbehind_state, PERTURBED)  # params <- P_{i-1}, buffer <- S
    loss = engine.forward_backward(closure, first=True)
    checked = engine.checked_gradients()
    engine.last_ascent_grad_norm = checked.norm
    engine.ascend(checked)  # P_i
    engine.forward_backward(closure, first=False)
    engine.checked_gradients()
    engine.descend(record_first=position == 0 and engine.alpha == "adaptive")
    swap_storage(params, engine.lookbehind_state, PERTURBED)  # params <- S, buffer <- P_i
    engine.advance_cycle()
    if engine.cycle_position == 0:
        slow = [p.data for p in params]
        engine.record_perturbation_distance(engine.buffers(PERTURBED), slow)
        engine.finish_outer_step(slow)
    return loss


def lookahead(engine: Lookbehind, closure: Closure) -> torch.Tensor:
    """Lookahead (Zhang et al.) with a SAM/ASAM (or plain) inner step: one inner step per call,
    ``S <- S + alpha (F_k - S)`` every k-th call."""
    params = engine.params
    if engine.cycle_position == 0:
        copy_into_buffers(params, engine.lookbehind_state, FAST)
    swap_storage(params, engine.lookbehind_state, FAST)  # params <- F_{i-1}, buffer <- S
    loss = engine.forward_backward(closure, first=True)
    checked = engine.checked_gradients()
    engine.last_ascent_grad_norm = checked.norm
    if engine.perturbation != "none":
        copy_into_buffers(params, engine.lookbehind_state, PERTURBED)  # keeps F_{i-1}
        engine.ascend(checked)
        engine.forward_backward(closure, first=False)
        engine.checked_gradients()
        swap_storage(params, engine.lookbehind_state, PERTURBED)  # params <- F_{i-1}
    engine.base_update()  # F_i
    swap_storage(params, engine.lookbehind_state, FAST)  # params <- S, buffer <- F_i
    engine.advance_cycle()
    if engine.cycle_position == 0:
        engine.finish_outer_step([p.data for p in params])
    return loss


def multistep(engine: Lookbehind, closure: Closure) -> torch.Tensor:
    """SAM (k = 1) and Multistep-SAM: k ascent steps from ``S``, then one base update of ``S``
    with the last gradient (``multistep``) or the average of the gradients at ``P_1..P_k``
    (``multistep_avg``)."""
    params = engine.params
    average = engine.method == "multistep_avg"
    loss = engine.forward_backward(closure, first=True)
    checked = engine.checked_gradients()
    engine.last_ascent_grad_norm = checked.norm
    copy_into_buffers(params, engine.lookbehind_state, PERTURBED)  # keeps S
    for inner in range(1, engine.k + 1):
        engine.ascend(checked)
        engine.forward_backward(closure, first=False)
        checked = engine.checked_gradients()
        if average:
            _accumulate_gradients(engine, checked.params, checked.grads, first=inner == 1)
    slow = engine.buffers(PERTURBED)
    engine.record_perturbation_distance([p.data for p in params], slow)
    copy_values_([p.data for p in params], slow)  # params <- S; buffer keeps S
    if average:
        _load_average_gradients(engine)
    engine.base_update()
    # A skipped step restores S exactly: lerp with weight 1 returns its end point.
    lerp_([p.data for p in params], slow, engine.nonfinite_flag.to(slow[0].dtype))
    engine.close_cycle()
    return loss


def _accumulate_gradients(engine: Lookbehind, params, grads, *, first: bool) -> None:
    state = engine.lookbehind_state
    if first:
        for p, grad in zip(params, grads, strict=True):
            if GRAD_SUM not in state[p]:
                state[p][GRAD_SUM] = torch.empty_like(grad)
        copy_values_([state[p][GRAD_SUM] for p in params], grads)
    else:
        torch._foreach_add_([state[p][GRAD_SUM] for p in params], grads)


def _load_average_gradients(engine: Lookbehind) -> None:
    """Put the average of the summed gradients into ``.grad`` (the sums' storage becomes the
    buffer for the next step's sums)."""
    engine.forget_checked_norm()  # the averaged gradients are not the checked ones
    state = engine.lookbehind_state
    params = [p for p in engine.params if p.grad is not None]
    for p in params:
        p.grad, state[p][GRAD_SUM] = state[p][GRAD_SUM], p.grad
    if params:
        average = [p.grad for p in params]
        torch._foreach_div_(average, float(engine.k))
        # Passes before a non-finite one were summed unzeroed: gate the average too.
        torch._foreach_mul_(average, engine.keep_factor(average[0].dtype))


Schedule = Callable[["Lookbehind", "Closure"], torch.Tensor]


def schedule_for(method: str, minibatch_switching: bool) -> Schedule:
    """The schedule that runs one ``step()`` of ``method``."""
    if method == "lookahead":
        return lookahead
    if method == "lookbehind":
        return lookbehind_switching if minibatch_switching else lookbehind_same_batch
    return multistep
