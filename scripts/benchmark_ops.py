"""Operations the Lookbehind engine dispatches per outer step, outside the forward/backward passes.

On a GPU, what a step costs beyond its passes is kernel launches and host synchronisations. This
script counts, for one steady-state outer step of every method and mode (after ``--warmup`` outer
steps, since the first allocates the buffers), every ATen operation the engine and its base
optimizer dispatch (``TorchDispatchMode``; views excluded, and nothing inside the closures, whose
passes are the model's own work), on two models with very different numbers of parameter
tensors, both with BatchNorm: ResNet-34 (110 tensors) and a deep MLP (442 tensors). An engine
whose work is done by multi-tensor kernels (``torch._foreach_*``, one call per list) issues the
same number of operations for both; a per-tensor Python loop shows up as a difference.

Columns, per model: ``ops`` the ATen operations; ``per-tensor`` the tensors of ``_foreach_*``
calls whose lists differ in shape or dtype (a list of 0-d weights, say): one call here, but CUDA
runs such a call one kernel per tensor. On CUDA (``--device cuda``) also ``launches`` (kernel,
memcpy and memset launches outside the closures, from ``torch.profiler``) and ``syncs`` (host
synchronisations: stream, event and device synchronisations and blocking copies). Then the
difference between the two models and the budget of the row. After the table: for a row that
misses a target, its operations by source file, and the calls that CUDA runs per tensor.

    python scripts/benchmark_ops.py --tiny              # the same tensor counts, tiny widths
    python scripts/benchmark_ops.py                     # full widths (ResNet-34: 21.8M params)
    python scripts/benchmark_ops.py --device cuda --json ops.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from benchmark_step import (
    BatchClosure,
    comma_separated,
    device_argument,
    device_name,
    format_columns,
    integer_at_least,
)
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torchvision.models.resnet import BasicBlock, conv1x1

import hf_lookbehind
from hf_lookbehind import Lookbehind, LookbehindSettings

RHO = 0.05
STATIC_ALPHA = 0.5
MICRO_BATCHES = 2
# The largest difference between the two models' counts of a row, and absolute budgets of some
# rows (ops per outer step, the base SGD update included).
MAX_MODEL_DIFFERENCE = 10
BUDGETS = {
    "lookbehind k=2": 100,
    "lookbehind k=2 adaptive": 150,
    "lookbehind k=5": 200,
    "lookbehind k=2 switching": 100,
}
CLOSURE_RANGE = "benchmark_ops.closure"
# CUDA runtime calls, by name prefix, as torch.profiler records them on the host.
LAUNCHES = ("cudaLaunch", "cuLaunch", "cudaMemcpyAsync", "cudaMemsetAsync")
SYNCHRONISATIONS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize")
BLOCKING_COPY = "cudaMemcpy"
COLLECTIVE_NAMESPACES = ("c10d", "_c10d_functional")
ENGINE = Path(hf_lookbehind.__file__).resolve().parent


class OpCounter(TorchDispatchMode):
    """Counts the operations dispatched while it is active, by name (``aten::mul_.Tensor``),
    views excluded; nothing is counted inside :meth:`excluding` closures, whose calls
    ``passes`` counts. ``ops`` are the ATen operations, ``collectives`` the c10d ones; the
    ``profiler::`` ranges that ``torch.optim`` opens around ``step`` and ``zero_grad`` (host
    bookkeeping, no kernel) are in ``counts`` only. ``sources`` counts the ATen operations by
    the function that issued them (:func:`source_of`). ``per_tensor`` sums the tensors of the
    ``_foreach_*`` calls whose tensor lists differ in shape, stride or dtype, which CUDA runs as
    one kernel per tensor; ``per_tensor_calls`` names them."""

    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()
        self.sources: Counter[str] = Counter()
        self.per_tensor = 0
        self.per_tensor_calls: Counter[str] = Counter()
        self.passes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if not func.is_view:
            name = func.name()
            self.counts[name] += 1
            if name.startswith("aten::"):
                source = source_of(sys._getframe(1))
                self.sources[source] += 1
                tensors = _per_tensor_work(args, kwargs or {}) if "::_foreach_" in name else 0
                if tensors:
                    self.per_tensor += tensors
                    self.per_tensor_calls[f"{name} ({source})"] += tensors
        return func(*args, **(kwargs or {}))

    def _in(self, namespaces: Sequence[str]) -> int:
        return sum(n for name, n in self.counts.items() if name.split("::")[0] in namespaces)

    @property
    def ops(self) -> int:
        return self._in(("aten",))

    @property
    def collectives(self) -> int:
        return self._in(COLLECTIVE_NAMESPACES)

    def excluding(self, closure: Callable[[], torch.Tensor]) -> Callable[[], torch.Tensor]:
        """``closure`` run outside the counter (dispatch modes off), inside a profiler range
        that :func:`count_cuda_calls` leaves out."""

        def run() -> torch.Tensor:
            self.passes += 1
            with _disable_current_modes(), torch.profiler.record_function(CLOSURE_RANGE):
                return closure()

        return run


def source_of(frame) -> str:
    """``file:function`` of the innermost caller in the engine (``hf_lookbehind``) or in
    ``torch.optim`` (the base optimizer), else ``other``."""
    while frame is not None:
        path = Path(frame.f_code.co_filename)
        if path.parent == ENGINE or path.parent.parts[-2:] == ("torch", "optim"):
            return f"{path.name}:{frame.f_code.co_name}"
        frame = frame.f_back
    return "other"


def _per_tensor_work(args: Sequence, kwargs: dict) -> int:
    """The number of tensors of a ``_foreach_*`` call if its lists cannot share one kernel."""
    lists = [
        value
        for value in (*args, *kwargs.values())
        if isinstance(value, (list, tuple)) and value and isinstance(value[0], torch.Tensor)
    ]
    if not lists:
        return 0
    first = lists[0]
    mixed = len({t.dtype for t in first}) > 1 or any(
        len(other) != len(first)
        or any(a.shape != b.shape or a.stride() != b.stride() for a, b in zip(first, other))
        for other in lists[1:]
    )
    return len(first) if mixed else 0


def count_cuda_calls(profiler: torch.profiler.profile) -> tuple[int, int]:
    """(launches, host synchronisations) that ``profiler`` recorded outside the closures."""
    events = profiler.profiler.kineto_results.events()
    closures = [
        (event.start_ns(), event.start_ns() + event.duration_ns())
        for event in events
        if event.name() == CLOSURE_RANGE
    ]

    def outside(event) -> bool:
        return not any(start <= event.start_ns() <= end for start, end in closures)

    launches = syncs = 0
    for event in events:
        name = event.name()
        if name.startswith(LAUNCHES) and outside(event):
            launches += 1
        elif (name == BLOCKING_COPY or name.startswith(SYNCHRONISATIONS)) and outside(event):
            syncs += 1
    return launches, syncs


# ---------------------------------------------------------------------------------- models
def resnet34(width: int = 64, num_classes: int = 10) -> nn.Sequential:
    """ResNet-34 (torchvision's layout: 7x7 stem, max-pool, 3-4-6-3 basic blocks, 110 parameter
    tensors) with stage widths ``width * (1, 2, 4, 8)``; at width 64 its parameters are those
    of ``torchvision.models.resnet34``."""
    layers: list[nn.Module] = [
        nn.Conv2d(3, width, 7, 2, 3, bias=False),
        nn.BatchNorm2d(width),
        nn.ReLU(inplace=True),
        nn.MaxPool2d(3, 2, 1),
    ]
    in_planes = width
    for stage, blocks in enumerate((3, 4, 6, 3)):
        planes, stride = width * 2**stage, 1 if stage == 0 else 2
        for index in range(blocks):
            downsample = None
            if index == 0 and (stride != 1 or in_planes != planes):
                downsample = nn.Sequential(
                    conv1x1(in_planes, planes, stride), nn.BatchNorm2d(planes)
                )
            block_stride = stride if index == 0 else 1
            layers.append(BasicBlock(in_planes, planes, block_stride, downsample))
            in_planes = planes
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(in_planes, num_classes)]
    return nn.Sequential(*layers)


def deep_mlp(width: int, depth: int, num_classes: int = 10, batchnorm: bool = False):
    """``depth`` blocks of ``Linear(width, width)`` (then ``BatchNorm1d`` with ``batchnorm``)
    and GELU, and a linear head: 2 (depth + 1) parameter tensors, 4 depth + 2 with BatchNorm."""
    layers: list[nn.Module] = []
    for _ in range(depth):
        layers.append(nn.Linear(width, width))
        layers += [nn.BatchNorm1d(width)] if batchnorm else []
        layers.append(nn.GELU())
    return nn.Sequential(*layers, nn.Linear(width, num_classes))


@dataclass(frozen=True)
class ModelSpec:
    label: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, ...]
    batch_size: int


def model_specs(tiny: bool) -> list[ModelSpec]:
    """ResNet-34 and a deep MLP with 442 tensors (about 4x as many), both with BatchNorm (the
    engine snapshots its statistics each step); ``tiny``: narrow widths and small inputs, the
    same tensors."""
    if tiny:
        return [
            ModelSpec("ResNet-34 (width 4)", lambda: resnet34(4), (3, 16, 16), 4),
            ModelSpec("MLP+BN 110x8", lambda: deep_mlp(8, 110, batchnorm=True), (8,), 4),
        ]
    return [
        ModelSpec("ResNet-34", resnet34, (3, 32, 32), 8),
        ModelSpec("MLP+BN 110x256", lambda: deep_mlp(256, 110, batchnorm=True), (256,), 8),
    ]


# ----------------------------------------------------------------------------------- cases
@dataclass(frozen=True)
class Case:
    """One row: Lookbehind settings; an outer step is k ``step()`` calls in switching and
    lookahead mode, one call otherwise; ``micro_batches`` closures per call for m-SAM."""

    name: str
    settings: dict
    micro_batches: int = 1

    @property
    def k(self) -> int:
        return self.settings.get("k", 1)

    @property
    def calls(self) -> int:
        return calls_per_outer_step(LookbehindSettings(**self.settings))


def calls_per_outer_step(settings: LookbehindSettings) -> int:
    """``step()`` calls of one outer step: k in switching and lookahead mode, else 1."""
    return settings.k if settings.cycles else 1


def _case(name: str, method: str, micro_batches: int = 1, **settings) -> Case:
    """A row; rho is that of every perturbing row, alpha the static one unless given (or
    adaptive)."""
    if settings.get("perturbation") != "none":
        settings["rho"] = RHO
    if method in ("lookbehind", "lookahead") and not settings.get("adaptive_alpha"):
        settings.setdefault("alpha", STATIC_ALPHA)
    return Case(name, {"method": method, **settings}, micro_batches)


def benchmark_cases(ks: Sequence[int] = (2, 5)) -> list[Case]:
    """Every method and mode: SAM, ASAM and m-SAM; Lookbehind same-batch, switching and m-SAM
    with static and adaptive alpha; ASAM, clipping and global-scope variants at the first k;
    multistep, multistep_avg and lookahead (SAM, no perturbation; ASAM at the first k)."""
    m_sam = {"ascent_sync": "per_micro_batch", "micro_batches": MICRO_BATCHES}
    cases = [
        _case("sam", "sam"),
        _case("asam", "sam", perturbation="asam"),
        _case("sam m-SAM", "sam", **m_sam),
    ]
    for k in ks:
        lookbehind = f"lookbehind k={k}"
        for alpha, suffix in (
            (dict(alpha=STATIC_ALPHA), ""),
            (dict(adaptive_alpha=True), " adaptive"),
        ):
            cases += [
                _case(f"{lookbehind}{suffix}", "lookbehind", k=k, **alpha),
                _case(f"{lookbehind} switching{suffix}", "lookbehind", k=k, **alpha,
                      minibatch_switching=True),
                _case(f"{lookbehind} m-SAM{suffix}", "lookbehind", k=k, **alpha, **m_sam),
            ]  # fmt: skip
        cases += [
            _case(f"{lookbehind} asam", "lookbehind", k=k, perturbation="asam"),
            _case(f"multistep k={k}", "multistep", k=k),
            _case(f"multistep_avg k={k}", "multistep_avg", k=k),
            _case(f"lookahead k={k} sam", "lookahead", k=k),
            _case(f"lookahead k={k} none", "lookahead", k=k, perturbation="none"),
        ]
        if k == ks[0]:
            cases += [
                _case(f"{lookbehind} adaptive global", "lookbehind", k=k, adaptive_alpha=True,
                      adaptive_alpha_scope="global"),
                _case(f"{lookbehind} asam adaptive", "lookbehind", k=k, adaptive_alpha=True,
                      perturbation="asam"),
                _case(f"{lookbehind} switching asam", "lookbehind", k=k, perturbation="asam",
                      minibatch_switching=True),
                _case(f"{lookbehind} clipped", "lookbehind", k=k, max_grad_norm=1.0),
                _case(f"lookahead k={k} asam", "lookahead", k=k, perturbation="asam"),
            ]  # fmt: skip
    return cases


# ------------------------------------------------------------------------------ measuring
@dataclass
class Count:
    """What one outer step of one case dispatched on one model."""

    ops: int
    passes: int
    per_tensor: int
    collectives: int
    launches: int | None = None
    syncs: int | None = None
    op_counts: dict[str, int] = field(default_factory=dict)
    sources: dict[str, int] = field(default_factory=dict)
    per_tensor_calls: dict[str, int] = field(default_factory=dict)


def sgd(params) -> torch.optim.Optimizer:
    """The base optimizer of every row: SGD with momentum and weight decay, multi-tensor."""
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True)


def count_outer_step(
    step: Callable[[], object], counter: OpCounter, *, warmup: int, cuda: bool
) -> Count:
    """Run ``step`` (one outer step, its closures wrapped by ``counter.excluding``) ``warmup``
    times, then once counted and, on CUDA, once more under ``torch.profiler``."""
    for _ in range(warmup):
        step()
    passes = counter.passes
    with counter:
        step()
    count = Count(
        counter.ops,
        counter.passes - passes,
        counter.per_tensor,
        counter.collectives,
        op_counts=dict(sorted(counter.counts.items())),
        sources=dict(counter.sources.most_common()),
        per_tensor_calls=dict(counter.per_tensor_calls.most_common()),
    )
    if cuda:
        torch.cuda.synchronize()
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as profiler:
            step()
        count.launches, count.syncs = count_cuda_calls(profiler)
    return count


@dataclass
class Workload:
    """A model on the device and its fixed batch; every row trains the same model (its values
    do not change what a step dispatches)."""

    model: nn.Module
    inputs: torch.Tensor
    labels: torch.Tensor

    @classmethod
    def build(cls, spec: ModelSpec, device: torch.device) -> Workload:
        torch.manual_seed(0)
        model = spec.build().to(device).train()
        generator = torch.Generator().manual_seed(1)
        inputs = torch.randn(spec.batch_size, *spec.input_shape, generator=generator)
        labels = torch.randint(0, 10, (spec.batch_size,), generator=generator)
        return cls(model, inputs.to(device), labels.to(device))

    def closures(self, parts: int) -> list[BatchClosure]:
        """One closure per micro-batch (every ``parts``-th example)."""
        return [
            BatchClosure(self.model, (self.inputs[i::parts], self.labels[i::parts]), None)
            for i in range(parts)
        ]


def count_case(case: Case, workload: Workload, warmup: int) -> Count:
    """One steady-state outer step of ``case`` on ``workload``, counted."""
    model = workload.model
    engine = Lookbehind(sgd(model.parameters()), model=model, **case.settings)
    counter = OpCounter()
    closures = [counter.excluding(c) for c in workload.closures(case.micro_batches)]
    micro_batches = engine.settings.micro_batch_ascent

    def outer_step() -> None:
        for _ in range(case.calls):
            if micro_batches:
                engine.step_micro_batches(closures)
            else:
                engine.step(closures[0])

    cuda = workload.inputs.device.type == "cuda"
    return count_outer_step(outer_step, counter, warmup=warmup, cuda=cuda)


@dataclass
class Row:
    case: str
    k: int
    passes: int
    counts: dict[str, Count]
    difference: int
    budget: int | None
    within_targets: bool


def benchmark(
    cases: Sequence[Case], specs: Sequence[ModelSpec], device: torch.device, warmup: int
) -> list[Row]:
    workloads = {spec.label: Workload.build(spec, device) for spec in specs}
    rows = []
    for case in cases:
        counts = {label: count_case(case, w, warmup) for label, w in workloads.items()}
        ops = [count.ops for count in counts.values()]
        difference = max(ops) - min(ops)
        budget = BUDGETS.get(case.name)
        within = difference <= MAX_MODEL_DIFFERENCE and (budget is None or max(ops) <= budget)
        passes = next(iter(counts.values())).passes
        rows.append(Row(case.name, case.k, passes, counts, difference, budget, within))
    return rows


def tensor_count(spec: ModelSpec) -> int:
    return len(list(spec.build().parameters()))


def format_rows(rows: Sequence[Row], specs: Sequence[ModelSpec], tensors: Sequence[int]) -> str:
    cuda = any(count.launches is not None for row in rows for count in row.counts.values())
    header = ["case", "passes"]
    for spec, n in zip(specs, tensors):
        header += [f"{spec.label} ({n} tensors): ops", "per-tensor"]
        header += ["launches", "syncs"] if cuda else []
    header += ["difference", "budget", "targets"]
    lines = []
    for row in rows:
        cells = [row.case, str(row.passes)]
        for spec in specs:
            count = row.counts[spec.label]
            cells += [str(count.ops), str(count.per_tensor)]
            cells += [str(count.launches), str(count.syncs)] if cuda else []
        budget = "-" if row.budget is None else str(row.budget)
        cells += [str(row.difference), budget, "met" if row.within_targets else "MISSED"]
        lines.append(cells)
    return format_columns(header, lines)


def by_file(sources: dict[str, int]) -> str:
    """``optimizer.py 46, batchnorm.py 36, ...``: operations per source file."""
    files: Counter[str] = Counter()
    for source, n in sources.items():
        files[source.split(":")[0]] += n
    return ", ".join(f"{name} {n}" for name, n in files.most_common())


def format_notes(rows: Sequence[Row]) -> str:
    """Where the operations of the rows that miss a target come from, and which calls CUDA
    runs one kernel per tensor (with the tensors of the first model that has them)."""
    lines = []
    for row in rows:
        if not row.within_targets:
            for label, count in row.counts.items():
                lines.append(f"{row.case}, {label}: {count.ops} ops = {by_file(count.sources)}")
    calls: dict[str, str] = {}
    for row in rows:
        for label, count in row.counts.items():
            for call, tensors in count.per_tensor_calls.items():
                calls.setdefault(call, f"{tensors} tensors per outer step of {row.case} ({label})")
    if calls:
        lines.append(
            "foreach calls with a list of 0-d tensors (per-tensor weights, or one weight "
            "repeated) or of mixed shapes: torch has no overload taking one 0-d device tensor for "
            "the list (as _foreach_mul_.Tensor does) or one per tensor, so CUDA runs these one "
            "kernel per tensor:"
        )
        lines += [f"  {call}: e.g. {example}" for call, example in calls.items()]
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    names = [case.name for case in benchmark_cases()]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    parser.add_argument("--tiny", action="store_true", help="narrow widths, the same tensors")
    parser.add_argument(
        "--cases", type=comma_separated(names), default=names, help="a comma-separated subset"
    )
    parser.add_argument(
        "--warmup", type=integer_at_least(1), default=1, help="outer steps before the count"
    )
    parser.add_argument("--threads", type=integer_at_least(1), default=None)
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    args.device = device_argument(parser, args.device)
    return args


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device.type == "cuda":
        torch.cuda.set_device(args.device)
    specs = model_specs(args.tiny)
    tensors = [tensor_count(spec) for spec in specs]
    cases = [case for case in benchmark_cases() if case.name in args.cases]
    print(
        f"device: {device_name(args.device)} | torch {torch.__version__} | base optimizer: SGD "
        "(momentum 0.9, weight decay 5e-4, foreach=True)\n"
        "ATen ops per outer step (switching and lookahead: a cycle of k calls), views and the "
        f"closures' passes excluded, after {args.warmup} warm-up outer step(s); m-SAM: "
        f"{MICRO_BATCHES} micro-batches\n"
        "per-tensor: tensors of foreach calls with lists of unequal shapes (CUDA: one kernel "
        "per tensor)\n"
        + (
            "launches/syncs: CUDA kernel, memcpy and memset launches and host synchronisations "
            "outside the closures (torch.profiler)"
            if args.device.type == "cuda"
            else "CUDA kernel launches: not counted (no CUDA device in this run)"
        )
        + f"\ntargets: the models differ by <= {MAX_MODEL_DIFFERENCE} ops; budgets: "
        + ", ".join(f"{name} <= {ops}" for name, ops in BUDGETS.items()),
        flush=True,
    )
    began = time.perf_counter()
    rows = benchmark(cases, specs, args.device, args.warmup)
    print(format_rows(rows, specs, tensors))
    missed = [row.case for row in rows if not row.within_targets]
    print(f"targets missed: {', '.join(missed)}" if missed else "every row meets its targets")
    print(format_notes(rows))
    print(f"wall time: {time.perf_counter() - began:.0f} s")
    if args.json is not None:
        report = {
            "device": device_name(args.device),
            "torch": torch.__version__,
            "tiny": args.tiny,
            "models": [{"label": s.label, "tensors": n} for s, n in zip(specs, tensors)],
            "max_model_difference": MAX_MODEL_DIFFERENCE,
            "budgets": BUDGETS,
            "rows": [asdict(row) for row in rows],
        }
        args.json.write_text(json.dumps(report, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
