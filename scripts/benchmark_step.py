"""Time one outer step of the Lookbehind engine against its floor and the 2k-pass reference.

For each model the script measures one forward+backward pass ``U`` and one base-optimizer
update ``O``, then one outer step of each method on the same minibatch:

* ``sam``: floor ``2U + O``;
* ``lookbehind`` (static alpha 0.5) and ``lookbehind_adaptive`` (eq. 7-8), same-batch mode:
  ``k + 1`` passes and ``k`` updates, floor ``(k + 1)U + kO``;
* ``lookbehind_switching`` (Sec. 6.2): ``k`` calls of 2 passes each, floor ``2kU + kO``;
* ``reference``: :class:`reference_lookbehind.ReferenceLookbehind`, the literal 2k-pass
  transcription of the public code (static alpha); the static-alpha lookbehind rows print
  the engine's speed-up over it, measured in the same run;
* ``trainer``: the same static-alpha Lookbehind step through ``LookbehindTrainer`` (the
  Trainer's loop: data fetch, training step, scheduler, callbacks); its "floor" is the
  engine's ``lookbehind`` step in a plain loop at the same k, timed one step each in turn
  with the Trainer's steps, so ``/floor`` is the Trainer layer's overhead ratio. Needs
  ``lookbehind`` among the methods.

Every row gets its own model copy and optimizer and runs its ``--warmup`` runs alone (the
first allocates the engine's buffers); then the timed runs go in ``--repeats`` rounds of one
run per row, so that a load that changes over time on a shared machine weighs on all rows
alike, and each time is the median over the rounds. One fixed batch, fixed seeds; on CUDA
every run is bracketed by CUDA events and a synchronize.

Columns: ``buffers`` is the persistent extra memory of the engine in parameter copies (the
``Lookbehind.buffer_footprint()``); ``peak MiB`` is the peak
memory a row adds, during its warm-up, over the memory in use before it builds its model copy
(so it holds the model copy, gradients, optimizer state, buffers and activations): on CUDA
from ``torch.cuda.max_memory_allocated``; on CPU from the process's peak resident set size
(``VmHWM`` in ``/proc/self/status``, reset per row through ``/proc/self/clear_refs``, after
``malloc_trim`` hands freed heap pages back), which is coarse (pages the allocator keeps are
not seen; on small models activations dominate it); "-" where neither is available.

    python scripts/benchmark_step.py                       # small models on CPU, ~1 min
    python scripts/benchmark_step.py --device cuda --full  # ResNet-34 b128, ViT-B/16 b64
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import timm
import torch
from reference_lookbehind import ReferenceLookbehind
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torch.utils.data import Dataset
from transformers import PrinterCallback, TrainerCallback

from hf_lookbehind import Lookbehind
from hf_lookbehind_recipes.cifar_models import resnet20, resnet34

MODELS = ("resnet", "vit")
METHODS = (
    "sam",
    "lookbehind",
    "lookbehind_adaptive",
    "lookbehind_switching",
    "reference",
    "trainer",
)
DEFAULT_METHODS = ("sam", "lookbehind", "lookbehind_adaptive", "reference", "trainer")
RHO = 0.05
STATIC_ALPHA = 0.5
# The GPU targets of the step time, printed next to the measured ratios (never asserted).
TARGET_FLOOR_RATIO = 1.05
TARGET_SPEEDUP_K2 = 1.9


@dataclass(frozen=True)
class ModelSpec:
    """What to benchmark for one model: how to build it, its batch, and its base optimizer."""

    label: str
    build: Callable[[], nn.Module]
    input_shape: tuple[int, int, int]
    num_classes: int
    batch_size: int
    make_optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    autocast_dtype: torch.dtype | None


@dataclass
class Row:
    """One line of the table; ``passes`` counts the forward/backward passes of one run."""

    model: str
    method: str
    k: int | None
    ms: float
    passes: int = 0
    floor_ms: float | None = None
    ratio_to_floor: float | None = None
    speedup_vs_reference: float | None = None
    buffers: float | None = None
    peak_mib: float | None = None
    target: str = ""


def tiny_vit(num_classes: int = 10) -> nn.Module:
    """A narrow ViT on 32x32 inputs (patch 4, width 96, depth 4) for CPU runs."""
    return VisionTransformer(
        img_size=32, patch_size=4, num_classes=num_classes, embed_dim=96, depth=4, num_heads=3
    )


def sgd(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.SGD(params, lr=0.01, momentum=0.9, weight_decay=5e-4)


def adamw(params: list[nn.Parameter]) -> torch.optim.Optimizer:
    return torch.optim.AdamW(params, lr=1e-4, weight_decay=0.05)


def model_spec(name: str, *, full: bool, batch_size: int | None) -> ModelSpec:
    if name == "resnet" and full:
        spec = ModelSpec("ResNet-34 (CIFAR stem)", resnet34, (3, 32, 32), 10, 128, sgd, None)
    elif name == "resnet":
        spec = ModelSpec("ResNet-20 (CIFAR)", resnet20, (3, 32, 32), 10, 32, sgd, None)
    elif full:
        spec = ModelSpec(
            "ViT-B/16",
            lambda: timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=10),
            (3, 224, 224),
            10,
            64,
            adamw,
            torch.bfloat16,
        )
    else:
        spec = ModelSpec("ViT tiny (32px, p4, d96x4)", tiny_vit, (3, 32, 32), 10, 32, adamw, None)
    if batch_size is not None:
        spec = replace(spec, batch_size=batch_size)
    return spec


_LIBC = ctypes.CDLL(None) if sys.platform == "linux" else None


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise KeyError(field)


def _resettable_rss() -> bool:
    if _LIBC is None:
        return False
    try:
        Path("/proc/self/clear_refs").write_text("5")
        _status_kib("VmHWM")
    except (OSError, KeyError):
        return False
    return True


class PeakMemory:
    """Peak memory added since :meth:`start`, in MiB, or ``None`` where it cannot be read."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.cpu_readable = device.type == "cpu" and _resettable_rss()
        self.baseline = 0

    def start(self) -> None:
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()
            self.baseline = torch.cuda.memory_allocated(self.device)
        elif self.cpu_readable:
            _LIBC.malloc_trim(0)  # hand freed heap pages back, so that reusing them counts
            self.baseline = _status_kib("VmRSS") * 1024
        self.reset_peak()

    def reset_peak(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        elif self.cpu_readable:
            Path("/proc/self/clear_refs").write_text("5")

    def peak_mib(self) -> float | None:
        if self.device.type == "cuda":
            return (torch.cuda.max_memory_allocated(self.device) - self.baseline) / 2**20
        if self.cpu_readable:
            return (_status_kib("VmHWM") * 1024 - self.baseline) / 2**20
        return None


def elapsed_ms(run: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call of ``run`` in milliseconds (CUDA events on a GPU)."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize(device)
        start.record()
        run()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end)
    began = time.perf_counter()
    run()
    return (time.perf_counter() - began) * 1e3


class BatchClosure:
    """The closure of every step: loss on the fixed batch (under autocast when a dtype is
    given) and its backward. ``calls`` counts the forward/backward passes it ran."""

    def __init__(self, model: nn.Module, batch, autocast_dtype: torch.dtype | None) -> None:
        self.model = model
        self.inputs, self.labels = batch
        self.autocast_dtype = autocast_dtype
        self.calls = 0

    def __call__(self) -> torch.Tensor:
        self.calls += 1
        with torch.autocast(
            self.inputs.device.type,
            dtype=self.autocast_dtype,
            enabled=self.autocast_dtype is not None,
        ):
            loss = nn.functional.cross_entropy(self.model(self.inputs), self.labels)
        loss.backward()
        return loss


@dataclass(frozen=True)
class Case:
    """One outer-step benchmark: a method of :data:`METHODS` at ``k`` inner steps."""

    method: str
    k: int

    def floor_ms(self, pass_ms: float, update_ms: float) -> float:
        """The cost of the passes and updates the method cannot avoid."""
        if self.method == "sam":
            return 2 * pass_ms + update_ms
        if self.method == "lookbehind_switching":
            return 2 * self.k * pass_ms + self.k * update_ms
        return (self.k + 1) * pass_ms + self.k * update_ms

    @property
    def target(self) -> str:
        if not self.method.startswith("lookbehind"):
            return ""
        target = f"ratio<={TARGET_FLOOR_RATIO}"
        if self.method == "lookbehind" and self.k == 2:
            target += f", speed-up>={TARGET_SPEEDUP_K2}"
        return target


def benchmark_cases(methods: Sequence[str], ks: Sequence[int]) -> list[Case]:
    """The engine-level cases; the ``trainer`` rows are timed apart (:func:`trainer_rows`)."""
    cases = [Case("sam", 1)] if "sam" in methods else []
    engine_methods = [method for method in methods if method not in ("sam", "trainer")]
    return cases + [Case(method, k) for k in ks for method in engine_methods]


def outer_step(
    case: Case, model: nn.Module, base: torch.optim.Optimizer, closure: BatchClosure
) -> tuple[Callable[[], None], Lookbehind | None]:
    """A callable running one outer step of ``case``, and the engine (None for the reference)."""
    if case.method == "reference":
        reference = ReferenceLookbehind(base, k=case.k, alpha=STATIC_ALPHA, rho=RHO)
        return lambda: reference.step([closure] * case.k), None
    if case.method == "sam":
        engine = Lookbehind(base, method="sam", rho=RHO, model=model)
    else:
        adaptive = case.method == "lookbehind_adaptive"
        engine = Lookbehind(
            base,
            k=case.k,
            alpha=None if adaptive else STATIC_ALPHA,
            adaptive_alpha=adaptive,
            rho=RHO,
            minibatch_switching=case.method == "lookbehind_switching",
            model=model,
        )
    calls = case.k if engine.settings.minibatch_switching else 1

    def run() -> None:
        for _ in range(calls):
            engine.step(closure)

    return run, engine


class _FixedBatch(Dataset):
    """The benchmark's one batch (already on the device) as a dataset of its rows."""

    def __init__(self, batch: tuple[torch.Tensor, torch.Tensor]) -> None:
        self.inputs, self.labels = batch

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"inputs": self.inputs[index], "labels": self.labels[index]}


