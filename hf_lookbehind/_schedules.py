"""The step schedules: which passes, ascents and descents one ``Lookbehind.step()`` runs.

Internal to the engine: each schedule is a small function over the private primitives of
:class:`hf_lookbehind.Lookbehind` (``_forward_backward``, ``_checked_gradients``, ``_ascend``,
``_descend``, ``_base_update``, ``_finish_outer_step``, ...). State flows one way: a schedule
calls primitives, which own every change of the engine's state; it assigns nothing itself.
Notation: ``S`` slow, ``F`` fast, ``P`` perturbed weights; the parameters hold ``S`` between
calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch

from .multi_tensor import copy_into_buffers, copy_values_, select_

if TYPE_CHECKING:
    from .optimizer import Closure, Lookbehind

FAST = "lookbehind_fast"
PERTURBED = "lookbehind_perturbed"
FIRST_FAST = "lookbehind_first_fast"
GRAD_SUM = "lookbehind_grad_sum"
BUFFERS = (FAST, PERTURBED, FIRST_FAST, GRAD_SUM)


def micro_batch_grad_sum(inner: int) -> str:
    """Buffer key of the m-SAM gradient sum of inner step ``inner`` (1-based)."""
    return f"{GRAD_SUM}_{inner}"


def lookbehind_same_batch(engine: Lookbehind, closure: Closure) -> torch.Tensor:
    """Algorithm 1 on one minibatch with k + 1 passes: the gradient at ``P_i`` is the descent
    gradient of inner step i and the ascent gradient of inner step i + 1."""
    params = engine._params
    loss = engine._forward_backward(closure, first=True)
    checked = engine._checked_gradients()
    engine._record_ascent_norm(checked)
    copy_into_buffers(params, engine._lookbehind_state, FAST)  # F_0 = S
    copy_into_buffers(params, engine._lookbehind_state, PERTURBED)  # keeps S while P moves
    engine._hold_backup("params", PERTURBED)
    for inner in range(1, engine._setup.k + 1):
        engine._ascend(checked)  # P_{i-1} -> P_i
        engine._forward_backward(closure, first=False)
        checked = engine._checked_gradients()
        engine._descend(record_first=inner == 1 and engine._adaptive)
    slow = engine._buffers(PERTURBED)
    engine._record_perturbation_distance([p.data for p in params], slow)
    engine._finish_outer_step(slow)
    engine._swap(PERTURBED)  # params <- new S
    return loss


def lookbehind_switching(engine: Lookbehind, closure: Closure) -> torch.Tensor:
    """One inner step of Algorithm 1 on a new minibatch (Sec. 6.2, 2 passes); the k-th call of
    a cycle updates ``S``."""
    params = engine._params
    position = engine.cycle_position
    if position == 0:
        copy_into_buffers(params, engine._lookbehind_state, FAST)
        copy_into_buffers(params, engine._lookbehind_state, PERTURBED)
    engine._swap(PERTURBED)  # params <- P_{i-1}, buffer <- S
    loss = engine._forward_backward(closure, first=True)
    checked = engine._checked_gradients()
    engine._record_ascent_norm(checked)
    if position > 0:
        engine._cycle_changed()  # P_{i-1}, carried from the last call, moves on
    engine._ascend(checked)  # P_i
    engine._forward_backward(closure, first=False)
    engine._checked_gradients()
    engine._descend(record_first=position == 0 and engine._adaptive)
    engine._swap(PERTURBED)  # params <- S, buffer <- P_i
    engine._advance_cycle()
    if engine.cycle_position == 0:
        slow = [p.data for p in params]
        engine._record_perturbation_distance(engine._buffers(PERTURBED), slow)
        engine._finish_outer_step(slow)
    return loss


def lookahead(engine: Lookbehind, closure: Closure) -> torch.Tensor:
    """Lookahead (Zhang et al.) with a SAM/ASAM (or plain) inner step: one inner step per call,
    ``S <- S + alpha (F_k - S)`` every k-th call."""
    params = engine._params
    if engine.cycle_position == 0:
        copy_into_buffers(params, engine._lookbehind_state, FAST)
    engine._swap(FAST)  # params <- F_{i-1}, buffer <- S
    loss = engine._forward_backward(closure, first=True)
    checked = engine._checked_gradients()
    engine._record_ascent_norm(checked)
    if engine._setup.perturbation != "none":
        copy_into_buffers(params, engine._lookbehind_state, PERTURBED)  # keeps F_{i-1}
        engine._hold_backup(FAST, PERTURBED)
        engine._ascend(checked)
        engine._forward_backward(closure, first=False)
        engine._checked_gradients()
        engine._swap(PERTURBED)  # params <- F_{i-1}
    engine._base_update()  # F_i
    engine._swap(FAST)  # params <- S, buffer <- F_i
    engine._advance_cycle()
    if engine.cycle_position == 0:
        engine._finish_outer_step([p.data for p in params])
    return loss


def multistep(engine: Lookbehind, closure: Closure) -> torch.Tensor:
    """SAM (k = 1) and Multistep-SAM: k ascent steps from ``S``, then one base update of ``S``
    with the last gradient (``multistep``) or the average of the gradients at ``P_1..P_k``
    (``multistep_avg``)."""
    params = engine._params
    average = engine._setup.method == "multistep_avg"
    loss = engine._forward_backward(closure, first=True)
    checked = engine._checked_gradients()
    engine._record_ascent_norm(checked)
    copy_into_buffers(params, engine._lookbehind_state, PERTURBED)  # keeps S
    engine._hold_backup("params", PERTURBED)
    summed: set[torch.Tensor] = set()
    for _ in range(engine._setup.k):
        engine._ascend(checked)
        engine._forward_backward(closure, first=False)
        checked = engine._checked_gradients()
        if average:
            _accumulate_gradients(engine, checked.params, checked.grads, GRAD_SUM, summed)
    slow = engine._buffers(PERTURBED)
    engine._record_perturbation_distance([p.data for p in params], slow)
    copy_values_([p.data for p in params], slow)  # params <- S; buffer keeps S
    if average:
        _load_gradient_sum(engine, GRAD_SUM, summed, divisor=float(engine._setup.k))
    engine._base_update()
    select_([p.data for p in params], slow, engine._nonfinite_flag)  # a skipped step keeps S
    engine._close_cycle()
    return loss


def _accumulate_gradients(
    engine: Lookbehind, params, grads, key: str, summed: set[torch.Tensor]
) -> None:
    """``state[p][key] += grad`` over the passes of one step; ``summed`` holds the parameters
    that had a gradient in an earlier pass of the step (the others start their sum here), so
    a parameter without any gradient in the step keeps none, whatever earlier steps left."""
    state = engine._lookbehind_state
    started = [index for index, p in enumerate(params) if p not in summed]
    for index in started:
        p = params[index]
        if key not in state[p]:
            state[p][key] = torch.empty_like(grads[index])
        summed.add(p)
    copy_values_([state[params[i]][key] for i in started], [grads[i] for i in started])
    if len(started) < len(params):
        new = set(started)
        added = [i for i in range(len(params)) if i not in new]
        torch._foreach_add_([state[params[i]][key] for i in added], [grads[i] for i in added])


def _load_gradient_sum(
    engine: Lookbehind, key: str, summed: set[torch.Tensor], *, divisor: float
) -> None:
    """Put the summed gradients ``state[p][key] / divisor`` into ``.grad`` of the parameters in
    ``summed``, and no gradient into the others, so that those are left alone as
    ``torch.optim`` leaves a parameter without gradient (the sums' storage and the gradients'
    swap places, so nothing is allocated). Passes before a non-finite one were summed
    unzeroed, so the result is gated by the non-finite flag."""
    engine._forget_checked_norm()  # these gradients are not the checked ones
    state = engine._lookbehind_state
    loaded = []
    for p in engine._params:
        if p not in summed:
            p.grad = None
            continue
        if p.grad is None:
            p.grad = torch.empty_like(state[p][key])
        p.grad, state[p][key] = state[p][key], p.grad
        loaded.append(p.grad)
    if loaded:
        if divisor != 1.0:
            torch._foreach_div_(loaded, divisor)
        torch._foreach_mul_(loaded, engine._keep_factor(loaded[0].dtype))


def micro_batch_ascent(engine: Lookbehind, closures: Sequence[Closure]) -> torch.Tensor:
    """m-SAM (Foret et al.; Table 9 of the Lookbehind paper) and Lookbehind-m-SAM, same batch.

    The batch comes as micro-batches, one closure each; like gradient accumulation, each
    closure's loss is its share of the batch loss, so the gradients sum to the batch gradient.
    Every micro-batch ``j`` follows its own ascent path from ``S``:
    ``P_{j,i} = P_{j,i-1} + eps(g_j(P_{j,i-1}))``, and inner step i descends with the sum over
    ``j`` of ``g_j(P_{j,i})``: ``F_i = A(F_{i-1}, sum_j g_j(P_{j,i}))`` (for sam, k = 1 and
    ``S <- A(S, sum_j g_j(P_{j,1}))``). Since no ``P`` depends on ``F``, the micro-batches run
    one after the other (each k + 1 passes) and the k descents follow, so the memory does not
    grow with the number of micro-batches: one copy of ``S`` and k gradient sums (plus ``F``,
    and ``F_1`` for adaptive alpha). Only the first micro-batch's passes are counted as
    gradient computations: the k + 1 passes over the batch.
    """
    params = engine._params
    state = engine._lookbehind_state
    sums = [micro_batch_grad_sum(i) for i in range(1, engine._setup.k + 1)]
    copy_into_buffers(params, state, PERTURBED)  # keeps S
    engine._hold_backup("params", PERTURBED)
    slow = engine._buffers(PERTURBED)
    summed: dict[str, set[torch.Tensor]] = {key: set() for key in sums}
    loss = None
    for index, closure in enumerate(closures):
        if index > 0:
            copy_values_([p.data for p in params], slow)  # params <- S
        micro_loss = engine._forward_backward(closure, first=True, count=index == 0)
        loss = micro_loss if loss is None else loss + micro_loss
        checked = engine._checked_gradients()
        if index == 0:
            engine._record_ascent_norm(checked)
        for key in sums:
            engine._ascend(checked)  # P_{j,i}
            engine._forward_backward(closure, first=False, count=index == 0)
            checked = engine._checked_gradients()
            _accumulate_gradients(engine, checked.params, checked.grads, key, summed[key])
    engine._record_perturbation_distance([p.data for p in params], slow)  # of the last path
    copy_values_([p.data for p in params], slow)  # params <- S
    engine._synchronize_gradient_sums(
        [state[p][key] for key in sums for p in params if p in summed[key]]
    )
    if engine._setup.method == "sam":
        _load_gradient_sum(engine, sums[0], summed[sums[0]], divisor=1.0)
        engine._base_update()
        select_([p.data for p in params], slow, engine._nonfinite_flag)  # a skipped step keeps S
        engine._close_cycle()
        return loss
    copy_into_buffers(params, state, FAST)  # F_0 = S
    for inner, key in enumerate(sums, start=1):
        _load_gradient_sum(engine, key, summed[key], divisor=1.0)
        engine._descend(record_first=inner == 1 and engine._adaptive)
    slow = [p.data for p in params]
    engine._finish_outer_step(slow)
    return loss


Schedule = Callable[["Lookbehind", "Closure"], torch.Tensor]


def schedule_for(method: str, minibatch_switching: bool) -> Schedule:
    """The schedule that runs one ``step()`` of ``method``."""
    if method == "lookahead":
        return lookahead
    if method == "lookbehind":
        return lookbehind_switching if minibatch_switching else lookbehind_same_batch
    return multistep
