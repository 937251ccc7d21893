"""The passes of one Lookbehind step inside a Trainer: what only the first pass of a batch
records, and the forwards of frozen models, which run once per batch.

The Trainer layer runs the trainer's own ``training_step`` once per forward/backward pass
(k + 1 times per step in same-batch mode, twice in minibatch-switching mode). Trainers such as
TRL's record metrics as a side effect of ``compute_loss`` (``self._metrics``, the token count
``self._total_train_tokens``). Every pass but the first of a batch gives those records back, so
that the logs hold one pass per example, at the weights the step began with (the slow weights in
same-batch mode), as the trainer logs them without Lookbehind.

A model the trainer calls besides the trained one (a reference or a teacher model: a module
none of whose parameters the optimizer updates) gives the same output in every pass of a batch
when it gets the same inputs: the first pass runs it, the other passes replay its outputs. A
call with other inputs than the first pass's, or whose output carries a graph, runs as usual.
"""

from __future__ import annotations

import contextlib
import copy
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..engine import Closure


@dataclass
class _Call:
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    output: Any


def same_arguments(a: Any, b: Any) -> bool:
    """Whether two call arguments are equal: tensors by shape, dtype and value, containers
    element by element, anything else by ``==``."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
            return False
        if a is b:
            return True
        return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same_arguments(a[key], b[key]) for key in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(same_arguments(x, y) for x, y in zip(a, b))
    try:
        return bool(a == b)
    except (RuntimeError, TypeError, ValueError):
        return False


def carries_graph(output: Any) -> bool:
    """Whether any tensor in ``output`` requires grad (its graph is freed by the first pass's
    backward, so it cannot be replayed)."""
    if isinstance(output, torch.Tensor):
        return output.requires_grad
    if isinstance(output, dict):
        return any(carries_graph(value) for value in output.values())
    if isinstance(output, (list, tuple)):
        return any(carries_graph(value) for value in output)
    return False


class _Tape:
    """The frozen models' calls in the first pass over one batch, replayed in order by the
    later passes over it."""

    def __init__(self) -> None:
        self.calls: defaultdict[int, list[_Call | None]] = defaultdict(list)
        self.position: defaultdict[int, int] = defaultdict(int)
        self.recording = True

    def start_pass(self, first: bool) -> None:
        self.recording = first
        self.position.clear()

    def call(self, module: nn.Module, forward: Callable[..., Any], args, kwargs) -> Any:
        key = id(module)
        if self.recording:
            output = forward(*args, **kwargs)
            kept = None if carries_graph(output) else _Call(args, kwargs, output)
            self.calls[key].append(kept)
            return output
        index = self.position[key]
        self.position[key] += 1
        recorded = self.calls[key]
        if index < len(recorded):
            call = recorded[index]
            if (
                call is not None
                and same_arguments(call.args, args)
                and same_arguments(call.kwargs, kwargs)
            ):
                return call.output
        return forward(*args, **kwargs)


class FrozenForwards:
    """While installed, the forwards of ``modules`` go through the tape of the running pass
    (outside a pass, they run as usual)."""

    def __init__(self, modules: Sequence[nn.Module]) -> None:
        self.modules = list(modules)
        self.tape: _Tape | None = None

    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """Wrap every module's ``forward`` (an attribute of the instance, as accelerate's
        mixed-precision wrapper is) and put the previous one back on exit."""
        previous = []
        for module in self.modules:
            previous.append((module, module.__dict__.get("forward")))
            module.forward = self._through_tape(module, module.forward)
        try:
            yield
        finally:
            for module, forward in previous:
                if forward is None:
                    del module.forward
                else:
                    module.forward = forward

    def _through_tape(self, module: nn.Module, forward: Callable[..., Any]) -> Callable[..., Any]:
        def taped(*args: Any, **kwargs: Any) -> Any:
            if self.tape is None:
                return forward(*args, **kwargs)
            return self.tape.call(module, forward, args, kwargs)

        return taped


def frozen_modules(owner: object, optimizer: torch.optim.Optimizer) -> list[nn.Module]:
    """The modules among ``owner``'s attributes that have parameters, none of them updated by
    ``optimizer`` (a reference or teacher model; not the trained model, nor a wrapper of it)."""
    trained = {id(p) for group in optimizer.param_groups for p in group["params"]}
    found, seen = [], set()
    for value in vars(owner).values():
        if not isinstance(value, nn.Module) or id(value) in seen:
            continue
        seen.add(id(value))
        params = list(value.parameters())
        if params and not any(id(p) in trained for p in params):
            found.append(value)
    return found


@contextlib.contextmanager
def records_given_back(owner: object, names: Sequence[str]) -> Iterator[None]:
    """Put ``owner``'s attributes ``names`` (those it has) back as they were on entry."""
    saved = {name: copy.deepcopy(getattr(owner, name)) for name in names if hasattr(owner, name)}
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(owner, name, value)


