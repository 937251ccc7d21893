"""``LookbehindTrainer`` under FSDP2 on the CPU, run as a script in two gloo processes with the
repository's FSDP2 accelerate config (``accelerate launch --config_file
examples/accelerate_configs/fsdp2.yaml --num_processes 2 fsdp2_trainer_harness.py OUT``). One
run takes FSDP2 from that config alone, the others from the Trainer's ``--fsdp`` flags.

accelerate turns every CPU launch into DDP (``DistributedType.MULTI_CPU``) and drops the FSDP
plugin (accelerate/state.py only honours it for GPU-like devices), so
``--fsdp full_shard --use_cpu`` silently trains with DDP. :func:`shard_on_cpu` promotes that
state to ``DistributedType.FSDP`` with the Trainer's own FSDP2 plugin; from there on everything
is accelerate's and the Trainer's real FSDP2 code (``fully_shard``, the optimizer's switch to
the sharded parameters, sharded checkpoints, the full-model save). Each run records that the
model it trained was sharded (``is_fsdp_enabled``, DTensor parameters).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import accelerate.state
import torch
from accelerate.utils import DistributedType
from torch.distributed.tensor import DTensor

from helpers.trainer_harness import (
    InOrderTrainer,
    ToyDataset,
    make_args,
    make_model,
    make_pretrained_model,
)
from hf_lookbehind_recipes.processes import end_process_group

FSDP2_FLAGS = {"fsdp": "full_shard", "fsdp_config": {"version": 2}}
# The Trainer refuses an optimizer passed in under FSDP: it builds SGD with momentum 0.9 itself,
# the optimizer of ``helpers.trainer_harness.make_trainer``.
SGD_MOMENTUM = {"optim": "sgd", "optim_args": "momentum=0.9"}

# name: Trainer flags (the first run without --fsdp flags: FSDP2 from the accelerate config)
RUNS = {
    "same_batch_accumulation_clipped": dict(
        fsdp_flags=False,
        lookbehind_k=2, gradient_accumulation_steps=2, per_device_train_batch_size=4,
        max_grad_norm=0.3,
    ),
    "switching_adaptive_asam": dict(
        lookbehind_k=2, minibatch_switching=True, lookbehind_adaptive_alpha=True,
        perturbation="asam", asam_weights_only=False, per_device_train_batch_size=8,
        max_steps=7, save_strategy="steps", save_steps=5,
    ),
}  # fmt: skip


def shard_on_cpu() -> None:
    """Let accelerate set up FSDP on a CPU launch (see the module docstring)."""
    original = accelerate.state.AcceleratorState.__init__

    def init(self, *args, fsdp_plugin=None, **kwargs):
        original(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
        if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            # What accelerate's branch for GPUs does with the plugin.
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            # Every later AcceleratorState() copies PartialState's shared state over its own.
            for shared in (self._shared_state, accelerate.state.PartialState._shared_state):
                shared["distributed_type"] = DistributedType.FSDP

    accelerate.state.AcceleratorState.__init__ = init


def fsdp2_trainer(output_dir: Path, fsdp_flags: bool = True, **flags) -> InOrderTrainer:
    args = make_args(output_dir, **SGD_MOMENTUM, **(FSDP2_FLAGS if fsdp_flags else {}), **flags)
    return InOrderTrainer(model=make_model(), args=args, train_dataset=ToyDataset())


def sharding_facts(trainer) -> dict:
    params = list(trainer.model.parameters())
    return {
        "is_fsdp_enabled": trainer.is_fsdp_enabled,
        "fsdp_version": trainer.accelerator.state.fsdp_plugin.fsdp_version,
        "all_sharded_dtensors": all(
            isinstance(p, DTensor) and all(pl.is_shard() for pl in p.placements) for p in params
        ),
    }


def full_weights(model) -> dict:
    return {name: p.full_tensor().tolist() for name, p in model.named_parameters()}


def bf16_run(output_dir: Path) -> dict:
    """bf16 mixed precision under FSDP2: accelerate keeps float32 shards and all-gathers them
    in bf16 for the passes (``MixedPrecisionPolicy(param_dtype=bfloat16)``)."""
    accelerate.state.AcceleratorState._reset_state()  # a new mixed precision setting
    dataset = ToyDataset()
    dataset.x = dataset.x.float()
    args = make_args(
        output_dir, **SGD_MOMENTUM, **FSDP2_FLAGS, bf16=True, per_device_train_batch_size=8,
        lookbehind_k=3, lookbehind_adaptive_alpha=True,
    )  # fmt: skip
    trainer = InOrderTrainer(model=make_model().float(), args=args, train_dataset=dataset)
    trainer.train()
    policy = trainer.accelerator.state.fsdp_plugin.mixed_precision_policy
    return {
        **sharding_facts(trainer),
        "param_dtype": str(policy.param_dtype),
        "weights": full_weights(trainer.model),
        "logged": [e for e in trainer.state.log_history if "loss" in e],
    }


def pretrained_run(output_dir: Path) -> dict:
    """A transformers model trained under FSDP2 and saved by the Trainer (``from_pretrained``
    loads it in the test)."""
    args = make_args(output_dir, **SGD_MOMENTUM, **FSDP2_FLAGS, per_device_train_batch_size=8)
    trainer = InOrderTrainer(model=make_pretrained_model(), args=args, train_dataset=ToyDataset())
    trainer.train()
    trainer.save_model(str(output_dir / "saved"))
    return sharding_facts(trainer)


def main() -> None:
    output_dir = Path(sys.argv[1])
    torch.set_num_threads(1)
    shard_on_cpu()
    rank = int(os.environ["RANK"])
    results = {}
    for name, flags in RUNS.items():
        trainer = fsdp2_trainer(output_dir / name, **flags)
        trainer.train()
        logged = [e for e in trainer.state.log_history if "loss" in e]
        results[name] = {
            **sharding_facts(trainer),
            "weights": full_weights(trainer.model),
            "logged": logged,
        }
    name = "switching_adaptive_asam"
    checkpoint = output_dir / name / "checkpoint-5"
    resumed = fsdp2_trainer(output_dir / "resumed", **RUNS[name])
    resumed.train(resume_from_checkpoint=str(checkpoint))
    results["resumed"] = {**sharding_facts(resumed), "weights": full_weights(resumed.model)}
    results["pretrained"] = pretrained_run(output_dir / "pretrained")
    results["bf16"] = bf16_run(output_dir / "bf16")
    (output_dir / f"trainer_rank{rank}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main()
    end_process_group()
