"""The step schedules: which passes, ascents and descents one ``Lookbehind.step()`` runs, each
written as its line of Algorithm 1 over the operations of one :class:`~.step.Step`.

Notation: ``S`` slow, ``F`` fast, ``P`` perturbed weights, ``g(w)`` the minibatch gradient at
``w``; the parameters hold ``S`` between calls. A schedule writes no buffer itself: every change
goes through the step, which logs what an interruption must undo.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from .step import FAST, FIRST_FAST, GRAD_SUM, PERTURBED, SLOW, Closure, Step, grad_sum

# The buffers a checkpoint saved in the middle of a cycle carries (switching and lookahead).
CYCLE_BUFFERS = (FAST, PERTURBED, FIRST_FAST)
BUFFERS = (SLOW, FAST, PERTURBED, FIRST_FAST, GRAD_SUM)


def lookbehind_same_batch(step: Step, closure: Closure) -> torch.Tensor:
    """Algorithm 1 on one minibatch with k + 1 passes: ``g(P_i)`` is the descent gradient of
    inner step i and the ascent gradient of inner step i + 1."""
    loss, grads = step.first_pass(closure)  # g(S)
    step.copy_weights(FAST)  # F_0 = S
    step.hold_slow()  # P_0 = S; SLOW keeps S
    for inner in range(1, step.k + 1):
        step.ascend(grads)  # P_i = P_{i-1} + eps(g(P_{i-1}))
        grads = step.pass_(closure)  # g(P_i)
        step.descend(grads, record_first=inner == 1 and step.adaptive)  # F_i = A(F_{i-1}, g)
    step.measure_distance(step.layout.values(), step.buffer(SLOW))  # ||P_k - S||
    step.update_slow(step.buffer(SLOW))  # S <- S + alpha (F_k - S)
    step.swap(SLOW)  # the parameters hold S again
    return loss


def lookbehind_switching(step: Step, closure: Closure) -> torch.Tensor:
    """One inner step of Algorithm 1 on a new minibatch (Sec. 6.2, 2 passes); the k-th call of
    a cycle updates ``S``."""
    first_call = step.position == 0
    if first_call:
        step.copy_weights(FAST)  # F_0 = S
        step.copy_weights(PERTURBED)  # P_0 = S
    step.swap(PERTURBED)  # the parameters hold P_{i-1}, the buffer S
    loss, grads = step.first_pass(closure)  # g(P_{i-1})
    if not first_call:
        step.moves_cycle()  # P_{i-1}, carried from the last call, moves on
    step.ascend(grads)  # P_i
    grads = step.pass_(closure)  # g(P_i)
    step.descend(grads, record_first=first_call and step.adaptive)  # F_i
    step.swap(PERTURBED)  # the parameters hold S, the buffer P_i
    if step.end_inner_step():
        step.measure_distance(step.buffer(PERTURBED), step.layout.values())
        step.update_slow(step.layout.values())
    return loss


def lookahead(step: Step, closure: Closure) -> torch.Tensor:
    """Lookahead (Zhang et al.) with a SAM/ASAM (or plain) inner step: one inner step per call,
    ``S <- S + alpha (F_k - S)`` every k-th call."""
    if step.position == 0:
        step.copy_weights(FAST)  # F_0 = S
    step.swap(FAST)  # the parameters hold F_{i-1}, the buffer S
    loss, grads = step.first_pass(closure)  # g(F_{i-1})
    if step.ascent_step is not None:
        step.copy_weights(PERTURBED)  # keeps F_{i-1}
        step.back_up(FAST, PERTURBED)
        step.ascend(grads)  # F_{i-1} + eps
        grads = step.pass_(closure)
        step.swap(PERTURBED)  # the parameters hold F_{i-1}
    step.update_base(grads)  # F_i
    step.swap(FAST)  # the parameters hold S, the buffer F_i
    if step.end_inner_step():
        step.update_slow(step.layout.values())
    return loss


def multistep(step: Step, closure: Closure) -> torch.Tensor:
    """SAM (k = 1) and Multistep-SAM: k ascent steps from ``S``, then one base update of ``S``
    with the last gradient (``multistep``) or the average of the gradients at ``P_1..P_k``
    (``multistep_avg``)."""
    average = step.settings.method == "multistep_avg"
    loss, grads = step.first_pass(closure)  # g(S)
    slow = step.copy_weights(SLOW)
    step.back_up("params", SLOW)
    summed = [False] * len(step.layout)
    for _ in range(step.k):
        step.ascend(grads)  # P_i
        grads = step.pass_(closure)  # g(P_i)
        if average:
            step.add_to_sum(GRAD_SUM, grads, summed)
    step.measure_distance(step.layout.values(), slow)
    step.restore_slow()  # the parameters hold S
    if average:
        grads = step.load_sum(GRAD_SUM, summed, divisor=float(step.k))
    step.update_base(grads)  # S <- A(S, g)
    step.keep_slow_if_skipped(slow)
    step.close_outer_step()
    return loss


def micro_batch_ascent(step: Step, closures: Sequence[Closure]) -> torch.Tensor:
    """m-SAM (Foret et al.; Table 9 of the Lookbehind paper) and Lookbehind-m-SAM, same batch.

    Each closure's loss is its micro-batch's share of the batch loss, so the gradients sum to
    the batch gradient. Every micro-batch ``j`` follows its own ascent path from ``S``:
    ``P_{j,i} = P_{j,i-1} + eps(g_j(P_{j,i-1}))``, and inner step i descends with
    ``sum_j g_j(P_{j,i})`` (for sam, k = 1 and ``S <- A(S, sum_j g_j(P_{j,1}))``). No ``P``
    depends on ``F``, so the micro-batches run one after the other (k + 1 passes each) and the k
    descents follow: the memory is one copy of ``S`` and k gradient sums (plus ``F``, and
    ``F_1`` for adaptive alpha) whatever the number of micro-batches. Only the first
    micro-batch's passes count as gradient computations: the k + 1 passes over the batch."""
    sums, summed, loss = _micro_batch_paths(step, closures)
    if step.settings.method == "sam":
        step.update_base(step.load_sum(sums[0], summed[sums[0]], divisor=1.0))  # S <- A(S, g)
        step.keep_slow_if_skipped(step.buffer(SLOW))
        step.close_outer_step()
        return loss
    step.copy_weights(FAST)  # F_0 = S
    for inner, key in enumerate(sums, start=1):
        grads = step.load_sum(key, summed[key], divisor=1.0)  # sum_j g_j(P_{j,i})
        step.descend(grads, record_first=inner == 1 and step.adaptive)  # F_i
    step.update_slow(step.layout.values())  # S <- S + alpha (F_k - S)
    return loss


