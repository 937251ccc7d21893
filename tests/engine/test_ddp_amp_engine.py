"""Distributed and mixed precision in the engine, without the Trainer: a plain DDP loop with
per-device ascent or m-SAM in two processes against m-SAM on the whole batch in one, and a
plain AMP loop with a ``GradScaler`` against the same loop without one."""

from __future__ import annotations

import json
import math

import pytest
import torch
from helpers import HELPERS
from helpers.ddp_engine_harness import BATCH, batches, closure_for, make_model
from helpers.two_processes import run_two_processes

from hf_lookbehind import Lookbehind

HARNESS = HELPERS / "ddp_engine_harness.py"


def one_process_m_sam(parts: int) -> list[torch.Tensor]:
    """m-SAM on the whole batch in one process, ``parts`` micro-batches: each perturbed with
    its own gradient, the descent with the sum of their shares (what both two-process modes
    compute)."""
    model = make_model()
    engine = Lookbehind(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9),
        k=2,
        rho=0.1,
        ascent_sync="per_micro_batch",
    )
    size = BATCH // parts
    for x, y in batches():
        engine.step_micro_batches(
            [
                closure_for(
                    model, x[i * size : (i + 1) * size], y[i * size : (i + 1) * size], 1 / parts
                )
                for i in range(parts)
            ]
        )
    return [p.detach().flatten() for p in model.parameters()]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    output_dir = tmp_path_factory.mktemp("ddp_engine")
    run_two_processes(HARNESS, [str(output_dir)], "torchrun")
    return [json.loads((output_dir / f"ddp_rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("mode,parts", [("per_device", 2), ("m_sam", 4)])
def test_plain_ddp_loop_equals_m_sam_on_the_whole_batch(ranks, mode, parts):
    expected = one_process_m_sam(parts)
    for result in ranks:
        got = [torch.tensor(values, dtype=torch.float64) for values in result[mode]]
        assert max((a - b).abs().max().item() for a, b in zip(got, expected)) < 1e-10
    assert ranks[0][mode] == ranks[1][mode]  # the processes stay bit-identical
    plain = [p.detach().flatten() for p in make_model().parameters()]
    assert max((a - b).abs().max().item() for a, b in zip(expected, plain)) > 1e-3


def amp_loop(scaler: torch.amp.GradScaler | None, bad_step: int | None = None):
    """Same-batch Lookbehind in a plain loop; with a scaler the closure scales the loss and the
    engine unscales every pass. ``bad_step``: that step's loss is infinite."""
    model = make_model()
    engine = Lookbehind(
        torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=2, rho=0.1, grad_scaler=scaler
    )
    weights = []
    for step, (x, y) in enumerate(batches()):

        def closure(x=x, y=y, step=step):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            if step == bad_step:
                loss = loss * math.inf
            (scaler.scale(loss) if scaler is not None else loss).backward()
            return loss

        engine.step(closure)
        weights.append([p.detach().clone() for p in model.parameters()])
    return weights, engine


def test_plain_amp_loop_with_a_grad_scaler_equals_the_loop_without():
    """A power-of-two scale is exact: unscaled by the engine in every pass, the run is the
    unscaled one bit for bit; the scale grows back by its own rule, untouched by the engine."""
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=2)
    scaled, _ = amp_loop(scaler)
    plain, _ = amp_loop(None)
    for ours, theirs in zip(scaled[-1], plain[-1], strict=True):
        assert torch.equal(ours, theirs)
    assert scaler.get_scale() > 2.0**10  # grew: every pass updated it, none overflowed


def test_an_overflow_in_a_plain_amp_loop_skips_the_step_and_backs_off():
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=1000)
    weights, engine = amp_loop(scaler, bad_step=1)
    for before, after in zip(weights[0], weights[1], strict=True):
        assert torch.equal(before, after)  # the slow weights stay where step 0 left them
    assert engine.stats().skipped_steps == 1
    assert scaler.get_scale() < 2.0**10
    assert all(torch.isfinite(p).all() for p in weights[-1])
