"""rho, alpha and the adaptive-alpha switch as parameter-group entries, and the run state in the
optimizer's ``state``: per-group values against a float64 transcription of Algorithm 1, values
changed between steps against engines built with them, bad values refused before any work, and
checkpoints (this layout, the older one with the run state in ``param_groups[0]``, and the
rule for a constructor value changed at resume)."""

from __future__ import annotations

import copy
import logging

import pytest
import torch
from helpers.models import closure_for, make_batches, make_model, max_param_difference
from torch import nn
from torch.func import functional_call

from hf_lookbehind import Lookbehind

LR = 0.1


def trainable(model: nn.Module) -> list[torch.Tensor]:
    return [p for p in model.parameters() if p.requires_grad]


def two_groups(model: nn.Module, first: dict, second: dict) -> torch.optim.SGD:
    """fc1 in one group, everything else that trains in the other; plain SGD (no momentum), so
    that the transcription below is a line per update."""
    head = [p for name, p in model.named_parameters() if p.requires_grad and name.startswith("fc1")]
    rest = [p for name, p in model.named_parameters() if p.requires_grad and name[:3] != "fc1"]
    return torch.optim.SGD([{"params": head, **first}, {"params": rest, **second}], lr=LR)


def transcribed_outer_step(model, batch, k, rho_of, alpha_of):
    """One same-batch outer step of Algorithm 1 in float64 with each parameter's own rho and
    alpha: P_i = P_{i-1} + rho_p g_p(P_{i-1}) / ||g(P_{i-1})|| (the norm over all parameters),
    F_i = F_{i-1} - lr g(P_i), S <- S + alpha_p (F_k - S)."""
    inputs, labels = batch
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    slow = {name: p.detach().clone() for name, p in model.named_parameters()}

    def gradient(weights):
        leaves = {
            n: (w.clone().requires_grad_(True) if n in names else w) for n, w in weights.items()
        }
        loss = nn.functional.cross_entropy(functional_call(model, leaves, (inputs,)), labels)
        grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
        return {n: g for n, g in zip(names, grads, strict=True) if g is not None}

    fast, perturbed = dict(slow), dict(slow)
    grads = gradient(perturbed)
    for _ in range(k):
        norm = torch.sqrt(sum((g * g).sum() for g in grads.values()))
        perturbed = {
            n: w + rho_of[n] * grads[n] / norm if n in grads else w for n, w in perturbed.items()
        }
        grads = gradient(perturbed)
        fast = {n: w - LR * grads[n] if n in grads else w for n, w in fast.items()}
    return {n: slow[n] + alpha_of[n] * (fast[n] - slow[n]) if n in names else slow[n] for n in slow}


def test_per_group_rho_and_alpha_follow_the_transcription():
    model = make_model(batchnorm=False)
    reference = copy.deepcopy(model)
    first = {"lookbehind_rho": 0.3, "lookbehind_alpha": 0.8}
    second = {"lookbehind_rho": 0.05, "lookbehind_alpha": 0.4}
    engine = Lookbehind(two_groups(model, first, second), k=2)
    rho_of = {n: (0.3 if n.startswith("fc1") else 0.05) for n, _ in model.named_parameters()}
    alpha_of = {n: (0.8 if n.startswith("fc1") else 0.4) for n, _ in model.named_parameters()}
    for batch in make_batches(3, seed=3):
        expected = transcribed_outer_step(reference, batch, 2, rho_of, alpha_of)
        with torch.no_grad():
            for name, p in reference.named_parameters():
                p.copy_(expected[name])
        engine.step(closure_for(model, batch))
    assert max_param_difference(model, reference) < 1e-12
    assert max_param_difference(model, make_model(batchnorm=False)) > 1e-3  # it trained


def test_equal_group_values_are_the_constructor_values_bit_for_bit():
    grouped, plain = make_model(batchnorm=False), make_model(batchnorm=False)
    same = {"lookbehind_rho": 0.2, "lookbehind_alpha": 0.6}
    engine = Lookbehind(two_groups(grouped, same, same), k=3)
    twin = Lookbehind(torch.optim.SGD(trainable(plain), lr=LR), k=3, rho=0.2, alpha=0.6)
    for batch in make_batches(3, seed=4):
        engine.step(closure_for(grouped, batch))
        twin.step(closure_for(plain, batch))
    assert max_param_difference(grouped, plain) == 0.0


def test_values_changed_between_steps_are_used_by_the_next_step():
    """A schedule sets rho and alpha before every call; in same-batch mode every call is an
    outer step, which equals that of an engine built with those values (plain SGD keeps no
    state, so a new engine per call is the same run)."""
    model, twin_model = make_model(batchnorm=False), make_model(batchnorm=False)
    engine = Lookbehind(torch.optim.SGD(trainable(model), lr=LR))
    schedule = [(0.05, 0.5), (0.2, 0.9), (0.0, 0.3), (0.1, 1.0)]
    for (rho, alpha), batch in zip(schedule, make_batches(4, seed=5)):
        for group in engine.param_groups:
            group["lookbehind_rho"], group["lookbehind_alpha"] = rho, alpha
        engine.step(closure_for(model, batch))
        built = Lookbehind(torch.optim.SGD(trainable(twin_model), lr=LR), rho=rho, alpha=alpha)
        built.step(closure_for(twin_model, batch))
        assert max_param_difference(model, twin_model) == 0.0
        assert engine.stats().alpha == pytest.approx(alpha)


