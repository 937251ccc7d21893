"""``scripts/benchmark_ops.py``: the operations the engine dispatches per outer step do not grow
with the number of parameter tensors (ResNet-34's 110 against a deep MLP's 442, at tiny widths),
the absolute budgets hold, and the counter counts what it claims: every dispatched ATen
operation outside the closures, views excluded."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torchvision.models import resnet34 as torchvision_resnet34

# The targets, restated: per row the two models' counts differ by at most 10 operations, and
# these rows stay within their budgets (ATen operations per outer step, base SGD included).
MAX_DIFFERENCE = 10
BUDGETS = {
    "lookbehind k=2": 100,
    "lookbehind k=2 adaptive": 150,
    "lookbehind k=5": 200,
    "lookbehind k=2 switching": 100,
}


@pytest.fixture(scope="module")
def bench():
    """The script as a module (``scripts/`` is on ``sys.path``)."""
    return importlib.import_module("benchmark_ops")


@pytest.fixture(scope="module")
def tiny_run(bench, tmp_path_factory):
    """Every row at --tiny: (rows, printed text, JSON report)."""
    json_path = tmp_path_factory.mktemp("ops") / "ops.json"
    printed = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(printed):
            rows = bench.main(["--tiny", "--threads", "1", "--json", str(json_path)])
    finally:
        torch.set_num_threads(threads)
    return rows, printed.getvalue(), json.loads(json_path.read_text())


@pytest.mark.slow
def test_operations_per_outer_step_do_not_grow_with_the_tensor_count(tiny_run):
    rows, _, report = tiny_run
    assert [model["tensors"] for model in report["models"]] == [110, 442]
    names = [row.case for row in rows]
    for expected in (
        "sam", "asam", "sam m-SAM", "lookbehind k=2", "lookbehind k=2 adaptive",
        "lookbehind k=2 switching", "lookbehind k=2 m-SAM", "lookbehind k=2 asam",
        "multistep k=2", "multistep_avg k=2", "lookahead k=2 sam", "lookahead k=2 none",
        "lookbehind k=5", "lookbehind k=5 adaptive", "lookbehind k=5 switching adaptive",
    ):  # fmt: skip
        assert expected in names
    for row in rows:
        ops = [count.ops for count in row.counts.values()]
        assert min(ops) > 0, row.case
        assert max(ops) - min(ops) <= MAX_DIFFERENCE, (row.case, ops)
        assert row.difference == max(ops) - min(ops)


@pytest.mark.slow
@pytest.mark.parametrize(
    "name",
    [
        "lookbehind k=2",
        "lookbehind k=2 adaptive",
        "lookbehind k=5",
        "lookbehind k=2 switching",
    ],
)
def test_budgets(tiny_run, name):
    row = next(row for row in tiny_run[0] if row.case == name)
    assert max(count.ops for count in row.counts.values()) <= BUDGETS[name]
    assert row.within_targets


@pytest.mark.slow
def test_only_per_tensor_alphas_run_tensor_by_tensor(tiny_run):
    """Every multi-tensor call takes one device scalar for its whole list (one CUDA kernel per
    list), except adaptive alpha's one weight per tensor, which no torch kernel takes."""
    for row in tiny_run[0]:
        per_tensor = {count.per_tensor for count in row.counts.values()}
        if "adaptive" in row.case and "global" not in row.case:
            assert min(per_tensor) > 0, row.case
        else:
            assert per_tensor == {0}, (row.case, per_tensor)


@pytest.mark.slow
def test_passes_and_report(tiny_run):
    """Passes per outer step as each method defines them; the table and the JSON agree."""
    rows, printed, report = tiny_run
    by_name = {row.case: row for row in rows}
    expected_passes = {
        "sam": 2, "sam m-SAM": 4, "lookbehind k=2": 3, "lookbehind k=5": 6,
        "lookbehind k=2 switching": 4, "lookbehind k=5 switching": 10,
        "lookbehind k=2 m-SAM": 6, "multistep_avg k=5": 6, "lookahead k=2 sam": 4,
        "lookahead k=5 none": 5,
    }  # fmt: skip
    for name, passes in expected_passes.items():
        assert by_name[name].passes == passes, name
        assert {count.passes for count in by_name[name].counts.values()} == {passes}
    assert "CUDA kernel launches: not counted" in printed
    assert [row["case"] for row in report["rows"]] == [row.case for row in rows]
    for row, written in zip(rows, report["rows"], strict=True):
        for label, count in row.counts.items():
            assert written["counts"][label]["ops"] == count.ops
            assert written["counts"][label]["launches"] is None
            aten = sum(n for op, n in count.op_counts.items() if op.startswith("aten::"))
            assert aten == count.ops


