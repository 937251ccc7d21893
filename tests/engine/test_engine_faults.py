"""Faults injected into every method and mode, with and without BatchNorm: a non-finite value
in any pass, an exception in any pass, parameters without a gradient, ``add_param_group`` at
every cycle position and checkpoints written with another setup. After each, the model holds
the slow weights, nothing non-finite reaches the weights or the BatchNorm statistics, and an
error says what to change."""

from __future__ import annotations

import logging
import math

import pytest
import torch
from helpers.models import make_batches
from reference_lookbehind import ReferenceLookbehind
from torch import nn

from hf_lookbehind import Lookbehind

# name: (engine settings, calls per outer step, passes per call)
CONFIGS = {
    "lookbehind": (dict(k=2, alpha=0.5), 1, 3),
    "lookbehind_adaptive": (dict(k=2, adaptive_alpha=True), 1, 3),
    "switching": (dict(k=2, alpha=0.5, minibatch_switching=True), 2, 2),
    "switching_adaptive": (dict(k=2, adaptive_alpha=True, minibatch_switching=True), 2, 2),
    "lookahead_sam": (dict(method="lookahead", k=2), 2, 2),
    "lookahead": (dict(method="lookahead", k=2, perturbation="none"), 2, 1),
    "sam": (dict(method="sam"), 1, 2),
    "asam": (dict(method="sam", perturbation="asam"), 1, 2),
    "multistep": (dict(method="multistep", k=2), 1, 3),
    "multistep_avg": (dict(method="multistep_avg", k=2), 1, 3),
    "m_sam": (dict(method="sam", ascent_sync="per_micro_batch"), 1, 4),
    "lookbehind_m_sam": (dict(k=2, ascent_sync="per_micro_batch"), 1, 6),
}
BATCHNORM = ["none", "first_pass", "every_pass"]


class Injected(Exception):
    """The exception a closure raises on purpose."""


class FaultNet(nn.Module):
    """A float64 classifier with optional BatchNorm, an auxiliary head whose use the closure
    decides per pass, and an extra layer that joins the optimizer later."""

    def __init__(self, batchnorm: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(6, 8)
        self.norm = nn.BatchNorm1d(8) if batchnorm else nn.Identity()
        self.fc2 = nn.Linear(8, 3)
        self.aux = nn.Linear(8, 3)
        self.extra = nn.Linear(8, 3)
        self.double()

    def forward(self, x, *, aux: bool = False, extra: bool = False):
        h = torch.tanh(self.norm(self.fc1(x)))
        out = self.fc2(h)
        if aux:
            out = out + self.aux(h)
        if extra:
            out = out + self.extra(h)
        return out


class Closures:
    """Closures over one model that count every pass and inject a fault into one of them."""

    def __init__(self, model: FaultNet, fault: str | None = None, at: int = -1) -> None:
        self.model, self.fault, self.at, self.passes = model, fault, at, 0
        self.aux = lambda index: False  # whether pass ``index`` uses the auxiliary head
        self.extra = False

    def one(self, batch, scale: float = 1.0):
        def closure() -> torch.Tensor:
            index, self.passes = self.passes, self.passes + 1
            x, y = batch
            if index == self.at and self.fault == "raise":
                raise Injected(f"pass {index}")
            if index == self.at and self.fault == "nan":
                x = x * math.nan
            logits = self.model(x, aux=self.aux(index), extra=self.extra)
            loss = nn.functional.cross_entropy(logits, y) * scale
            loss.backward()
            return loss

        return closure

    def step(self, engine: Lookbehind, batch) -> torch.Tensor:
        """One engine step on ``batch``; for m-SAM, on its two halves as micro-batches."""
        if not engine.settings.micro_batch_ascent:
            return engine.step(self.one(batch))
        x, y = batch
        return engine.step_micro_batches(
            [self.one((x[:8], y[:8]), 0.5), self.one((x[8:], y[8:]), 0.5)]
        )


def build(name: str, batchnorm: str, extra_group: bool = False):
    settings, calls, passes = CONFIGS[name]
    model = FaultNet(batchnorm != "none")
    trained = [p for n, p in model.named_parameters() if not n.startswith("extra")]
    groups = [{"params": trained}]
    if extra_group:
        groups.append({"params": list(model.extra.parameters())})
    base = torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=1e-3)
    model_kwargs = {} if batchnorm == "none" else dict(model=model, batchnorm_update=batchnorm)
    return model, Lookbehind(base, **settings, **model_kwargs), calls, passes


