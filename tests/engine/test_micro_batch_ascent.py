"""m-SAM and Lookbehind-m-SAM on one device (Table 9): the engine against the literal float64
transcription, the identity with today's step when the micro-batch is the batch, passes,
memory, non-finite gradients and validation."""

from __future__ import annotations

import pytest
import torch
from helpers.models import OPTIMIZERS, make_batches, make_model, max_param_difference, twin
from helpers.reference import alpha_settings, engine_and_reference
from torch import nn

from hf_lookbehind import Lookbehind

OUTER_STEPS = 3
TOLERANCE = 1e-10
MICRO_BATCHES = 4  # batch 16 in micro-batches of m = 4


def micro_closures(model, batch, parts=MICRO_BATCHES):
    """One closure per micro-batch; each loss is the micro-batch's share of the batch mean,
    as with gradient accumulation."""
    inputs, labels = batch
    closures = []
    for x, y in zip(inputs.chunk(parts), labels.chunk(parts), strict=True):

        def closure(x=x, y=y) -> torch.Tensor:
            loss = nn.functional.cross_entropy(model(x), y) / parts
            loss.backward()
            return loss

        closures.append(closure)
    return closures


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("perturbation", ["sam", "asam"])
@pytest.mark.parametrize(
    "method,k,alpha,scope",
    [
        ("sam", 1, 0.5, "per_tensor"),
        ("lookbehind", 2, 0.5, "per_tensor"),
        ("lookbehind", 2, 0.8, "per_tensor"),
        ("lookbehind", 2, "adaptive", "per_tensor"),
        ("lookbehind", 3, "adaptive", "global"),
        ("lookbehind", 5, 0.2, "per_tensor"),
    ],
)
def test_micro_batch_ascent_matches_reference(
    optimizer_name, perturbation, method, k, alpha, scope
):
    model = make_model()
    kwargs = dict(method=method, k=k, **alpha_settings(alpha), rho=0.2, adaptive_alpha_scope=scope)
    engine, reference, reference_model = engine_and_reference(
        model, optimizer_name, perturbation, {**kwargs, "ascent_sync": "per_micro_batch"}, kwargs
    )
    for batch in make_batches(OUTER_STEPS):
        engine.step_micro_batches(micro_closures(model, batch))
        reference.step_micro_batches(micro_closures(reference_model, batch))
    assert max_param_difference(model, reference_model) < TOLERANCE
    assert max_param_difference(model, make_model()) > 1e-3  # the weights did move


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_micro_batches_differ_from_one_ascent_on_the_batch(optimizer_name):
    """The reference check above must be able to tell m-SAM from SAM on the whole batch."""
    per_micro, whole = make_model(), make_model()
    engine = Lookbehind(
        OPTIMIZERS[optimizer_name](per_micro.parameters()), ascent_sync="per_micro_batch"
    )
    plain = Lookbehind(OPTIMIZERS[optimizer_name](whole.parameters()))
    for batch in make_batches(OUTER_STEPS):
        engine.step_micro_batches(micro_closures(per_micro, batch))
        plain.step(micro_closures(whole, batch, parts=1)[0])
    assert max_param_difference(per_micro, whole) > 1e-6


@pytest.mark.parametrize("max_grad_norm", [None, 0.5])
@pytest.mark.parametrize(
    "kwargs",
    [
        dict(method="sam"),
        dict(k=2, alpha=0.5),
        dict(k=3, adaptive_alpha=True),
        dict(k=2, adaptive_alpha=True, adaptive_alpha_scope="global", perturbation="asam"),
    ],
)
def test_one_micro_batch_is_todays_step(kwargs, max_grad_norm):
    """m equal to the batch: the m-SAM schedule gives today's same-batch result. Without
    clipping the values are bit-identical; clipping a descent in place before the next ascent
    only changes the last bits of the recomputed ascent norm."""
    micro, today = make_model(), make_model()
    settings = dict(rho=0.2, max_grad_norm=max_grad_norm, **kwargs)
    engine = Lookbehind(
        OPTIMIZERS["sgd"](micro.parameters()), ascent_sync="per_micro_batch", **settings
    )
    plain = Lookbehind(OPTIMIZERS["sgd"](today.parameters()), **settings)
    for batch in make_batches(OUTER_STEPS):
        engine.step_micro_batches(micro_closures(micro, batch, parts=1))
        plain.step(micro_closures(today, batch, parts=1)[0])
    gap = max_param_difference(micro, today)
    assert gap == 0.0 if max_grad_norm is None else gap < 1e-12