def _counted_ops(bench, extra_ops: int) -> int:
    """ATen operations of one steady-state SAM step whose closure also runs ``extra_ops``
    additions of its own."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 2))
    inputs, labels = torch.randn(8, 4), torch.randint(0, 2, (8,))
    engine = bench.Lookbehind(bench.sgd(model.parameters()), method="sam", rho=0.05)

    def closure():
        scratch = torch.zeros(3)
        for _ in range(extra_ops):
            scratch.add_(1.0)
        loss = nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss

    counter = bench.OpCounter()
    wrapped = counter.excluding(closure)
    count = bench.count_outer_step(lambda: engine.step(wrapped), counter, warmup=1, cuda=False)
    assert count.passes == 2
    return count.ops


def test_the_closures_passes_are_not_counted(bench):
    assert _counted_ops(bench, extra_ops=25) == _counted_ops(bench, extra_ops=0) > 0


def test_the_counter_counts_every_operation_outside_closures_and_no_view(bench):
    x = torch.randn(4, 3)
    counter = bench.OpCounter()
    with counter:
        y = x.t().t().view(-1).view(3, 4)  # views only
        assert counter.ops == 0
        for _ in range(5):
            y = y.add(1.0)
        torch._foreach_mul_([x, y], 2.0)
        counter.excluding(lambda: x.add_(1.0).mul_(3.0))()
    assert counter.ops == 6
    assert counter.counts["aten::add.Tensor"] == 5 and counter.passes == 1


def test_per_tensor_counts_foreach_calls_that_cuda_runs_tensor_by_tensor(bench):
    """Lists of unequal shapes (a list of 0-d weights) or mixed dtypes; one 0-d tensor or a
    Python scalar for the whole list is a single multi-tensor kernel."""
    starts = [torch.zeros(3), torch.zeros(2, 2), torch.zeros(5)]
    ends = [torch.ones(3), torch.ones(2, 2), torch.ones(5)]
    weight = torch.tensor(0.5)
    counter = bench.OpCounter()
    with counter:
        torch._foreach_lerp_(starts, ends, 0.5)
        torch._foreach_mul_(starts, weight)
        assert counter.per_tensor == 0
        torch._foreach_lerp_(starts, ends, [weight] * 3)
        assert counter.per_tensor == 3
        torch._foreach_mul_([torch.ones(2), torch.ones(2, dtype=torch.float64)], 2.0)
    assert counter.per_tensor == 5


def test_models_have_the_tensors_they_claim(bench):
    full = bench.resnet34()
    reference = torchvision_resnet34(weights=None, num_classes=10)
    assert [p.shape for p in full.parameters()] == [p.shape for p in reference.parameters()]
    for spec, tensors in zip(bench.model_specs(tiny=True), (110, 442), strict=True):
        assert bench.tensor_count(spec) == tensors
        model = spec.build()
        assert model(torch.randn(2, *spec.input_shape)).shape == (2, 10)


def _event(name: str, start: int, duration: int = 1):
    return SimpleNamespace(name=lambda: name, start_ns=lambda: start, duration_ns=lambda: duration)


def test_cuda_calls_inside_the_closures_are_left_out(bench):
    events = [
        _event("cudaLaunchKernel", 5),
        _event(bench.CLOSURE_RANGE, 10, 20),
        _event("cudaLaunchKernel", 15),  # a pass's kernel
        _event("cudaMemcpyAsync", 29),
        _event("cudaStreamSynchronize", 25),
        _event("cudaLaunchKernelExC", 31),
        _event("cudaMemcpy", 33),  # blocking
        _event("cudaMemsetAsync", 40),
        _event("cudaEventSynchronize", 41),
        _event("aten::mul", 42),
    ]
    profiler = SimpleNamespace(
        profiler=SimpleNamespace(kineto_results=SimpleNamespace(events=lambda: events))
    )
    assert bench.count_cuda_calls(profiler) == (3, 2)


def test_bad_arguments_say_what_is_allowed(bench, capsys):
    """(``--device`` is parsed by the code it shares with ``scripts/benchmark_step.py``.)"""
    for argv, message in (
        (["--cases", "sam,lookbehind_fast"], "give a comma-separated list of: sam, asam"),
        (["--warmup", "0"], "give an integer >= 1"),
    ):
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert message in capsys.readouterr().err