def snapshot(model: nn.Module) -> list[torch.Tensor]:
    return [t.detach().clone() for t in (*model.parameters(), *model.buffers())]


def assert_same(model: nn.Module, expected: list[torch.Tensor]) -> None:
    for current, held in zip((*model.parameters(), *model.buffers()), expected, strict=True):
        assert torch.equal(current, held)


def assert_finite(model: nn.Module) -> None:
    for t in (*model.parameters(), *model.buffers()):
        assert torch.isfinite(t.float()).all()


def outer_step(engine, closures, batches) -> None:
    for batch in batches:
        closures.step(engine, batch)


CASES = [
    (name, batchnorm, at)
    for name, (_, calls, passes) in CONFIGS.items()
    for batchnorm in BATCHNORM
    for at in range(calls * passes)
]


def test_pass_counts_match_the_table():
    for name, (_, calls, passes) in CONFIGS.items():
        model, engine, _, _ = build(name, "first_pass")
        closures = Closures(model)
        outer_step(engine, closures, make_batches(calls))
        assert closures.passes == calls * passes, name


# --------------------------------------------------------------------- non-finite values
@pytest.mark.parametrize("name,batchnorm,at", CASES)
def test_a_non_finite_value_in_any_pass_skips_the_outer_step(name, batchnorm, at):
    """The slow weights and the BatchNorm statistics are as before the outer step (the
    statistics as before the call that saw the bad pass), the skip is counted, nothing
    non-finite is left, and evaluation afterwards is finite."""
    model, engine, calls, passes = build(name, batchnorm)
    closures = Closures(model)
    outer_step(engine, closures, make_batches(calls, seed=5))  # a clean outer step first
    before = snapshot(model)
    closures.fault, closures.at = "nan", closures.passes + at
    batches = make_batches(calls, seed=6)
    bad_call = at // passes
    outer_step(engine, closures, batches[:bad_call])
    statistics = [b.clone() for b in model.buffers()]
    outer_step(engine, closures, batches[bad_call:])
    parameters = list(model.parameters())
    for current, held in zip(parameters, before, strict=False):
        assert torch.equal(current, held)
    for current, held in zip(model.buffers(), statistics, strict=True):
        assert torch.equal(current, held)
    assert engine.stats().skipped_steps == 1
    assert engine.cycle_position == 0
    assert_finite(model)
    model.eval()
    assert torch.isfinite(model(make_batches(1)[0][0])).all()


# ------------------------------------------------------------------------------ exceptions
def unrecoverable(name: str, call: int, index: int) -> bool:
    """Whether the engine had changed what outlives the step when pass ``index`` of call
    ``call`` raised: a base-optimizer update before that pass (same-batch Lookbehind from its
    third pass on), or a moved mid-cycle perturbation (switching, second pass of a later call)."""
    if name in ("lookbehind", "lookbehind_adaptive"):
        return index >= 2
    if name in ("switching", "switching_adaptive"):
        return call > 0 and index == 1
    return False


@pytest.mark.parametrize("name,batchnorm,at", CASES)
def test_an_exception_in_any_pass_leaves_the_slow_weights(name, batchnorm, at):
    """Between calls the model holds the slow weights, and the BatchNorm statistics are as
    before the failed call. Where the step had changed nothing that outlives it, catching the
    error and going on equals never having seen that batch; otherwise the open outer step is
    discarded (counted as skipped) and the error says so."""
    model, engine, calls, passes = build(name, batchnorm)
    closures = Closures(model)
    batches = make_batches(calls * 3, seed=7)
    bad_call = calls + at // passes  # in the second outer step
    closures.fault = "raise"
    for index, batch in enumerate(batches):
        if index == bad_call:
            before = snapshot(model)
            closures.at = closures.passes + at % passes
            with pytest.raises(Injected) as failure:
                closures.step(engine, batch)
            assert any("holds the slow weights" in note for note in failure.value.__notes__)
            assert_same(model, before)
            assert all(p.grad is None for p in model.parameters())
            continue
        closures.step(engine, batch)
    assert_finite(model)
    if unrecoverable(name, bad_call % calls, at % passes):
        assert engine.stats().skipped_steps == 1
        assert "discarded" in failure.value.__notes__[-1]
        return
    twin, twin_engine, _, _ = build(name, batchnorm)
    twin_closures = Closures(twin)
    for index, batch in enumerate(batches):
        if index != bad_call:
            twin_closures.step(twin_engine, batch)
    assert_same(model, snapshot(twin))
    assert engine.stats().gradient_computations == twin_engine.stats().gradient_computations
    assert engine.state_dict()["state"].keys() == twin_engine.state_dict()["state"].keys()


