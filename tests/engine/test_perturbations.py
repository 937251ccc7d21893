"""SAM variants as perturbation objects: Fisher-SAM against a float64 transcription of its
paper's ascent step, a user-defined variant in every method and mode, and how checkpoints and
settings name them."""

from __future__ import annotations

import pytest
import torch
from helpers.models import closure_for, make_batches, make_model, max_param_difference
from torch import nn

from hf_lookbehind import SAM, FisherSAM, Lookbehind, Perturbation
from hf_lookbehind.engine.multi_tensor import global_norm


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)


def fisher_sam_step(model: nn.Module, batch, optimizer, rho: float, eta: float) -> None:
    """One SAM step with Fisher-SAM's ascent, written out per tensor in float64 (Kim et al.,
    ICML 2022): f = 1 + eta g^2, eps = rho f^-1 g / sqrt(g^T f^-1 g); the descent uses the
    gradient at w + eps from w."""
    optimizer.zero_grad()
    closure_for(model, batch)()
    trained = [p for p in model.parameters() if p.grad is not None]
    grads = [p.grad.clone() for p in trained]
    fisher = [1.0 + eta * g * g for g in grads]
    denominator = sum(float((g * g / f).sum()) for g, f in zip(grads, fisher)) ** 0.5
    eps = [rho * g / f / (denominator + 1e-16) for g, f in zip(grads, fisher)]
    with torch.no_grad():
        for p, e in zip(trained, eps):
            p.add_(e)
    optimizer.zero_grad()
    closure_for(model, batch)()
    with torch.no_grad():
        for p, e in zip(trained, eps):
            p.sub_(e)
    optimizer.step()


@pytest.mark.parametrize("eta", [0.0, 1.0, 50.0])
def test_fisher_sam_matches_the_transcription_of_its_paper(eta):
    model, reference = make_model(), make_model()
    engine = Lookbehind(sgd(model), method="sam", perturbation=FisherSAM(eta=eta), rho=0.1)
    optimizer = sgd(reference)
    for batch in make_batches(3):
        engine.step(closure_for(model, batch))
        fisher_sam_step(reference, batch, optimizer, rho=0.1, eta=eta)
    assert max_param_difference(model, reference) < 1e-12
    assert max_param_difference(model, make_model()) > 1e-3


def test_fisher_sam_with_eta_zero_is_sam_and_otherwise_is_not():
    runs = {}
    for name, perturbation in (("sam", "sam"), ("eta0", FisherSAM(eta=0.0)), ("eta", "fisher")):
        model = make_model()
        engine = Lookbehind(sgd(model), k=2, perturbation=perturbation, rho=0.1)
        for batch in make_batches(3):
            engine.step(closure_for(model, batch))
        runs[name] = model
    assert max_param_difference(runs["sam"], runs["eta0"]) < 1e-12
    assert max_param_difference(runs["sam"], runs["eta"]) > 1e-6


class PlainSAM(Perturbation):
    """SAM's ascent as a user would write it on the public interface."""

    name = "plain_sam"

    def direction_(self, params, grads, scaled):
        return global_norm(grads)


METHODS = {
    "lookbehind": dict(k=2),
    "lookbehind_adaptive": dict(k=2, adaptive_alpha=True),
    "switching": dict(k=2, minibatch_switching=True),
    "sam": dict(method="sam"),
    "multistep": dict(method="multistep", k=3),
    "multistep_avg": dict(method="multistep_avg", k=2),
    "lookahead": dict(method="lookahead", k=2),
    "m_sam": dict(method="sam", ascent_sync="per_micro_batch"),
    "lookbehind_m_sam": dict(k=2, ascent_sync="per_micro_batch"),
}


def micro_closures(model, batch):
    x, y = batch
    halves = [(x[:8], y[:8]), (x[8:], y[8:])]

    def make(part):
        def closure():
            loss = nn.functional.cross_entropy(model(part[0]), part[1]) * 0.5
            loss.backward()
            return loss

        return closure

    return [make(part) for part in halves]


@pytest.mark.parametrize("method", METHODS)
def test_a_user_defined_variant_runs_in_every_method(method):
    """Written on the public interface, SAM's ascent gives the built-in SAM's trajectory in every
    method and mode (same kernels: bit for bit)."""
    results = []
    for perturbation in ("sam", PlainSAM()):
        model = make_model()
        engine = Lookbehind(sgd(model), perturbation=perturbation, rho=0.1, **METHODS[method])
        for batch in make_batches(4):
            if engine.settings.micro_batch_ascent:
                engine.step_micro_batches(micro_closures(model, batch))
            else:
                engine.step(closure_for(model, batch))
        results.append(model)
    assert max_param_difference(*results) == 0.0
    assert max_param_difference(results[0], make_model()) > 1e-3


def test_checkpoints_name_the_variant_with_its_settings():
    model = make_model()
    engine = Lookbehind(sgd(model), k=2, minibatch_switching=True, perturbation=FisherSAM(0.5))
    engine.step(closure_for(model, make_batches(1)[0]))  # mid-cycle: every setting must match
    state = engine.state_dict()
    assert engine.settings.record()["perturbation"] == "FisherSAM(eta=0.5)"
    assert state["state"]["lookbehind_run"]["settings"]["perturbation"] == "FisherSAM(eta=0.5)"
    same = Lookbehind(sgd(model), k=2, minibatch_switching=True, perturbation=FisherSAM(0.5))
    same.load_state_dict(state)
    other = Lookbehind(sgd(model), k=2, minibatch_switching=True, perturbation="fisher")
    with pytest.raises(ValueError, match=r"perturbation='FisherSAM\(eta=0.5\)'"):
        other.load_state_dict(state)
    assert SAM().name == "sam" and repr(SAM()) == "SAM()"


def test_asam_eta_belongs_to_asam():
    with pytest.raises(ValueError, match=r"asam_eta=0\.1 has no effect"):
        Lookbehind(sgd(make_model()), perturbation=FisherSAM(), asam_eta=0.1)
