"""Parameters that change between steps: dtype and device (``model.double()``), views of one
buffer, two engines on one base optimizer. Each against an independent expectation: a fresh
engine on the changed model, a model with separate parameters, the error that names the fix."""

from __future__ import annotations

import pytest
import torch
from helpers.models import closure_for, make_batches, make_model, max_param_difference
from torch import nn

from hf_lookbehind import Lookbehind

MODES = {
    "lookbehind": dict(k=2),
    "lookbehind_adaptive": dict(k=2, adaptive_alpha=True),
    "switching": dict(k=2, minibatch_switching=True),
    "sam": dict(method="sam"),
    "multistep_avg": dict(method="multistep_avg", k=2),
    "lookahead_sam": dict(method="lookahead", k=2),
    "m_sam": dict(method="sam", ascent_sync="per_micro_batch"),
}


def step(engine, model, batch):
    closure = closure_for(model, batch)
    if engine.settings.micro_batch_ascent:
        return engine.step_micro_batches([closure])
    return engine.step(closure)


@pytest.mark.parametrize("mode", MODES)
def test_a_model_turned_double_between_steps_trains_in_double(mode):
    """After ``model.double()`` between outer steps the engine goes on in float64, as a fresh
    engine on the float64 model does (SGD without state, so nothing else carries over)."""
    settings = MODES[mode]
    calls = 2 if settings.get("minibatch_switching") or settings.get("method") == "lookahead" else 1
    batches = make_batches(1 + 2 * calls, seed=3)
    model = make_model().float()
    engine = Lookbehind(torch.optim.SGD(model.parameters(), lr=0.1), **settings)
    for batch in batches[:calls]:
        step(engine, model, [t.float() if t.is_floating_point() else t for t in batch])
    model.double()
    twin = make_model()
    twin.load_state_dict(model.state_dict())
    fresh = Lookbehind(torch.optim.SGD(twin.parameters(), lr=0.1), **settings)
    for batch in batches[calls : 3 * calls]:
        step(engine, model, batch)
        step(fresh, twin, batch)
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert max_param_difference(model, twin) == 0.0
    assert max_param_difference(model, make_model()) > 1e-3


class ViewsOfOneBuffer(nn.Module):
    """Two linear layers whose weights are views of one flat buffer (as a flattened-parameter
    wrapper keeps them), or separate tensors with the same values."""

    def __init__(self, flat: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        values = torch.randn(2 * 8 * 6, dtype=torch.float64) / 3
        self.buffer = values.clone() if flat else None
        source = self.buffer if flat else values.clone()
        self.first = nn.Parameter(source[:48].view(8, 6))
        self.second = nn.Parameter(
            source[48:].view(8, 6) if flat else values[48:].view(8, 6).clone()
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (torch.tanh(x @ self.first.T) @ self.second)[:, :3]


@pytest.mark.parametrize("mode", MODES)
def test_parameters_that_are_views_of_one_buffer_stay_views(mode):
    flat, separate = ViewsOfOneBuffer(flat=True), ViewsOfOneBuffer(flat=False)
    engines = [
        Lookbehind(torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9), **MODES[mode])
        for m in (flat, separate)
    ]
    for batch in make_batches(3, seed=4):
        for engine, model in zip(engines, (flat, separate)):
            step(engine, model, batch)
    start = flat.buffer.data_ptr()
    assert flat.first.data_ptr() == start
    assert flat.second.data_ptr() == start + 48 * flat.buffer.element_size()
    assert torch.equal(flat.buffer[48:], flat.second.detach().flatten())
    assert max_param_difference(flat, separate) == 0.0


class TiedByStorage(nn.Module):
    """An embedding and an output layer tied by storage as two Parameter objects
    (``nn.Parameter(embedding.weight.data)``), or overlapping views of one buffer."""

    def __init__(self, overlapping_views: bool = False) -> None:
        super().__init__()
        self.embedding = nn.Embedding(10, 6)
        self.head = nn.Linear(6, 10, bias=False)
        if overlapping_views:
            flat = torch.randn(80)
            self.embedding.weight = nn.Parameter(flat[:60].view(10, 6))
            self.head.weight = nn.Parameter(flat[20:80].view(10, 6))
        else:
            self.head.weight = nn.Parameter(self.embedding.weight.data)


@pytest.mark.parametrize("overlapping_views", [False, True])
@pytest.mark.parametrize("mode", MODES)
def test_parameters_sharing_memory_are_refused_at_construction(mode, overlapping_views):
    model = TiedByStorage(overlapping_views)
    assert len(list(model.parameters())) == 2
    with pytest.raises(ValueError, match=r"parameters 0 and 1 .* share memory .* as one Parameter"):
        Lookbehind(torch.optim.SGD(model.parameters(), lr=0.1), **MODES[mode])


def test_weights_tied_as_one_parameter_train_as_one():
    """The fix the refusal names: one Parameter in both modules, seen once by the optimizer."""
    model = TiedByStorage()
    model.head.weight = model.embedding.weight
    engine = Lookbehind(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
    tokens, labels = torch.randint(0, 10, (6,)), torch.randint(0, 10, (6,))
    before = model.embedding.weight.detach().clone()

    def closure():
        loss = nn.functional.cross_entropy(model.head(model.embedding(tokens)), labels)
        loss.backward()
        return loss

    engine.step(closure)
    assert model.head.weight is model.embedding.weight
    assert not torch.equal(model.embedding.weight, before)


def test_a_second_engine_on_one_base_optimizer_takes_it_over():
    """Built mid-cycle of the first, the second engine starts its own run state (no stale
    cycle position), and the first refuses to step rather than share it."""
    model = make_model()
    base = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    first = Lookbehind(base, k=2, minibatch_switching=True)
    batches = make_batches(4, seed=5)
    first.step(closure_for(model, batches[0]))
    assert first.cycle_position == 1
    second = Lookbehind(base, method="sam")
    assert second.cycle_position == 0
    second.step(closure_for(model, batches[1]))
    assert second.state_dict()["state"]["lookbehind_run"]["settings"]["method"] == "sam"
    with pytest.raises(RuntimeError, match="another Lookbehind engine was built on this"):
        first.step(closure_for(model, batches[2]))


@pytest.mark.parametrize("mode", MODES)
def test_a_sparse_gradient_is_refused_before_any_weight_moves(mode):
    model = nn.Sequential(nn.Embedding(10, 4, sparse=True), nn.Flatten(), nn.Linear(8, 3))
    before = [p.detach().clone() for p in model.parameters()]
    engine = Lookbehind(torch.optim.SGD(model.parameters(), lr=0.1), **MODES[mode])
    tokens, labels = torch.randint(0, 10, (6, 2)), torch.randint(0, 3, (6,))

    def closure():
        loss = nn.functional.cross_entropy(model(tokens), labels)
        loss.backward()
        return loss

    with pytest.raises(ValueError, match=r"sparse gradient .* build the layer with sparse=False"):
        if engine.settings.micro_batch_ascent:
            engine.step_micro_batches([closure])
        else:
            engine.step(closure)
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


def test_complex_parameters_are_refused_at_construction():
    model = nn.Linear(3, 3).to(torch.complex64)
    with pytest.raises(ValueError, match=r"2 complex parameters .* real floating-point"):
        Lookbehind(torch.optim.SGD(model.parameters(), lr=0.1), k=2)
