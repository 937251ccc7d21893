"""m-SAM through the Trainer (``--ascent_sync per_micro_batch``): the gradient-accumulation
micro-batches carry the micro-batches, against the engine in a plain loop, one process against
two, and the flag's validation."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import HELPERS
from helpers.models import max_param_difference
from helpers.trainer_harness import ToyDataset, make_args, make_model, make_trainer
from helpers.two_processes import run_two_processes

from hf_lookbehind import Lookbehind

HARNESS = HELPERS / "trainer_harness.py"
MODES = {
    "sam": dict(lookbehind_method="sam", lookbehind_k=None),
    "lookbehind": dict(lookbehind_k=2, lookbehind_alpha=0.8),
    "lookbehind_adaptive_asam": dict(
        lookbehind_k=3, lookbehind_adaptive_alpha=True, perturbation="asam", asam_weights_only=False
    ),
}
MICRO, PARTS, STEPS = 4, 4, 6  # batch 16 = 4 micro-batches of m = 4


def plain_micro_batch_loop(**engine_kwargs) -> torch.nn.Module:
    """m-SAM with the engine alone: consecutive batches of 16, each split into 4 closures whose
    losses are their share (1/4) of the batch mean."""
    model, dataset = make_model(), ToyDataset()
    engine = Lookbehind(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **engine_kwargs)
    batch = MICRO * PARTS
    for step in range(STEPS):
        start = (step % (len(dataset) // batch)) * batch
        closures = []
        for part in range(PARTS):
            lo = start + part * MICRO
            x, y = dataset.x[lo : lo + MICRO], dataset.y[lo : lo + MICRO]

            def closure(x=x, y=y):
                loss = model(x, labels=y)["loss"] / PARTS
                loss.backward()
                return loss

            closures.append(closure)
        engine.step_micro_batches(closures)
    return model


def micro_batch_flags(mode: str, **extra) -> dict:
    flags = dict(
        ascent_sync="per_micro_batch",
        per_device_train_batch_size=MICRO,
        gradient_accumulation_steps=PARTS,
        **MODES[mode],
    )
    return {**flags, **extra}


@pytest.mark.parametrize("mode", MODES)
def test_accumulation_micro_batches_are_the_m_sam_micro_batches(tmp_path, mode):
    trainer = make_trainer(tmp_path, **micro_batch_flags(mode))
    trainer.train()
    expected = plain_micro_batch_loop(
        **make_args("unused", **micro_batch_flags(mode)).lookbehind_kwargs()
    )
    assert max_param_difference(trainer.model, expected) < 1e-10
    global_ascent = make_trainer(
        tmp_path / "global", **{**micro_batch_flags(mode), "ascent_sync": "global"}
    )
    global_ascent.train()
    assert max_param_difference(trainer.model, global_ascent.model) > 1e-6  # m-SAM is not SAM
    passes = STEPS * (trainer.lookbehind.settings.k + 1)
    assert trainer.lookbehind.stats().gradient_computations == passes


@pytest.mark.parametrize("mode", ["sam", "lookbehind"])
def test_one_micro_batch_per_step_is_todays_trainer(tmp_path, mode):
    per_micro = make_trainer(tmp_path / "m", ascent_sync="per_micro_batch", **MODES[mode])
    per_micro.train()
    today = make_trainer(tmp_path / "t", **MODES[mode])
    today.train()
    assert max_param_difference(per_micro.model, today.model) == 0.0


@pytest.mark.slow
def test_two_processes_equal_one_with_the_same_micro_batches(tmp_path):
    """2 processes x 2 accumulation micro-batches of 4 hold the same four micro-batches per step
    as one process with 4 of them: m-SAM gives the same weights."""
    flags = micro_batch_flags("lookbehind", gradient_accumulation_steps=2)
    run_two_processes(HARNESS, [str(tmp_path / "two"), json.dumps(flags)], "torchrun")
    ranks = [json.loads((tmp_path / "two" / f"weights_rank{r}.json").read_text()) for r in (0, 1)]
    assert ranks[0] == ranks[1]
    one = make_trainer(tmp_path / "one", **micro_batch_flags("lookbehind"))
    one.train()
    gap = max(
        (torch.tensor(ranks[0][name], dtype=torch.float64) - p.detach()).abs().max().item()
        for name, p in one.model.named_parameters()
    )
    assert gap < 1e-10


@pytest.mark.parametrize(
    "flags",
    [
        dict(lookbehind_method="multistep"),
        dict(lookbehind_method="lookahead"),
        dict(minibatch_switching=True),
    ],
)
def test_per_micro_batch_needs_sam_or_same_batch_lookbehind(tmp_path, flags):
    with pytest.raises(ValueError, match="per_micro_batch"):
        make_args(tmp_path, ascent_sync="per_micro_batch", **flags)
