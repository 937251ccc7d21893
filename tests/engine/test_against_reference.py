"""The engine against the literal 2k-pass transcription of Algorithm 1, in float64."""

from __future__ import annotations

import pytest
import torch
from helpers.models import (
    OPTIMIZERS,
    closure_for,
    make_batches,
    make_model,
    max_param_difference,
)
from helpers.reference import alpha_settings, engine_and_reference
from reference_lookbehind import ReferenceLookbehind

from hf_lookbehind import Lookbehind

OUTER_STEPS = 3
TOLERANCE = 1e-10


def run_outer_steps(engine, model, reference, reference_model, k, *, same_batch):
    """OUTER_STEPS outer steps of both: one minibatch for all k inner steps (one engine call),
    or a new minibatch per inner step (k engine calls)."""
    batches = make_batches(OUTER_STEPS * (1 if same_batch else k))
    for outer in range(OUTER_STEPS):
        cycle = [batches[outer]] * k if same_batch else batches[outer * k : (outer + 1) * k]
        for batch in cycle[:1] if same_batch else cycle:
            engine.step(closure_for(model, batch))
        reference.step([closure_for(reference_model, batch) for batch in cycle])


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("perturbation", ["sam", "asam"])
@pytest.mark.parametrize(
    "alpha,scope",
    [(0.5, "per_tensor"), (0.8, "per_tensor"), ("adaptive", "per_tensor"), ("adaptive", "global")],
)
@pytest.mark.parametrize("k", [1, 2, 5])
def test_same_batch_lookbehind_matches_reference(optimizer_name, perturbation, alpha, scope, k):
    model = make_model()
    kwargs = dict(k=k, **alpha_settings(alpha), rho=0.2, asam_eta=0.01, adaptive_alpha_scope=scope)
    engine, reference, reference_model = engine_and_reference(
        model, optimizer_name, perturbation, kwargs, kwargs
    )
    run_outer_steps(engine, model, reference, reference_model, k, same_batch=True)
    assert max_param_difference(model, reference_model) < TOLERANCE
    assert max_param_difference(model, make_model()) > 1e-3  # the weights did move


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
@pytest.mark.parametrize("perturbation", ["sam", "asam"])
@pytest.mark.parametrize("alpha", [0.5, "adaptive"])
@pytest.mark.parametrize("k", [1, 2, 5])
def test_minibatch_switching_matches_reference(optimizer_name, perturbation, alpha, k):
    model = make_model()
    kwargs = dict(k=k, **alpha_settings(alpha), rho=0.2)
    engine, reference, reference_model = engine_and_reference(
        model, optimizer_name, perturbation, {**kwargs, "minibatch_switching": True}, kwargs
    )
    run_outer_steps(engine, model, reference, reference_model, k, same_batch=False)
    assert max_param_difference(model, reference_model) < TOLERANCE


@pytest.mark.parametrize(
    ("method", "k"),
    [("sam", 1), *((method, k) for method in ("multistep", "multistep_avg") for k in (1, 2, 5))],
)
@pytest.mark.parametrize("perturbation", ["sam", "asam"])
def test_multistep_baselines_match_reference(method, perturbation, k):
    model = make_model()
    kwargs = dict(method=method, k=k, rho=0.2)
    engine, reference, reference_model = engine_and_reference(
        model, "sgd", perturbation, kwargs, kwargs
    )
    run_outer_steps(engine, model, reference, reference_model, k, same_batch=True)
    assert max_param_difference(model, reference_model) < TOLERANCE


@pytest.mark.parametrize("perturbation", ["none", "sam", "asam"])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_lookahead_matches_reference(perturbation, optimizer_name):
    model = make_model()
    k = 3
    kwargs = dict(method="lookahead", k=k, alpha=0.5)
    if perturbation != "none":  # plain Lookahead has no radius
        kwargs["rho"] = 0.2
    engine, reference, reference_model = engine_and_reference(
        model, optimizer_name, perturbation, kwargs, kwargs
    )
    run_outer_steps(engine, model, reference, reference_model, k, same_batch=False)
    assert max_param_difference(model, reference_model) < TOLERANCE


class ClippedSGD(torch.optim.SGD):
    """SGD that clips the global gradient norm before each update: the reference's descent."""

    def __init__(self, params, max_norm: float, **kwargs) -> None:
        super().__init__(params, **kwargs)
        self.max_norm = max_norm

    def step(self, closure=None):
        params = [p for group in self.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, self.max_norm)
        return super().step(closure)


@pytest.mark.parametrize("minibatch_switching", [False, True])
def test_max_grad_norm_clips_every_descent_update(minibatch_switching):
    model, reference_model = make_model(), make_model()
    k, max_norm = 3, 0.05
    engine = Lookbehind(
        OPTIMIZERS["sgd"](model.parameters()),
        k=k,
        rho=0.2,
        max_grad_norm=max_norm,
        minibatch_switching=minibatch_switching,
    )
    reference = ReferenceLookbehind(
        ClippedSGD(reference_model.parameters(), max_norm, lr=0.1, momentum=0.9, weight_decay=5e-4),
        k=k,
        rho=0.2,
    )
    run_outer_steps(
        engine, model, reference, reference_model, k, same_batch=not minibatch_switching
    )
    assert max_param_difference(model, reference_model) < TOLERANCE
    assert engine.stats().descent_grad_norm > max_norm  # clipping was active