class _LossModel(nn.Module):
    """The Trainer's view of the model: ``{"loss", "logits"}``; counts forward passes."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.calls = 0

    def forward(self, inputs: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        self.calls += 1
        logits = self.model(inputs)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class _InterleavedSteps(TrainerCallback):
    """Times Trainer steps and, between them, one engine step each, so that both see the
    same machine load: a Trainer step is the time from the end of the engine step before it
    to its own end (data fetch, training step, scheduler, callbacks); CUDA is synchronised."""

    def __init__(self, device: torch.device, engine_step: Callable[[], object]) -> None:
        self.device = device
        self.engine_step = engine_step
        self.trainer_ms: list[float] = []
        self.engine_ms: list[float] = []
        self.resumed: float | None = None

    def on_step_end(self, args, state, control, **kwargs):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        if self.resumed is not None:
            self.trainer_ms.append((time.perf_counter() - self.resumed) * 1e3)
        self.engine_ms.append(elapsed_ms(self.engine_step, self.device))
        self.resumed = time.perf_counter()


def trainer_row(
    spec: ModelSpec,
    template: nn.Module,
    batch: tuple[torch.Tensor, torch.Tensor],
    k: int,
    engine_step: Callable[[], object],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    memory: PeakMemory,
) -> Row:
    """One Lookbehind step (same-batch, static alpha) through ``LookbehindTrainer``, timed
    interleaved with ``engine_step``, the same step of the engine in a plain loop."""
    from hf_lookbehind import LookbehindTrainer, LookbehindTrainingArguments

    memory.start()
    model = _LossModel(copy.deepcopy(template).to(device))
    timer = _InterleavedSteps(device, engine_step)
    with tempfile.TemporaryDirectory() as output_dir:
        args = LookbehindTrainingArguments(
            output_dir=output_dir,
            per_device_train_batch_size=len(batch[1]),
            max_steps=warmup + repeats + 1,
            lookbehind_k=k,
            lookbehind_alpha=STATIC_ALPHA,
            rho=RHO,
            max_grad_norm=0.0,  # the engine row does not clip either
            lr_scheduler_type="constant",
            bf16=spec.autocast_dtype == torch.bfloat16,
            use_cpu=device.type == "cpu",
            dataloader_pin_memory=False,
            save_strategy="no",
            logging_strategy="no",
            report_to=[],
            disable_tqdm=True,
        )
        trainer = LookbehindTrainer(
            model=model,
            args=args,
            train_dataset=_FixedBatch(batch),
            optimizers=(spec.make_optimizer(list(model.parameters())), None),
            callbacks=[timer],
        )
        trainer.remove_callback(PrinterCallback)
        memory.reset_peak()
        trainer.train()
    trainer_ms = statistics.median(timer.trainer_ms[warmup:])
    engine_ms = statistics.median(timer.engine_ms[warmup + 1 :])
    return Row(
        spec.label,
        "trainer",
        k,
        trainer_ms,
        passes=model.calls // args.max_steps,
        floor_ms=engine_ms,
        ratio_to_floor=trainer_ms / engine_ms,
        buffers=trainer.lookbehind.buffer_footprint().parameter_copies,
        peak_mib=memory.peak_mib(),
        target=f"ratio<={TARGET_FLOOR_RATIO} vs engine",
    )


def benchmark_model(
    spec: ModelSpec,
    cases: Sequence[Case],
    *,
    device: torch.device,
    warmup: int,
    repeats: int,
    with_trainer: bool = False,
) -> list[Row]:
    """Rows U, O and one per case, timed as the module docstring describes."""
    torch.manual_seed(0)
    template = spec.build().train()
    generator = torch.Generator().manual_seed(1)
    inputs = torch.randn(spec.batch_size, *spec.input_shape, generator=generator).to(device)
    labels = torch.randint(0, spec.num_classes, (spec.batch_size,), generator=generator)
    batch = (inputs, labels.to(device))
    memory = PeakMemory(device)

    def fresh_setup():
        model = copy.deepcopy(template).to(device)
        base = spec.make_optimizer(list(model.parameters()))
        return model, base, BatchClosure(model, batch, spec.autocast_dtype)

    def warm_up(row: Row, run: Callable[[], object], closure: BatchClosure) -> None:
        """Warm-up runs alone: the row's peak memory and the passes of one run."""
        memory.reset_peak()
        calls_before = closure.calls
        for _ in range(warmup):
            run()
        row.passes = (closure.calls - calls_before) // warmup
        row.peak_mib = memory.peak_mib()

    memory.start()
    base_model, base_optimizer, base_closure = fresh_setup()

    def one_pass() -> None:
        base_model.zero_grad(set_to_none=True)
        base_closure()

    runs: list[Callable[[], object]] = [one_pass, base_optimizer.step]
    rows = [
        Row(spec.label, "U: forward+backward", None, math.nan),
        Row(spec.label, f"O: {type(base_optimizer).__name__} update", None, math.nan),
    ]
    warm_up(rows[0], one_pass, base_closure)
    warm_up(rows[1], base_optimizer.step, base_closure)
    engines: list[Lookbehind | None] = [None, None]
    for case in cases:
        memory.start()
        setup = fresh_setup()
        run, engine = outer_step(case, *setup)
        runs.append(run)
        engines.append(engine)
        rows.append(Row(spec.label, case.method, case.k, math.nan, target=case.target))
        warm_up(rows[-1], run, setup[2])

    times: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for run, row_times in zip(runs, times):
            row_times.append(elapsed_ms(run, device))
    for row, row_times, engine in zip(rows, times, engines):
        row.ms = statistics.median(row_times)
        if engine is not None:
            row.buffers = engine.buffer_footprint().parameter_copies

    pass_ms, update_ms = rows[0].ms, rows[1].ms
    reference_ms = {row.k: row.ms for row in rows if row.method == "reference"}
    for case, row in zip(cases, rows[2:]):
        row.floor_ms = case.floor_ms(pass_ms, update_ms)
        row.ratio_to_floor = row.ms / row.floor_ms
        if case.method == "lookbehind" and case.k in reference_ms:
            row.speedup_vs_reference = reference_ms[case.k] / row.ms
    if with_trainer:
        engine_runs = [
            (case.k, run) for case, run in zip(cases, runs[2:]) if case.method == "lookbehind"
        ]
        rows += [
            trainer_row(
                spec, template, batch, k, run, device=device, warmup=warmup, repeats=repeats,
                memory=memory,
            )
            for k, run in engine_runs
        ]  # fmt: skip
    return rows


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    capability = torch.backends.cpu.get_cpu_capability()
    return f"CPU {platform.machine()} ({capability}, {torch.get_num_threads()} threads)"