@pytest.mark.parametrize("method,k", [("sam", 1), ("lookbehind", 2), ("lookbehind", 5)])
def test_passes_and_gradient_computations(method, k):
    model = make_model()
    engine = Lookbehind(
        OPTIMIZERS["sgd"](model.parameters()), method=method, k=k, ascent_sync="per_micro_batch"
    )
    calls = []
    closures = [
        (lambda c=c: calls.append(1) or c()) for c in micro_closures(model, make_batches(1)[0])
    ]
    engine.step_micro_batches(closures)
    engine.step_micro_batches(closures)
    assert len(calls) == 2 * MICRO_BATCHES * (k + 1)
    assert engine.stats().gradient_computations == 2 * (k + 1)  # passes over the whole batch


@pytest.mark.parametrize(
    "kwargs,buffers",
    [
        (dict(method="sam"), 2),  # S and one gradient sum
        (dict(k=2), 4),  # S, F and k = 2 gradient sums
        (dict(k=3, adaptive_alpha=True), 6),  # S, F, F_1 and 3 sums
    ],
)
@pytest.mark.parametrize("parts", [2, 8])
def test_memory_does_not_grow_with_the_number_of_micro_batches(kwargs, buffers, parts):
    model = make_model()
    engine = Lookbehind(
        OPTIMIZERS["sgd"](model.parameters()), ascent_sync="per_micro_batch", **kwargs
    )
    for batch in make_batches(2):
        engine.step_micro_batches(micro_closures(model, batch, parts=parts))
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.grad is not None)
    total = sum(p.numel() for p in params)
    sums = kwargs.get("k", 1)  # gradient-shaped: only for parameters with a gradient
    expected = ((buffers - sums) * total + sums * trainable) / total
    assert engine.buffer_footprint().parameter_copies == pytest.approx(expected)


@pytest.mark.parametrize("method", ["sam", "lookbehind"])
def test_a_non_finite_micro_batch_discards_the_step(method):
    model = make_model()
    engine = Lookbehind(
        OPTIMIZERS["sgd"](model.parameters()), method=method, ascent_sync="per_micro_batch"
    )
    batch = make_batches(1)[0]
    engine.step_micro_batches(micro_closures(model, batch))
    before = twin(model)
    closures = micro_closures(model, batch)
    healthy = closures[2]

    def poisoned() -> torch.Tensor:
        loss = healthy()
        model.fc1.weight.grad[0, 0] = float("nan")
        return loss

    closures[2] = poisoned
    engine.step_micro_batches(closures)
    assert max_param_difference(model, before) == 0.0
    assert engine.stats().skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    engine.step_micro_batches(micro_closures(model, batch))  # the next step trains again
    assert max_param_difference(model, before) > 1e-6


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="multistep"), "per_micro_batch"),
        (dict(method="lookahead"), "per_micro_batch"),
        (dict(minibatch_switching=True), "minibatch_switching"),
    ],
)
def test_bad_settings_fail_at_construction(kwargs, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        Lookbehind(OPTIMIZERS["sgd"](model.parameters()), ascent_sync="per_micro_batch", **kwargs)


def test_a_sequence_of_closures_needs_micro_batch_ascent():
    model = make_model()
    engine = Lookbehind(OPTIMIZERS["sgd"](model.parameters()))
    with pytest.raises(TypeError, match="step_micro_batches"):
        engine.step(micro_closures(model, make_batches(1)[0]))
