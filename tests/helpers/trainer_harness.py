"""A tiny float64 regression problem, a Trainer on it with a fixed data order, and the same
training written as a plain loop around the core engine: the independent expectation of the
Trainer-layer tests. Also run as a script by the two-process tests (torchrun)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from torch.utils.data import Dataset, SequentialSampler
from transformers import PretrainedConfig, PreTrainedModel

from hf_lookbehind import Lookbehind, LookbehindTrainer, LookbehindTrainingArguments
from hf_lookbehind_recipes.processes import end_process_group

FEATURES, CLASSES, SAMPLES = 6, 3, 64


class TinyClassifier(nn.Module):
    """Returns ``{"loss", "logits"}`` like a transformers model; optional BatchNorm."""

    def __init__(self, batchnorm: bool = False) -> None:
        super().__init__()
        self.fc1 = nn.Linear(FEATURES, 8)
        self.norm = nn.BatchNorm1d(8) if batchnorm else nn.Identity()
        self.fc2 = nn.Linear(8, CLASSES)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.fc2(torch.tanh(self.norm(self.fc1(x))))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


class TinyConfig(PretrainedConfig):
    model_type = "hf_lookbehind_tiny_classifier"

    def __init__(self, hidden_size: int = 8, **kwargs) -> None:
        super().__init__(**kwargs)
        self.hidden_size = hidden_size


class TinyPreTrainedClassifier(PreTrainedModel):
    """``TinyClassifier`` (without BatchNorm) as a transformers model: ``save_pretrained`` /
    ``from_pretrained`` round trips."""

    config_class = TinyConfig

    def __init__(self, config: TinyConfig) -> None:
        super().__init__(config)
        self.fc1 = nn.Linear(FEATURES, config.hidden_size)
        self.fc2 = nn.Linear(config.hidden_size, CLASSES)
        self.post_init()

    def get_input_embeddings(self) -> None:
        """No token embeddings (accelerate's FSDP2 preparation asks for them)."""
        return None

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None):
        logits = self.fc2(torch.tanh(self.fc1(x)))
        out = {"logits": logits}
        if labels is not None:
            out["loss"] = nn.functional.cross_entropy(logits, labels)
        return out


def make_pretrained_model() -> TinyPreTrainedClassifier:
    torch.manual_seed(0)
    return TinyPreTrainedClassifier(TinyConfig()).double()


class ToyDataset(Dataset):
    def __init__(self, n: int = SAMPLES, seed: int = 3) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.x = torch.randn(n, FEATURES, generator=generator, dtype=torch.float64)
        self.y = torch.randint(0, CLASSES, (n,), generator=generator)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[index], "labels": self.y[index]}


class InOrderTrainer(LookbehindTrainer):
    """The same data order in every run and process count: sequential, no shuffling."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


def make_model(batchnorm: bool = False) -> TinyClassifier:
    torch.manual_seed(0)
    return TinyClassifier(batchnorm).double()


def make_args(output_dir, **overrides) -> LookbehindTrainingArguments:
    settings = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=16,
        learning_rate=0.1,
        lr_scheduler_type="constant",
        max_steps=6,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=True,
        seed=0,
        max_grad_norm=0.0,
        dataloader_drop_last=True,
        disable_tqdm=True,
    )
    if overrides.get("lookbehind_method") != "none":  # the base optimizer alone reads no k
        settings.update(lookbehind_k=2)
        if overrides.get("perturbation") != "none":  # nor does Lookahead without an ascent
            settings.update(rho=0.1)
    settings.update(overrides)
    return LookbehindTrainingArguments(**settings)


def make_trainer(
    output_dir, model=None, dataset=None, trainer_class=InOrderTrainer, **overrides
) -> InOrderTrainer:
    model = model or make_model()
    args = make_args(output_dir, **overrides)
    optimizer = torch.optim.SGD(model.parameters(), lr=args.learning_rate, momentum=0.9)
    return trainer_class(
        model=model,
        args=args,
        train_dataset=dataset or ToyDataset(),
        optimizers=(optimizer, None),
    )


# Trainer flags of the Lookbehind methods and modes the Trainer tests run.
MODES = {
    "same_batch": dict(lookbehind_k=2),
    "same_batch_adaptive_k3": dict(lookbehind_k=3, lookbehind_adaptive_alpha=True),
    "switching": dict(lookbehind_k=2, minibatch_switching=True),
    "switching_adaptive_asam": dict(
        lookbehind_k=3,
        minibatch_switching=True,
        lookbehind_adaptive_alpha=True,
        perturbation="asam",
        asam_weights_only=False,
    ),
    "lookahead_sam": dict(lookbehind_method="lookahead", lookbehind_k=3),
    "sam": dict(lookbehind_method="sam", lookbehind_k=None),
    "multistep_avg": dict(lookbehind_method="multistep_avg", lookbehind_k=2),
    "clipped": dict(lookbehind_k=2, max_grad_norm=0.3),
}


def engine_kwargs(overrides: dict) -> dict:
    """The ``Lookbehind`` settings the Trainer builds from these flags."""
    return make_args("unused", **overrides).lookbehind_kwargs()


def sequential_closures(model: nn.Module, batch_size: int, steps: int, first_step: int = 0):
    """One closure per step over the sequential batches of ``ToyDataset`` (the Trainer's data
    order here), wrapping around at the end of each epoch; from step ``first_step`` on (a run
    resumed after that many steps)."""
    dataset = ToyDataset()
    batches_per_epoch = len(dataset) // batch_size
    for step in range(first_step, first_step + steps):
        start = (step % batches_per_epoch) * batch_size
        x, y = dataset.x[start : start + batch_size], dataset.y[start : start + batch_size]

        def closure(x=x, y=y):
            loss = model(x, labels=y)["loss"]
            loss.backward()
            return loss

        yield closure


def plain_loop(model: nn.Module, batch_size: int, steps: int, **engine_kwargs) -> nn.Module:
    """The same training without the Trainer: the engine in a loop over sequential batches."""
    engine = Lookbehind(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), **engine_kwargs)
    for closure in sequential_closures(model, batch_size, steps):
        engine.step(closure)
    return model


def model_and_sgd_from_checkpoint(
    checkpoint: Path, batchnorm: bool = False, momentum: bool = True
) -> tuple[nn.Module, torch.optim.SGD]:
    """A checkpoint's model and an SGD as ``make_trainer`` builds it; with ``momentum``, holding
    the momentum buffers of the base optimizer's entries of ``optimizer.pt`` (whatever else
    those entries hold)."""
    model = make_model(batchnorm)
    model.load_state_dict(load_file(checkpoint / "model.safetensors"))
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if momentum:
        saved = torch.load(checkpoint / "optimizer.pt", weights_only=True)
        for index, p in enumerate(model.parameters()):
            sgd.state[p]["momentum_buffer"] = saved["state"][index]["momentum_buffer"].clone()
    return model, sgd


def main() -> None:
    """Two-process entry point: ``torchrun --nproc_per_node 2 trainer_harness.py OUT JSON``."""
    output_dir, overrides = sys.argv[1], json.loads(sys.argv[2])
    trainer = make_trainer(output_dir, **{"use_cpu": True, **overrides})
    trainer.train()
    rank = int(os.environ.get("RANK", "0"))
    weights = {name: p.detach().tolist() for name, p in trainer.model.named_parameters()}
    Path(output_dir, f"weights_rank{rank}.json").write_text(json.dumps(weights))


if __name__ == "__main__":
    main()
    end_process_group()