def memory_method(device: torch.device) -> str:
    if device.type == "cuda":
        return "torch.cuda.max_memory_allocated over the row, minus memory in use before it"
    if PeakMemory(device).cpu_readable:
        return "peak RSS (VmHWM, reset per row, heap trimmed first) minus RSS before the row"
    return "n/a (no resettable peak RSS on this system)"


def _cell(value: float | None, spec: str) -> str:
    return "-" if value is None or math.isnan(value) else format(value, spec)


def format_table(rows: Sequence[Row]) -> str:
    header = (
        "model",
        "method",
        "k",
        "passes",
        "ms/step",
        "floor ms",
        "/floor",
        "vs ref",
        "buffers",
        "peak MiB",
        "GPU target",
    )
    lines = [
        (
            row.model,
            row.method,
            "-" if row.k is None else str(row.k),
            str(row.passes),
            _cell(row.ms, ".2f"),
            _cell(row.floor_ms, ".2f"),
            _cell(row.ratio_to_floor, ".3f"),
            _cell(row.speedup_vs_reference, ".2f"),
            _cell(row.buffers, ".2f"),
            _cell(row.peak_mib, ".1f"),
            row.target,
        )
        for row in rows
    ]
    return format_columns(header, lines)


def format_columns(header: Sequence[str], lines: Sequence[Sequence[str]]) -> str:
    """A left-aligned text table: each column as wide as its widest cell."""
    widths = [max(len(cells[i]) for cells in [header, *lines]) for i in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(cells, widths)).rstrip()
        for cells in [header, *lines]
    )