class StepPasses:
    """The closures of one step: each runs a batch (one micro-batch, or the whole accumulation
    window) once per pass; the first pass over it records and runs the frozen models, the later
    ones give the records of ``record_names`` back and replay the frozen models."""

    def __init__(self, owner: object, record_names: Sequence[str], frozen: FrozenForwards):
        self.owner = owner
        self.record_names = tuple(record_names)
        self.frozen = frozen
        self.passes: list[tuple[Sequence[Any], int]] = []

    def closure(self, run: Closure, micro_batches: Sequence[Any]) -> Closure:
        """A closure running ``run`` over ``micro_batches``, counted in :meth:`extra_passes`."""
        tape = _Tape()
        entry = len(self.passes)
        self.passes.append((micro_batches, 0))

        def closure() -> torch.Tensor:
            batch, count = self.passes[entry]
            self.passes[entry] = (batch, count + 1)
            tape.start_pass(first=count == 0)
            given_back = (
                records_given_back(self.owner, self.record_names)
                if count
                else contextlib.nullcontext()
            )
            self.frozen.tape = tape
            try:
                with given_back:
                    return run()
            finally:
                self.frozen.tape = None

        return closure

    def extra_passes(self) -> list[tuple[Sequence[Any], int]]:
        """Each batch with the number of passes over it beyond the first."""
        return [(batch, count - 1) for batch, count in self.passes if count > 1]


# TRL's trainers that take reference log-probabilities in the batch (what their
# ``precompute_ref_log_probs`` does before training): the batch keys of what their
# ``compute_ref_log_probs`` returns.
REFERENCE_KEYS = {
    "DPOTrainer": ("ref_chosen_logps", "ref_rejected_logps"),
    "KTOTrainer": ("ref_logps", "ref_KL_logps"),
}


def reference_keys(trainer: object) -> tuple[str, ...] | None:
    """The keys of :data:`REFERENCE_KEYS` for a trainer built on one of those TRL trainers that
    computes the reference log-probabilities during training; None for any other."""
    if getattr(trainer, "precompute_ref_logps", True):
        return None
    for cls in type(trainer).__mro__:
        if cls.__module__.startswith("trl.") and cls.__name__ in REFERENCE_KEYS:
            return REFERENCE_KEYS[cls.__name__]
    return None


class ReferenceInBatch:
    """The reference log-probabilities of a TRL preference trainer (DPO, KTO), computed once
    per micro-batch before the passes with the trainer's own ``compute_ref_log_probs`` and
    handed to every pass in the batch, as its ``precompute_ref_log_probs`` hands them. This
    covers the reference that is the trained model with its adapters switched off (PEFT),
    which no replay of a frozen model could see."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self.keys = reference_keys(trainer)

    def added_to(self, micro_batch: dict[str, Any]) -> dict[str, Any]:
        if self.keys is None:
            return micro_batch
        trainer = self.trainer
        model = trainer.model if trainer.ref_model is None else trainer.ref_model
        values = trainer.compute_ref_log_probs(model, micro_batch)
        return {
            **micro_batch,
            **{key: value for key, value in zip(self.keys, values) if value is not None},
        }

    @contextlib.contextmanager
    def taken_from_batch(self) -> Iterator[None]:
        """While the step runs, the trainer reads the reference log-probabilities from the
        batch."""
        if self.keys is None:
            yield
            return
        self.trainer.precompute_ref_logps = True
        try:
            yield
        finally:
            self.trainer.precompute_ref_logps = False