def test_an_alpha_set_inside_a_cycle_is_the_one_its_update_uses():
    """Switching mode: alpha is read at the update that ends the cycle."""
    model, twin_model = make_model(batchnorm=False), make_model(batchnorm=False)
    engine = Lookbehind(torch.optim.SGD(trainable(model), lr=LR), minibatch_switching=True)
    twin = Lookbehind(
        torch.optim.SGD(trainable(twin_model), lr=LR), minibatch_switching=True, alpha=0.9
    )
    for call, batch in enumerate(make_batches(2, seed=5)):
        if call == 1:
            for group in engine.param_groups:
                group["lookbehind_alpha"] = 0.9
        engine.step(closure_for(model, batch))
        twin.step(closure_for(twin_model, batch))
    assert max_param_difference(model, twin_model) == 0.0
    assert engine.stats().alpha == pytest.approx(0.9)


def test_a_rho_change_reaches_the_next_ascent_only():
    """rho = 0 set between steps: the next step is that of an engine built with rho = 0, and
    the step before it was not."""
    model, twin_model = make_model(batchnorm=False), make_model(batchnorm=False)
    engine = Lookbehind(torch.optim.SGD(trainable(model), lr=LR), rho=0.3)
    batches = make_batches(2, seed=6)
    engine.step(closure_for(model, batches[0]))
    first = copy.deepcopy(model)
    for group in engine.param_groups:
        group["lookbehind_rho"] = 0.0
    engine.step(closure_for(model, batches[1]))
    with torch.no_grad():
        for p, q in zip(twin_model.parameters(), first.parameters()):
            p.copy_(q)
    unperturbed = Lookbehind(torch.optim.SGD(trainable(twin_model), lr=LR), rho=0.0)
    unperturbed.step(closure_for(twin_model, batches[1]))
    assert max_param_difference(model, twin_model) == 0.0
    assert engine.stats().perturbation_distance == 0.0


def test_the_adaptive_switch_set_between_outer_steps():
    model, twin_model = make_model(batchnorm=False), make_model(batchnorm=False)
    engine = Lookbehind(torch.optim.SGD(trainable(model), lr=LR), alpha=0.7)
    twin = Lookbehind(torch.optim.SGD(trainable(twin_model), lr=LR), alpha=0.7)
    batches = make_batches(2, seed=7)
    engine.step(closure_for(model, batches[0]))
    twin.step(closure_for(twin_model, batches[0]))
    for group in engine.param_groups:
        group["lookbehind_adaptive_alpha"] = True
    twin.reconfigure(adaptive_alpha=True)
    engine.step(closure_for(model, batches[1]))
    twin.step(closure_for(twin_model, batches[1]))
    assert max_param_difference(model, twin_model) == 0.0
    assert engine.stats().alpha != pytest.approx(0.7)  # eq. 7-8 chose it


def test_the_adaptive_switch_changed_inside_a_cycle_applies_to_the_next_cycle():
    model, twin_model = make_model(batchnorm=False), make_model(batchnorm=False)
    engine = Lookbehind(torch.optim.SGD(trainable(model), lr=LR), minibatch_switching=True)
    twin = Lookbehind(torch.optim.SGD(trainable(twin_model), lr=LR), minibatch_switching=True)
    batches = make_batches(2, seed=8)
    engine.step(closure_for(model, batches[0]))
    for group in engine.param_groups:
        group["lookbehind_adaptive_alpha"] = True  # F_1 of this cycle was not kept
    engine.step(closure_for(model, batches[1]))
    for batch in batches:
        twin.step(closure_for(twin_model, batch))
    assert max_param_difference(model, twin_model) == 0.0
    assert engine.stats().alpha == pytest.approx(0.5)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("lookbehind_rho", -0.1, "lookbehind_rho"),
        ("lookbehind_rho", float("nan"), "lookbehind_rho"),
        ("lookbehind_alpha", 1.5, "must be a number in \\(0, 1\\]"),
        ("lookbehind_alpha", 0.0, "lookbehind_alpha"),
        ("lookbehind_adaptive_alpha", "yes", "True or False"),
    ],
)
def test_a_bad_group_value_is_refused_before_any_work(key, value, message):
    model = make_model(batchnorm=False)
    engine = Lookbehind(torch.optim.SGD(trainable(model), lr=LR))
    engine.step(closure_for(model, make_batches(1, seed=9)[0]))
    before, computations = copy.deepcopy(model), engine.stats().gradient_computations
    engine.param_groups[0][key] = value
    with pytest.raises(ValueError, match=message):
        engine.step(closure_for(model, make_batches(1, seed=10)[0]))
    assert max_param_difference(model, before) == 0.0
    assert engine.stats().gradient_computations == computations
    with pytest.raises(ValueError, match=message):  # also when given in the base optimizer
        Lookbehind(two_groups(make_model(batchnorm=False), {key: value}, {}))


