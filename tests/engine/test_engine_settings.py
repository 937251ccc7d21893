"""No setting is silently ignored: values are checked whatever the method, a value the method
would not read is refused, alpha has one parsing rule, and the engine is not wrapped twice."""

from __future__ import annotations

import pytest
import torch
from helpers.models import closure_for, make_batches, make_model

from hf_lookbehind import Lookbehind


def sgd(model):
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(method="sam", alpha=0.8), "alpha=0.8 has no effect: method='sam'"),
        (dict(method="multistep_avg", alpha=0.3), "alpha=0.3 has no effect"),
        (
            dict(alpha=0.5, adaptive_alpha_scope="global"),
            "adaptive_alpha_scope='global' has no effect",
        ),
        (dict(perturbation="sam", asam_eta=0.1), "asam_eta=0.1 has no effect"),
        (dict(method="lookahead", perturbation="none", rho=0.1), "rho=0.1 has no effect"),
        # A bad value is named as such, whatever the method.
        (dict(method="lookahead", perturbation="none", rho=-1.0), "rho must be a finite number"),
        (dict(method="sam", alpha=7), r"alpha must be a number in \(0, 1\]"),
        (dict(perturbation="sam", asam_eta=-1.0), "asam_eta must be a finite number"),
        (dict(alpha=0.5, adaptive_alpha_scope="layer"), "unknown adaptive_alpha_scope 'layer'"),
        (dict(batchnorm_update="first_pass"), "batchnorm_update='first_pass' needs model="),
    ],
)
def test_unread_and_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Lookbehind(sgd(make_model()), **kwargs)


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(method="sam", alpha=0.5),  # the defaults themselves change nothing and pass
        dict(perturbation="sam", asam_eta=0.01),
        dict(alpha=0.8, adaptive_alpha_scope="per_tensor"),
        dict(batchnorm_update="every_pass"),  # what happens without a model anyway
    ],
)
def test_defaults_given_explicitly_pass(kwargs):
    Lookbehind(sgd(make_model()), **kwargs)


@pytest.mark.parametrize("alpha", ["adaptive", "0.8"])
def test_alpha_is_a_number(alpha):
    """Adaptive alpha is its own switch (``adaptive_alpha=True``), and alpha a number."""
    with pytest.raises(ValueError, match=r"alpha must be a number in \(0, 1\]"):
        Lookbehind(sgd(make_model()), alpha=alpha)


def test_an_engine_is_not_wrapped_twice():
    inner = Lookbehind(sgd(make_model()))
    with pytest.raises(TypeError, match="already a Lookbehind engine"):
        Lookbehind(inner)


def test_reconfigure_to_a_method_without_alpha_and_back():
    """Switching Lookbehind (alpha 0.8) -> SAM drops alpha; SAM -> Lookbehind takes the alpha
    given, and an alpha given for SAM is refused there too."""
    model = make_model()
    engine = Lookbehind(sgd(model), alpha=0.8, adaptive_alpha_scope=None)
    engine.reconfigure(method="sam")
    assert (engine.settings.k, engine.settings.alpha) == (1, None)
    assert engine.settings.adaptive_alpha is None
    engine.step(closure_for(model, make_batches(1)[0]))
    with pytest.raises(ValueError, match=r"alpha=0\.3 has no effect"):
        engine.reconfigure(method="multistep", alpha=0.3)
    engine.reconfigure(method="lookbehind", adaptive_alpha=True)
    assert engine.settings.adaptive_alpha is True
    assert engine.settings.adaptive_alpha_scope == "per_tensor"


class ModalSGD(torch.optim.SGD):
    """SGD with the train()/eval() modes of a schedule-free optimizer."""

    def train(self) -> None:
        pass

    def eval(self) -> None:
        pass


def test_a_schedule_free_base_optimizer_is_refused():
    with pytest.raises(ValueError, match="schedule-free"):
        Lookbehind(ModalSGD(make_model().parameters(), lr=0.1))


def test_stats_and_buffer_footprint_for_a_plain_loop():
    """The diagnostics a log gets, as host numbers, and the buffers in parameter copies: two
    for static alpha (F and P), three for adaptive (and F_1)."""
    for alpha, copies in ((dict(alpha=0.5), 2.0), (dict(adaptive_alpha=True), 3.0)):
        model = make_model()
        engine = Lookbehind(sgd(model), **alpha)
        stats = engine.stats()
        assert (stats.alpha, stats.skipped_steps, stats.gradient_computations) == (None, 0, 0)
        for batch in make_batches(2):
            engine.step(closure_for(model, batch))
        stats = engine.stats()
        assert stats.gradient_computations == 6 and stats.skipped_steps == 0
        assert 0 < stats.alpha <= 1 and stats.ascent_grad_norm > 0
        assert stats.perturbation_distance > 0 and stats.descent_grad_norm > 0
        assert set(stats.logs()) == {
            "lookbehind_alpha",
            "ascent_grad_norm",
            "perturbation_distance",
            "skipped_steps",
        }
        # frozen parameters included: they have buffers too
        numel = sum(p.numel() for g in engine.param_groups for p in g["params"])
        footprint = engine.buffer_footprint()
        assert footprint.parameter_copies == pytest.approx(copies)
        assert footprint.bytes == copies * numel * 8  # float64
