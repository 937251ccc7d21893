"""Every Python example of the README runs as shown, on a tiny model and dataset that stand in
for the names it leaves to the reader (``model``, ``train``, ``loader``, ...)."""

from __future__ import annotations

import re

import pytest
import torch
from helpers import ROOT
from torch import nn

README = ROOT / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)


class Classifier(nn.Module):
    """Returns ``{"loss", "logits"}`` for the Trainer and plain logits otherwise."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Tanh(), nn.Linear(8, 3))

    def forward(self, x, labels=None):
        logits = self.net(x)
        if labels is None:
            return logits
        return {"loss": nn.functional.cross_entropy(logits, labels), "logits": logits}


class Pairs(torch.utils.data.Dataset):
    def __init__(self, size: int = 32) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(size, 4, generator=generator)
        self.y = torch.randint(0, 3, (size,), generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index):
        return {"x": self.x[index], "labels": self.y[index]}


def test_the_readme_has_both_quickstarts():
    blocks = python_blocks()
    assert any("LookbehindTrainer(" in block for block in blocks)
    assert any("Lookbehind(base" in block for block in blocks)


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_example_runs(index, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # output_dir="runs/..." lands in the temporary directory
    torch.manual_seed(0)
    model = Classifier()
    data = Pairs()
    loader = torch.utils.data.DataLoader(
        [(item["x"], item["labels"]) for item in data], batch_size=8
    )
    namespace = {
        "model": model,
        "train": data,
        "test": Pairs(16),
        "loader": loader,
        "criterion": nn.CrossEntropyLoss(),
    }
    before = [p.detach().clone() for p in model.parameters()]
    block = python_blocks()[index]
    if "LookbehindTrainingArguments(" in block:  # a few steps on the CPU, no reports
        block = block.replace("rho=0.05,", "rho=0.05, max_steps=2, use_cpu=True, report_to=[],")
    exec(compile(block, f"README.md python block {index}", "exec"), namespace)
    if ".step(" in block or ".train(" in block:
        moved = max((p - q).abs().max().item() for p, q in zip(model.parameters(), before))
        assert moved > 0  # the example trained the model