def _micro_batch_paths(
    step: Step, closures: Sequence[Closure]
) -> tuple[list[str], dict[str, list[bool]], torch.Tensor]:
    """Every micro-batch's ascent path from S, summing the gradients at ``P_{j,i}`` into the
    sum of inner step i; the parameters hold S on return. Returns the sums' buffers, which
    parameters each sum covers, and the summed loss of the first passes."""
    sums = [grad_sum(inner) for inner in range(1, step.k + 1)]
    summed = {key: [False] * len(step.layout) for key in sums}
    slow = step.copy_weights(SLOW)
    step.back_up("params", SLOW)
    loss = None
    for index, closure in enumerate(closures):
        if index > 0:
            step.restore_slow()  # every path starts at S
        micro_loss, grads = step.first_pass(closure, count=index == 0)
        loss = micro_loss if loss is None else loss + micro_loss
        for key in sums:
            step.ascend(grads)  # P_{j,i}
            grads = step.pass_(closure, count=index == 0)
            step.add_to_sum(key, grads, summed[key])
    step.measure_distance(step.layout.values(), slow)  # of the last path
    step.restore_slow()
    step.average_sums(sums, summed)
    return sums, summed, loss


Schedule = Callable[[Step, Closure], torch.Tensor]


def schedule_for(method: str, minibatch_switching: bool) -> Schedule:
    """The schedule that runs one ``step()`` of ``method``."""
    if method == "lookahead":
        return lookahead
    if method == "lookbehind":
        return lookbehind_switching if minibatch_switching else lookbehind_same_batch
    return multistep