def test_group_values_the_method_does_not_read_are_refused():
    model = make_model(batchnorm=False)
    engine = Lookbehind(torch.optim.SGD(trainable(model), lr=LR), method="sam")
    assert "lookbehind_alpha" not in engine.param_groups[0]
    engine.param_groups[0]["lookbehind_alpha"] = 0.3
    with pytest.raises(ValueError, match="does not read"):
        engine.step(closure_for(model, make_batches(1)[0]))
    with pytest.raises(ValueError, match="does not read"):
        Lookbehind(
            two_groups(make_model(batchnorm=False), {"lookbehind_alpha": 0.3}, {}), method="sam"
        )


def test_the_adaptive_switch_must_agree_between_groups():
    with pytest.raises(ValueError, match="differs between the parameter groups"):
        Lookbehind(two_groups(make_model(batchnorm=False), {"lookbehind_adaptive_alpha": True}, {}))
    model = make_model(batchnorm=False)
    engine = Lookbehind(torch.optim.SGD(trainable(model), lr=LR), method="lookahead")
    engine.param_groups[0]["lookbehind_adaptive_alpha"] = True
    with pytest.raises(ValueError, match="method='lookbehind'"):
        engine.step(closure_for(model, make_batches(1)[0]))


def test_run_state_lives_in_state_and_not_in_the_groups():
    model = make_model(batchnorm=False)
    engine = Lookbehind(torch.optim.SGD(trainable(model), lr=LR), minibatch_switching=True)
    engine.step(closure_for(model, make_batches(1)[0]))
    run = engine.state["lookbehind_run"]
    assert run["cycle_position"] == 1 and run["gradient_computations"] == 2
    group_keys = {key for group in engine.param_groups for key in group}
    assert {"lookbehind_rho", "lookbehind_alpha", "lookbehind_adaptive_alpha"} <= group_keys
    assert not any("cycle" in key or "settings" in key for key in group_keys)
    shown = repr(engine)
    assert "lookbehind_rho: 0.05" in shown and "cycle" not in shown
    saved = engine.state_dict()
    assert saved["state"]["lookbehind_run"]["cycle_position"] == 1


def test_a_resumed_run_keeps_its_scheduled_values_unless_the_constructor_changed(caplog):
    model = make_model(batchnorm=False)
    engine = Lookbehind(torch.optim.SGD(trainable(model), lr=LR), rho=0.05, alpha=0.5)
    engine.step(closure_for(model, make_batches(1)[0]))
    for group in engine.param_groups:
        group["lookbehind_rho"], group["lookbehind_alpha"] = 0.2, 0.9  # a schedule's values
    saved = engine.state_dict()

    same = Lookbehind(torch.optim.SGD(trainable(make_model(batchnorm=False)), lr=LR), rho=0.05)
    same.load_state_dict(saved)
    assert [(g["lookbehind_rho"], g["lookbehind_alpha"]) for g in same.param_groups] == [(0.2, 0.9)]

    with caplog.at_level(logging.WARNING, logger="hf_lookbehind.engine.optimizer"):
        changed = Lookbehind(
            torch.optim.SGD(trainable(make_model(batchnorm=False)), lr=LR), rho=0.1
        )
        changed.load_state_dict(saved)
    assert [(g["lookbehind_rho"], g["lookbehind_alpha"]) for g in changed.param_groups] == [
        (0.1, 0.9)
    ]
    assert "resuming with rho=0.1 (the checkpoint was written with 0.05)" in caplog.text


def test_the_public_surface_is_the_documented_one():
    public = {name for name in dir(Lookbehind) if not name.startswith("_")}
    public -= set(dir(torch.optim.Optimizer))
    engine = Lookbehind(torch.optim.SGD(trainable(make_model(batchnorm=False)), lr=LR))
    attributes = {name for name in vars(engine) if not name.startswith("_")}
    attributes -= set(vars(torch.optim.SGD(trainable(make_model(batchnorm=False)), lr=LR)))
    assert public | attributes == {
        "step_micro_batches",
        "stats",
        "buffer_footprint",
        "reconfigure",
        "settings",
        "cycle_position",
        "base_optimizer",
        # what the Trainer layer drives the engine with
        "gradient_computations",
        "last_descent_grad_norm",
        "per_device_ascent",
        "grad_scaler",
    }


def test_a_new_group_with_a_bad_value_is_refused_before_it_is_added():
    model = make_model(batchnorm=False)
    head = [p for name, p in model.named_parameters() if name.startswith("fc2")]
    body = [p for p in trainable(model) if all(p is not q for q in head)]
    engine = Lookbehind(torch.optim.SGD(body, lr=LR))
    with pytest.raises(ValueError, match="new parameter group"):
        engine.add_param_group({"params": head, "lookbehind_alpha": 2.0})
    assert len(engine.param_groups) == 1
    engine.add_param_group({"params": head, "lookbehind_rho": 0.0})
    assert [group["lookbehind_rho"] for group in engine.param_groups] == [0.05, 0.0]
