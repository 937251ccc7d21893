"""``--decay_all_parameters``: the optimizer's weight decay reaches every parameter (the paper's
public code, plain SGD decay), while by default the Trainer exempts biases and norms; the CIFAR
recipe defaults to the paper's choice."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from hf_lookbehind import LookbehindTrainer, LookbehindTrainingArguments
from hf_lookbehind_recipes.cifar import argument_parser

WEIGHT_DECAY = 5e-4


class NormsAndBiases(nn.Module):
    """A BatchNorm named as in the CIFAR ResNets (``bn1``), one named ``norm``, a LayerNorm
    and biases."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Linear(4, 6)
        self.bn1 = nn.BatchNorm1d(6)
        self.norm = nn.BatchNorm1d(6)
        self.ln = nn.LayerNorm(6)
        self.head = nn.Linear(6, 2)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.head(self.ln(self.norm(self.bn1(self.conv(x)))))
        return {"logits": logits, "loss": nn.functional.cross_entropy(logits, labels)}


ALL_NAMES = {
    "conv.weight", "conv.bias", "bn1.weight", "bn1.bias", "norm.weight", "norm.bias",
    "ln.weight", "ln.bias", "head.weight", "head.bias",
}  # fmt: skip
# transformers' rule: no decay for names containing "bias" or a "norm" component, nor for
# LayerNorm modules; a BatchNorm named bn1 keeps decay on its weight.
TRAINER_DECAYED = {"conv.weight", "bn1.weight", "head.weight"}


def decayed_parameter_names(tmp_path: Path, method: str, decay_all: bool) -> set[str]:
    model = NormsAndBiases()
    args = LookbehindTrainingArguments(
        output_dir=str(tmp_path),
        optim="sgd",
        learning_rate=0.1,
        weight_decay=WEIGHT_DECAY,
        lookbehind_method=method,
        decay_all_parameters=decay_all,
        use_cpu=True,
        report_to="none",
    )
    trainer = LookbehindTrainer(model=model, args=args)
    optimizer = trainer.create_optimizer()
    names = {id(p): name for name, p in model.named_parameters()}
    decayed, seen = set(), set()
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen.add(names[id(p)])
            if group["weight_decay"] == WEIGHT_DECAY:
                decayed.add(names[id(p)])
            else:
                assert group["weight_decay"] == 0.0
    assert seen == ALL_NAMES
    return decayed


@pytest.mark.parametrize("method", ["none", "sam", "lookbehind"])
def test_decay_all_parameters_reaches_batchnorm_and_biases(tmp_path, method):
    assert decayed_parameter_names(tmp_path, method, decay_all=True) == ALL_NAMES


@pytest.mark.parametrize("method", ["none", "lookbehind"])
def test_default_keeps_the_trainer_exemptions(tmp_path, method):
    assert decayed_parameter_names(tmp_path, method, decay_all=False) == TRAINER_DECAYED


def test_cifar_recipe_decays_every_parameter_by_default(tmp_path):
    parser = argument_parser()
    common = ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none"]
    *_, paper = parser.parse_args_into_dataclasses(args=common)
    *_, trainer_rule = parser.parse_args_into_dataclasses(
        args=[*common, "--decay_all_parameters", "false"]
    )
    assert paper.decay_all_parameters and not trainer_rule.decay_all_parameters


def test_cifar_recipe_does_not_clip_by_default(tmp_path):
    """The paper's public code never clips; the Trainer's default would clip at 1.0."""
    parser = argument_parser()
    common = ["--output_dir", str(tmp_path), "--use_cpu", "--report_to", "none"]
    *_, paper = parser.parse_args_into_dataclasses(args=common)
    assert paper.max_grad_norm == 0.0
    assert paper.lookbehind_kwargs()["max_grad_norm"] is None
    assert LookbehindTrainingArguments(output_dir=str(tmp_path)).max_grad_norm == 1.0