def comma_separated(allowed: Sequence[str]) -> Callable[[str], list[str]]:
    def parse(text: str) -> list[str]:
        names = [name.strip() for name in text.split(",") if name.strip()]
        unknown = [name for name in names if name not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"got {text!r}; give a comma-separated list of: {', '.join(allowed)}"
            )
        return names

    return parse


def _positive_ints(text: str) -> list[int]:
    try:
        values = [int(item) for item in text.split(",")]
    except ValueError:
        values = []
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"got {text!r}; give comma-separated integers >= 1")
    return values


def integer_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            value = minimum - 1
        if value < minimum:
            raise argparse.ArgumentTypeError(f"got {text!r}; give an integer >= {minimum}")
        return value

    return parse


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", help="cpu (default) or cuda[:index]")
    parser.add_argument(
        "--full",
        action="store_true",
        help="ResNet-34 (CIFAR stem) at batch 128 fp32 and ViT-B/16 at batch 64 bf16 autocast",
    )
    parser.add_argument(
        "--models", type=comma_separated(MODELS), default=list(MODELS), help=", ".join(MODELS)
    )
    parser.add_argument(
        "--methods",
        type=comma_separated(METHODS),
        default=list(DEFAULT_METHODS),
        help=f"any of {', '.join(METHODS)} (default: {', '.join(DEFAULT_METHODS)})",
    )
    parser.add_argument("--ks", type=_positive_ints, default=[2, 5], help="k values, e.g. 2,5")
    parser.add_argument(
        "--warmup",
        type=integer_at_least(1),
        default=2,
        help="runs per row before the timed rounds (>= 1; they give the peak memory)",
    )
    parser.add_argument("--repeats", type=integer_at_least(1), default=7, help="timed rounds")
    parser.add_argument(
        "--threads", type=integer_at_least(1), default=None, help="torch.set_num_threads"
    )
    parser.add_argument(
        "--batch_size", type=integer_at_least(1), default=None, help="overrides the model's"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    args.device = device_argument(parser, args.device)
    if "trainer" in args.methods and "lookbehind" not in args.methods:
        parser.error("--methods trainer is compared with lookbehind: list lookbehind too")
    return args


def device_argument(parser: argparse.ArgumentParser, text: str) -> torch.device:
    """The ``--device`` value: cpu, or cuda[:index] where CUDA is available (else a parser
    error saying what is allowed)."""
    try:
        device = torch.device(text)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda"):
        parser.error(f"--device must be cpu or cuda[:index], got {text!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is available here; use --device cpu")
    return device


def main(argv: Sequence[str] | None = None) -> list[Row]:
    args = parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    cases = benchmark_cases(args.methods, args.ks)
    header = [
        f"device: {device_name(args.device)} | torch {torch.__version__} | timm {timm.__version__}",
        f"timing: median of {args.repeats} rounds (one run per row each) after {args.warmup} "
        "warm-up runs, same batch, fixed seeds",
        f"peak memory: {memory_method(args.device)}",
        "floor: SAM 2U+O; lookbehind (k+1)U+kO; switching 2kU+kO; reference rows use (k+1)U+kO;"
        " trainer: the engine's lookbehind step at the same k",
        "buffers: Lookbehind.buffer_footprint() in parameter copies; vs ref: reference ms / ms",
    ]
    print("\n".join(header), flush=True)
    began = time.perf_counter()
    rows = []
    for name in args.models:
        spec = model_spec(name, full=args.full, batch_size=args.batch_size)
        rows += benchmark_model(
            spec,
            cases,
            device=args.device,
            warmup=args.warmup,
            repeats=args.repeats,
            with_trainer="trainer" in args.methods,
        )
    print(format_table(rows))
    print(f"wall time of the benchmark: {time.perf_counter() - began:.0f} s")
    if args.json is not None:
        report = {
            "device": device_name(args.device),
            "torch": torch.__version__,
            "settings": {
                "full": args.full,
                "warmup": args.warmup,
                "repeats": args.repeats,
                "ks": args.ks,
                "memory": memory_method(args.device),
            },
            "rows": [asdict(row) for row in rows],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
