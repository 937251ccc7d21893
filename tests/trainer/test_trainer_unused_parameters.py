"""Through the Trainer, a parameter without a gradient in a step is left alone by that step, as
``torch.optim`` leaves it: an auxiliary head used in the first cycle only stays where that cycle
left it, in every method and mode (gradient sums of Multistep+avg and m-SAM included)."""

from __future__ import annotations

import pytest
import torch
from helpers.trainer_harness import CLASSES, ToyDataset, make_trainer
from torch import nn
from transformers import TrainerCallback

MODES = {
    "same_batch": {},
    "switching": dict(minibatch_switching=True),
    "multistep_avg": dict(lookbehind_method="multistep_avg"),
    "sam": dict(lookbehind_method="sam", lookbehind_k=None),
    "m_sam": dict(
        lookbehind_method="sam",
        lookbehind_k=None,
        ascent_sync="per_micro_batch",
        per_device_train_batch_size=8,
        gradient_accumulation_steps=2,
    ),
    "lookbehind_m_sam": dict(
        ascent_sync="per_micro_batch", per_device_train_batch_size=8, gradient_accumulation_steps=2
    ),
}


class HeadedClassifier(nn.Module):
    """A classifier whose auxiliary head adds to the logits while ``use_aux`` is set."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Linear(6, 8)
        self.head = nn.Linear(8, CLASSES)
        self.aux = nn.Linear(8, CLASSES)
        self.use_aux = True
        self.double()

    def forward(self, x, labels=None):
        h = torch.tanh(self.body(x))
        logits = self.head(h) + (self.aux(h) if self.use_aux else 0)
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class DropAuxiliaryHead(TrainerCallback):
    """After ``step`` Trainer steps (one whole cycle), the model stops using its auxiliary
    head; the head's values at that point are kept for the test."""

    def __init__(self, step: int) -> None:
        self.step, self.held = step, None

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step == self.step:
            model.use_aux = False
            self.held = [p.detach().clone() for p in model.aux.parameters()]


@pytest.mark.parametrize("mode", MODES)
def test_an_auxiliary_head_without_gradient_stays_put(tmp_path, mode):
    model = HeadedClassifier()
    initial = model.aux.weight.detach().clone()
    trainer = make_trainer(tmp_path, model=model, dataset=ToyDataset(), **MODES[mode])
    dropped = DropAuxiliaryHead(step=2)
    trainer.add_callback(dropped)
    trainer.train()
    assert not torch.equal(dropped.held[0], initial)  # the head trained in the first cycle
    for current, held in zip(model.aux.parameters(), dropped.held, strict=True):
        assert torch.equal(current.detach(), held)
    assert all(torch.isfinite(p).all() for p in model.parameters())