# ------------------------------------------------------------- parameters without a gradient
@pytest.mark.parametrize("name", CONFIGS)
@pytest.mark.parametrize("batchnorm", ["none", "first_pass"])
def test_a_parameter_without_gradient_in_a_step_is_untouched(name, batchnorm):
    """As in ``torch.optim``: the auxiliary head has a gradient in the first outer step and
    none in the next two, and stays exactly where the first left it."""
    model, engine, calls, _ = build(name, batchnorm)
    closures = Closures(model)
    closures.aux = lambda index: True
    outer_step(engine, closures, make_batches(calls, seed=8))
    after_first = [p.clone() for p in model.aux.parameters()]
    assert not torch.equal(after_first[0], FaultNet(False).aux.weight)
    closures.aux = lambda index: False
    outer_step(engine, closures, make_batches(2 * calls, seed=9))
    for current, held in zip(model.aux.parameters(), after_first, strict=True):
        assert torch.equal(current, held)
    assert_finite(model)
    assert engine.stats().skipped_steps == 0


@pytest.mark.parametrize("name", [n for n in CONFIGS if n != "lookahead"])
def test_a_gradient_only_in_the_ascent_pass_moves_nothing(name):
    """The auxiliary head is used only by the first pass of each call, whose gradient is the
    ascent's: no descent ever sees it, so it never moves (plain Lookahead is left out: its
    only pass is a descent)."""
    model, engine, calls, passes = build(name, "first_pass")
    closures = Closures(model)
    first_passes = {0} if not engine.settings.micro_batch_ascent else {0, passes // 2}
    closures.aux = lambda index: index % passes in first_passes
    initial = [p.clone() for p in model.aux.parameters()]
    outer_step(engine, closures, make_batches(3 * calls, seed=10))
    for current, held in zip(model.aux.parameters(), initial, strict=True):
        assert torch.equal(current, held)
    assert_finite(model)


@pytest.mark.parametrize("method,k", [("sam", 1), ("lookbehind", 2)])
def test_m_sam_with_a_gradient_from_a_later_micro_batch_only(method, k):
    """A parameter used by the second micro-batch only is summed from there, as in the float64
    transcription (which sums the gradients that exist)."""
    model = FaultNet(False)
    reference_model = FaultNet(False)
    settings = dict(method=method, k=k, rho=0.1)
    if method == "lookbehind":
        settings["alpha"] = 0.5
    engine = Lookbehind(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        ascent_sync="per_micro_batch",
        **settings,
    )
    reference = ReferenceLookbehind(
        torch.optim.SGD(reference_model.parameters(), lr=0.1, momentum=0.9), **settings
    )

    def micro_closures(net, batch):
        x, y = batch
        closures = []
        for part, use_aux in ((slice(0, 8), False), (slice(8, 16), True)):

            def closure(part=part, use_aux=use_aux):
                loss = nn.functional.cross_entropy(net(x[part], aux=use_aux), y[part]) * 0.5
                loss.backward()
                return loss

            closures.append(closure)
        return closures

    for batch in make_batches(3, seed=11):
        engine.step_micro_batches(micro_closures(model, batch))
        reference.step_micro_batches(micro_closures(reference_model, batch))
    for ours, theirs in zip(model.parameters(), reference_model.parameters(), strict=True):
        assert (ours - theirs).abs().max() < 1e-10
    assert not torch.equal(model.aux.weight, FaultNet(False).aux.weight)


# ------------------------------------------------------------------------- add_param_group
@pytest.mark.parametrize("name", ["lookbehind", "switching", "lookahead_sam", "sam"])
def test_add_param_group_between_outer_steps_equals_having_it_from_the_start(name):
    """A group added between outer steps joins from the next step: the run equals one that had
    the group from the start, its parameters without gradient until then."""
    model, engine, calls, _ = build(name, "first_pass")
    twin, twin_engine, _, _ = build(name, "first_pass", extra_group=True)
    closures, twin_closures = Closures(model), Closures(twin)
    batches = make_batches(4 * calls, seed=12)
    for index, batch in enumerate(batches):
        if index == 2 * calls:
            engine.add_param_group({"params": list(model.extra.parameters())})
            closures.extra = twin_closures.extra = True
        closures.step(engine, batch)
        twin_closures.step(twin_engine, batch)
    assert_same(model, snapshot(twin))
    assert not torch.equal(model.extra.weight, FaultNet(False).extra.weight)


@pytest.mark.parametrize("name", ["switching", "switching_adaptive", "lookahead_sam", "lookahead"])
def test_add_param_group_in_the_middle_of_a_cycle_is_refused_before_anything_changes(name):
    model, engine, calls, _ = build(name, "first_pass")
    twin, twin_engine, _, _ = build(name, "first_pass")
    closures, twin_closures = Closures(model), Closures(twin)
    batches = make_batches(2 * calls, seed=13)
    for index, batch in enumerate(batches):
        if index % calls:  # every position but the first of a cycle
            before, groups = snapshot(model), len(engine.param_groups)
            with pytest.raises(RuntimeError, match="between outer steps only"):
                engine.add_param_group({"params": list(model.extra.parameters())})
            assert_same(model, before)
            assert len(engine.param_groups) == groups
        closures.step(engine, batch)
        twin_closures.step(twin_engine, batch)
    assert_same(model, snapshot(twin))


# -------------------------------------------------------------- checkpoints of another setup
def checkpoint(name: str, calls_done: int, **changes):
    """The engine's state dict after ``calls_done`` calls, and a fresh engine with
    ``changes`` applied to the settings (built on the same model)."""
    settings, _, _ = CONFIGS[name]
    model, engine, _, _ = build(name, "first_pass")
    closures = Closures(model)
    for batch in make_batches(calls_done, seed=14):
        closures.step(engine, batch)
    trained = [p for n, p in model.named_parameters() if not n.startswith("extra")]
    base = torch.optim.SGD(trained, lr=0.1, momentum=0.9, weight_decay=1e-3)
    fresh = Lookbehind(base, **{**settings, **changes}, model=model)
    return engine.state_dict(), fresh


@pytest.mark.parametrize(
    "changes", [dict(rho=0.1), dict(alpha=0.8), dict(max_grad_norm=1.0), dict(k=3)]
)
def test_a_checkpoint_from_the_middle_of_a_cycle_needs_the_same_setup(changes):
    state, fresh = checkpoint("switching", 1, **changes)
    with pytest.raises(ValueError, match=r"in the middle of a cycle .* every setting must match"):
        fresh.load_state_dict(state)


@pytest.mark.parametrize("changes", [dict(rho=0.1), dict(alpha=0.8), dict(adaptive_alpha=True)])
def test_rho_and_alpha_may_change_between_outer_steps_and_are_logged(changes, caplog):
    """Hyper-parameters that live in the parameter groups (the adaptive switch included) may
    change between outer steps: the new value applies to every group."""
    state, fresh = checkpoint("switching", 2, **changes)
    with caplog.at_level(logging.WARNING, logger="hf_lookbehind.engine.optimizer"):
        fresh.load_state_dict(state)
    ((key, value),) = changes.items()
    assert f"resuming with {key}={value!r}" in caplog.text
    assert getattr(fresh.settings, key) == value
    assert all(group[f"lookbehind_{key}"] == value for group in fresh.param_groups)


@pytest.mark.parametrize(
    "name,changes,named",
    [
        ("switching", dict(perturbation="asam"), "perturbation='SAM()' (now 'ASAM(eta=0.01)')"),
        (
            "switching_adaptive",
            dict(adaptive_alpha_scope="global"),
            "adaptive_alpha_scope='per_tensor'",
        ),
        ("asam", dict(asam_eta=0.1), "perturbation='ASAM(eta=0.01)' (now 'ASAM(eta=0.1)')"),
        ("lookbehind", dict(k=3), "k=2 (now 3)"),
    ],
)
def test_the_method_itself_may_not_change_between_outer_steps(name, changes, named):
    _, calls, _ = CONFIGS[name]
    state, fresh = checkpoint(name, calls, **changes)
    with pytest.raises(ValueError, match="between outer steps, where only rho") as failure:
        fresh.load_state_dict(state)
    assert named in str(failure.value)


def test_a_mid_cycle_checkpoint_without_its_buffers_is_refused():
    state, fresh = checkpoint("switching", 1)
    for entry in state["state"].values():
        entry.pop("lookbehind_perturbed", None)
    with pytest.raises(ValueError, match="lacks the cycle's buffers"):
        fresh.load_state_dict(state)


class InstanceNormNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv1d(2, 4, 3)
        self.norm = nn.InstanceNorm1d(4, track_running_stats=True)
        self.head = nn.Linear(4, 3)
        self.double()

    def forward(self, x):
        return self.head(torch.tanh(self.norm(self.conv(x))).mean(-1))


@pytest.mark.parametrize("name", ["lookbehind", "switching", "sam"])
def test_a_non_finite_batch_leaves_instance_norm_statistics_as_they_were(name):
    """Every running statistic a pass updates is guarded, not only BatchNorm's: a skipped step
    leaves InstanceNorm's (track_running_stats=True) bit-identical, and evaluation stays
    finite."""
    settings, calls, _ = CONFIGS[name]
    model = InstanceNormNet()
    engine = Lookbehind(torch.optim.SGD(model.parameters(), lr=0.1), model=model, **settings)
    generator = torch.Generator().manual_seed(0)
    batches = [
        (torch.randn(8, 2, 6, generator=generator, dtype=torch.float64), torch.arange(8) % 3)
        for _ in range(3 * calls)
    ]

    def closure(x, y):
        def run():
            loss = nn.functional.cross_entropy(model(x), y)
            loss.backward()
            return loss

        return run

    for x, y in batches[:calls]:
        engine.step(closure(x, y))
    before = (model.norm.running_mean.clone(), model.norm.running_var.clone())
    weights = [p.detach().clone() for p in model.parameters()]
    for x, y in batches[calls : 2 * calls]:
        poisoned = x.clone()
        poisoned[0, 0, 0] = float("nan")
        engine.step(closure(poisoned, y))
    assert engine.stats().skipped_steps == 1
    assert torch.equal(model.norm.running_mean, before[0])
    assert torch.equal(model.norm.running_var, before[1])
    assert all(torch.equal(p, w) for p, w in zip(model.parameters(), weights))
    model.eval()
    assert torch.isfinite(model(batches[0][0])).all()


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("name", ["lookbehind", "switching"])
def test_what_a_skipped_outer_step_leaves_in_the_base_optimizer(optimizer, name):
    """A skipped outer step leaves the slow weights bit-identical, and the base optimizer's
    state exactly as its own updates with zero gradients leave it, one per inner step of the
    discarded outer step (SGD's momentum decays, Adam's moments decay and its step count
    advances): the same state as a twin optimizer stepped k times on zero gradients."""
    settings, calls, _ = CONFIGS[name]
    k = settings["k"]

    def make(params):
        if optimizer == "sgd":
            return torch.optim.SGD(params, lr=0.1, momentum=0.9)
        return torch.optim.AdamW(params, lr=0.01, weight_decay=0.01)

    model = FaultNet(False)
    engine = Lookbehind(make(model.parameters()), **settings)
    batches = make_batches(2 * calls, seed=3)
    healthy = Closures(model)
    for batch in batches[:calls]:
        engine.step(healthy.one(batch))
    twin = FaultNet(False)
    twin.load_state_dict(model.state_dict())
    twin_optimizer = make(twin.parameters())
    twin_optimizer.load_state_dict(
        engine.base_optimizer.state_dict()
        | {
            "state": {
                index: entry
                for index, entry in engine.base_optimizer.state_dict()["state"].items()
                if isinstance(index, int)
            }
        }
    )
    slow = [p.detach().clone() for p in model.parameters()]
    poisoned = Closures(model, "nan", at=0)
    for batch in batches[calls:]:
        engine.step(poisoned.one(batch))
    assert engine.stats().skipped_steps == 1
    assert all(torch.equal(p, s) for p, s in zip(model.parameters(), slow))
    stepped = {i for i in engine.base_optimizer.state_dict()["state"] if isinstance(i, int)}
    for _ in range(k):
        for index, p in enumerate(twin.parameters()):
            p.grad = torch.zeros_like(p) if index in stepped else None
        twin_optimizer.step()
    expected = twin_optimizer.state_dict()["state"]
    actual = engine.base_optimizer.state_dict()["state"]
    for index, entry in expected.items():
        for key, value in entry.items():
            assert torch.equal(actual[index][key], value), (index, key)
