"""Identities, checkpoints, non-finite gradients, BatchNorm policy, memory and validation."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers.models import (
    OPTIMIZERS,
    closure_for,
    make_batches,
    make_model,
    max_param_difference,
    twin,
)
from torch import nn

from hf_lookbehind import Lookbehind
from hf_lookbehind.engine.schedules import BUFFERS

STEPS = 3


def run(model, optimizer_name="sgd", batches=None, calls=STEPS, **kwargs):
    engine = Lookbehind(OPTIMIZERS[optimizer_name](model.parameters()), **kwargs)
    for batch in batches or make_batches(calls):
        engine.step(closure_for(model, batch))
    return engine


# ------------------------------------------------------------------------------- identities
@pytest.mark.parametrize("perturbation", ["sam", "asam"])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_k1_alpha1_equals_sam(perturbation, optimizer_name):
    lookbehind, sam = make_model(), make_model()
    run(lookbehind, optimizer_name, k=1, alpha=1.0, perturbation=perturbation)
    run(sam, optimizer_name, method="sam", perturbation=perturbation)
    assert max_param_difference(lookbehind, sam) < 1e-12


@pytest.mark.parametrize("k", [2, 5])
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_rho0_alpha1_equals_k_base_steps_on_one_batch(k, optimizer_name):
    """With rho = 0 every P_i is S, so the k inner steps apply the base optimizer k times with
    the one gradient of the batch at S."""
    engine_model, plain_model = make_model(), make_model()
    batch = make_batches(1)[0]
    run(engine_model, optimizer_name, batches=[batch], k=k, alpha=1.0, rho=0.0)
    plain = OPTIMIZERS[optimizer_name](plain_model.parameters())
    closure_for(plain_model, batch)()
    with torch.no_grad():
        for _ in range(k):
            plain.step()
    assert max_param_difference(engine_model, plain_model) < 1e-12


@pytest.mark.parametrize("perturbation", ["sam", "asam"])
def test_multistep_k1_equals_sam(perturbation):
    multistep, multistep_avg, sam = make_model(), make_model(), make_model()
    run(multistep, method="multistep", k=1, perturbation=perturbation)
    run(multistep_avg, method="multistep_avg", k=1, perturbation=perturbation)
    run(sam, method="sam", perturbation=perturbation)
    assert max_param_difference(multistep, sam) == 0.0
    assert max_param_difference(multistep_avg, sam) < 1e-12


@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_lookahead_alpha1_equals_inner_optimizer(optimizer_name):
    batches = make_batches(6)
    lookahead, plain = make_model(), make_model()
    run(lookahead, optimizer_name, batches, method="lookahead", k=3, alpha=1.0, perturbation="none")
    base = OPTIMIZERS[optimizer_name](plain.parameters())
    for batch in batches:
        base.zero_grad()
        closure_for(plain, batch)()
        base.step()
    assert max_param_difference(lookahead, plain) < 1e-12

    lookahead_sam, sam = make_model(), make_model()
    run(lookahead_sam, optimizer_name, batches, method="lookahead", k=3, alpha=1.0)
    run(sam, optimizer_name, batches, method="sam")
    assert max_param_difference(lookahead_sam, sam) < 1e-12


# ---------------------------------------------------------------------- passes and memory
@pytest.mark.parametrize(
    "kwargs,passes",
    [
        (dict(k=2), 3),
        (dict(k=5, adaptive_alpha=True), 6),
        (dict(k=3, minibatch_switching=True), 2),
        (dict(method="sam"), 2),
        (dict(method="multistep", k=3), 4),
        (dict(method="lookahead", k=3), 2),
        (dict(method="lookahead", k=3, perturbation="none"), 1),
    ],
)
def test_forward_backward_passes_per_step(kwargs, passes):
    model = make_model()
    engine = Lookbehind(OPTIMIZERS["sgd"](model.parameters()), **kwargs)
    calls = []
    closure = closure_for(model, make_batches(1)[0])
    engine.step(lambda: calls.append(1) or closure())
    assert len(calls) == passes


@pytest.mark.parametrize(
    "kwargs,buffers",
    [
        (dict(k=5), 2),
        (dict(k=5, minibatch_switching=True), 2),
        (dict(k=5, adaptive_alpha=True), 3),
        (dict(k=5, adaptive_alpha=True, minibatch_switching=True), 3),
        (dict(method="sam"), 1),
        (dict(method="multistep", k=3), 1),
        (dict(method="multistep_avg", k=3), 2),
        (dict(method="lookahead", k=3, perturbation="none"), 1),
        (dict(method="lookahead", k=3), 2),
    ],
)
def test_persistent_buffers_in_parameter_copies(kwargs, buffers):
    """Static alpha keeps at most 2 parameter copies and adaptive alpha 3 (gradient-shaped
    sums only for parameters with a gradient); further steps allocate nothing more."""
    model = make_model()
    engine = run(model, calls=7, **kwargs)
    params = list(model.parameters())
    trainable = sum(p.numel() for p in params if p.grad is not None)
    total = sum(p.numel() for p in params)
    sums = 1 if kwargs.get("method") == "multistep_avg" else 0
    expected = ((buffers - sums) * total + sums * trainable) / total
    footprint = engine.buffer_footprint()
    assert footprint.parameter_copies == pytest.approx(expected)
    engine.step(closure_for(model, make_batches(1, seed=9)[0]))
    assert engine.buffer_footprint() == footprint


def test_step_never_reads_a_tensor_on_the_host(monkeypatch):
    """No .item(), bool(), float() or .tolist() on a tensor, and no tensor built from host
    values, inside a step: on a GPU each would be a host-device synchronisation."""
    model = make_model()
    engine = Lookbehind(OPTIMIZERS["sgd"](model.parameters()), k=3, adaptive_alpha=True)
    closure = closure_for(model, make_batches(1)[0])
    engine.step(closure)  # allocations of the first step are not under test

    def forbidden(*args, **kwargs):
        raise AssertionError("host read of a tensor value inside a step")

    for name in ("item", "tolist", "__bool__", "__float__", "__int__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "tensor", forbidden)  # a host-to-device copy on a GPU
    for kwargs in (dict(), dict(minibatch_switching=True)):
        engine.step(closure)
        Lookbehind(OPTIMIZERS["sgd"](model.parameters()), k=2, **kwargs).step(closure)


# ------------------------------------------------------------------------------ checkpoints
@pytest.mark.parametrize(
    "kwargs,steps_before_save",
    [
        (dict(k=2), 2),
        (dict(k=3, adaptive_alpha=True), 2),
        (dict(k=3, adaptive_alpha=True, minibatch_switching=True), 4),  # mid-cycle
        (dict(k=3, minibatch_switching=True, perturbation="asam"), 5),  # mid-cycle
        (dict(method="lookahead", k=3), 2),  # mid-cycle
        (dict(method="multistep_avg", k=2), 2),
    ],
)
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_state_dict_round_trip_continues_bit_identically(
    tmp_path, kwargs, steps_before_save, optimizer_name
):
    batches = make_batches(steps_before_save + 4)
    uninterrupted = make_model()
    run(uninterrupted, optimizer_name, batches, **kwargs)

    model = make_model()
    engine = run(model, optimizer_name, batches[:steps_before_save], **kwargs)
    torch.save(
        {"model": model.state_dict(), "optimizer": engine.state_dict()}, tmp_path / "ckpt.pt"
    )
    checkpoint = torch.load(tmp_path / "ckpt.pt", weights_only=False)
    resumed = make_model(seed=123)
    resumed.load_state_dict(checkpoint["model"])
    fresh = Lookbehind(OPTIMIZERS[optimizer_name](resumed.parameters()), **kwargs)
    fresh.load_state_dict(checkpoint["optimizer"])
    assert fresh.cycle_position == engine.cycle_position
    for batch in batches[steps_before_save:]:
        fresh.step(closure_for(resumed, batch))
    for a, b in zip(uninterrupted.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(uninterrupted.buffers(), resumed.buffers()):
        assert torch.equal(a, b)


def test_state_dict_leaves_out_buffers_between_outer_steps():
    model = make_model()
    engine = run(model, calls=1, k=2)
    assert all(not set(entry) & set(BUFFERS) for entry in engine.state_dict()["state"].values())
    engine = run(model, calls=1, k=2, minibatch_switching=True)
    saved = engine.state_dict()["state"]
    assert any(set(entry) & set(BUFFERS) for entry in saved.values())


def test_loading_a_checkpoint_of_another_setup_is_refused():
    model = make_model()
    engine = run(model, calls=1, k=2)
    other = Lookbehind(OPTIMIZERS["sgd"](model.parameters()), k=3)
    with pytest.raises(ValueError, match="k=2"):
        other.load_state_dict(engine.state_dict())


# -------------------------------------------------------------------- non-finite gradients
def poisoned_closure(model, batch, bad_pass):
    """A closure whose ``bad_pass``-th call (0-based, counted over the closure's life)
    returns a NaN gradient."""
    calls = [0]
    inputs, labels = batch

    def closure():
        loss = nn.functional.cross_entropy(model(inputs), labels)
        if calls[0] == bad_pass:
            loss = loss * float("nan")
        calls[0] += 1
        loss.backward()
        return loss

    return closure


# Settings whose outer step runs four passes.
FOUR_PASS_STEPS = [
    dict(k=3),
    dict(k=3, adaptive_alpha=True),
    dict(k=3, perturbation="asam"),
    dict(method="multistep_avg", k=3),
]


@pytest.mark.parametrize(
    ("kwargs", "bad_pass"),
    [
        *((kwargs, bad_pass) for kwargs in FOUR_PASS_STEPS for bad_pass in (0, 1, 3)),
        *((dict(method="sam"), bad_pass) for bad_pass in (0, 1)),  # SAM's step has two passes
    ],
)
@pytest.mark.parametrize("optimizer_name", ["sgd", "adamw"])
def test_nonfinite_gradient_in_any_pass_skips_the_outer_step(kwargs, bad_pass, optimizer_name):
    model = make_model()
    engine = run(model, optimizer_name, calls=2, **kwargs)
    before = copy.deepcopy(model)
    engine.step(poisoned_closure(model, make_batches(1, seed=5)[0], bad_pass))
    for a, b in zip(model.parameters(), before.parameters()):
        assert torch.equal(a, b)
    assert engine.stats().skipped_steps == 1
    for key, entry in engine.state.items():
        values = list(entry.values())
        if key == "lookbehind_run":  # the run state: its tensors (flag, counter, last alpha)
            values = [value for value in values if isinstance(value, torch.Tensor)]
        for value in values:
            assert torch.isfinite(value).all()
    engine.step(closure_for(model, make_batches(1, seed=6)[0]))  # training goes on
    assert engine.stats().skipped_steps == 1
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert max_param_difference(model, before) > 0


@pytest.mark.parametrize("method", ["lookbehind", "lookahead"])
def test_nonfinite_gradient_mid_cycle_discards_the_cycle(method):
    kwargs = dict(method=method, k=3)
    if method == "lookbehind":
        kwargs["minibatch_switching"] = True
    model = make_model()
    engine = run(model, calls=3, **kwargs)
    slow = copy.deepcopy(model)
    batches = make_batches(3, seed=7)
    engine.step(closure_for(model, batches[0]))
    engine.step(poisoned_closure(model, batches[1], 1))
    engine.step(closure_for(model, batches[2]))
    assert engine.stats().skipped_steps == 1
    for a, b in zip(model.parameters(), slow.parameters()):
        assert torch.equal(a, b)
    for entry in engine.state_dict()["state"].values():
        assert all(torch.isfinite(t).all() for t in entry.values() if torch.is_tensor(t))
    run_next = make_batches(3, seed=8)
    for batch in run_next:
        engine.step(closure_for(model, batch))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert max_param_difference(model, slow) > 0


# ---------------------------------------------------------------------------- BatchNorm
def test_batchnorm_first_pass_policy_updates_statistics_once_at_the_slow_weights():
    model = make_model()
    at_slow = twin(model)
    batch = make_batches(1)[0]
    engine = Lookbehind(OPTIMIZERS["sgd"](model.parameters()), k=3, model=model)
    engine.step(closure_for(model, batch))
    at_slow(batch[0])  # one train-mode forward at the weights the step started from
    assert torch.equal(model.norm.running_mean, at_slow.norm.running_mean)
    assert torch.equal(model.norm.running_var, at_slow.norm.running_var)
    assert int(model.norm.num_batches_tracked) == 1
    assert model.norm.track_running_stats


def test_batchnorm_every_pass_policy_updates_statistics_on_each_pass():
    model = make_model()
    engine = Lookbehind(
        OPTIMIZERS["sgd"](model.parameters()), k=3, model=model, batchnorm_update="every_pass"
    )
    engine.step(closure_for(model, make_batches(1)[0]))
    assert int(model.norm.num_batches_tracked) == 4


# ---------------------------------------------------------------------------- validation
@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(k=0), "k must be an integer >= 1"),
        (dict(k=1.5), "k must be an integer >= 1"),
        (dict(alpha=0.0), r"alpha must be a number in \(0, 1\]"),
        (dict(alpha=1.5), r"alpha must be a number in \(0, 1\]"),
        (dict(alpha="fixed"), r"alpha must be a number in \(0, 1\], got 'fixed'"),
        (dict(alpha=math.nan), r"alpha must be a number in \(0, 1\]"),
        (dict(rho=-0.1), "rho must be a finite number >= 0"),
        (dict(rho=math.inf), "rho must be a finite number >= 0"),
        (dict(asam_eta=-1.0), "asam_eta must be a finite number >= 0"),
        (dict(method="adam"), "unknown method 'adam'; allowed: lookbehind, sam"),
        (dict(perturbation="gsam"), "unknown perturbation 'gsam'; allowed: sam, asam, fisher"),
        (dict(perturbation="none"), "perturbation='none' is for method='lookahead'"),
        (dict(adaptive_alpha_scope="layer"), "unknown adaptive_alpha_scope 'layer'"),
        (dict(batchnorm_update="never"), "unknown batchnorm_update 'never'"),
        (dict(method="sam", k=2), "method='sam' takes k=1"),
        (dict(method="lookahead", adaptive_alpha=True), "defined for method='lookbehind'"),
        (dict(method="multistep", minibatch_switching=True), "minibatch_switching"),
    ],
)
def test_bad_settings_are_rejected_at_construction(kwargs, message):
    model = make_model()
    with pytest.raises(ValueError, match=message):
        Lookbehind(OPTIMIZERS["sgd"](model.parameters()), **kwargs)


def test_bad_base_optimizer_is_rejected():
    model = make_model()
    with pytest.raises(TypeError, match=r"torch\.optim\.Optimizer"):
        Lookbehind(model.parameters())
    with pytest.raises(ValueError, match="maximize"):
        Lookbehind(torch.optim.SGD(model.parameters(), lr=0.1, maximize=True))


def test_step_without_closure_is_an_error():
    model = make_model()
    with pytest.raises(ValueError, match="closure"):
        Lookbehind(OPTIMIZERS["sgd"](model.parameters())).step()
