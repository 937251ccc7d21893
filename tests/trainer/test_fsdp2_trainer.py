"""``LookbehindTrainer`` under FSDP2 in two gloo processes
(``tests/helpers/fsdp2_trainer_harness.py``, run once) against the Trainer without sharding in
one process on the global batch, float64: same-batch mode with gradient accumulation and
clipping, switching mode with adaptive alpha and ASAM, a mid-cycle checkpoint resumed
bit-identically, the saved full model of slow weights, bf16 mixed precision, and the sharding
setups that are refused when the arguments are built.

Every run asserts that the Trainer really sharded (``is_fsdp_enabled``, FSDP2, every parameter
a sharded DTensor): with ``--use_cpu`` alone, accelerate would train with DDP (see the harness).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from helpers import HELPERS, ROOT
from helpers.trainer_harness import (
    TinyPreTrainedClassifier,
    make_args,
    make_pretrained_model,
    make_trainer,
)
from helpers.two_processes import run_two_processes
from safetensors.torch import load_file

HARNESS = HELPERS / "fsdp2_trainer_harness.py"
FSDP2_CONFIG = ROOT / "examples" / "accelerate_configs" / "fsdp2.yaml"

# The same training without sharding, in one process on the global batch of 16 (the FSDP2 runs:
# 2 processes x 8, or 2 x 4 x 2 accumulation steps).
UNSHARDED = {
    "same_batch_accumulation_clipped": dict(lookbehind_k=2, max_grad_norm=0.3),
    "switching_adaptive_asam": dict(
        lookbehind_k=2, minibatch_switching=True, lookbehind_adaptive_alpha=True,
        perturbation="asam", asam_weights_only=False, max_steps=7,
    ),
}  # fmt: skip


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[Path, list[dict]]:
    output_dir = tmp_path_factory.mktemp("fsdp2_trainer")
    run_two_processes(
        HARNESS,
        [str(output_dir)],
        "accelerate",
        config=FSDP2_CONFIG,
    )
    ranks = [json.loads((output_dir / f"trainer_rank{r}.json").read_text()) for r in (0, 1)]
    return output_dir, ranks


def as_tensors(weights: dict) -> dict[str, torch.Tensor]:
    return {name: torch.tensor(value, dtype=torch.float64) for name, value in weights.items()}


def largest_gap(weights: dict[str, torch.Tensor], model: torch.nn.Module) -> float:
    return max(
        (weights[n] - p.detach().double()).abs().max().item() for n, p in model.named_parameters()
    )


def assert_sharded(facts: dict) -> None:
    assert facts["is_fsdp_enabled"] and facts["fsdp_version"] == 2
    assert facts["all_sharded_dtensors"]


@pytest.mark.slow
@pytest.mark.parametrize("run", UNSHARDED)
def test_fsdp2_trainer_reproduces_the_unsharded_trainer(tmp_path, launched, run):
    _, ranks = launched
    for result in ranks:
        assert_sharded(result[run])
    assert ranks[0][run]["weights"] == ranks[1][run]["weights"]  # one gathered model
    unsharded = make_trainer(tmp_path, **UNSHARDED[run])
    unsharded.train()
    weights = as_tensors(ranks[0][run]["weights"])
    assert largest_gap(weights, unsharded.model) < 1e-10
    assert largest_gap(weights, make_trainer(tmp_path / "init").model) > 1e-3
    logged = ranks[0][run]["logged"]
    assert len(logged) == UNSHARDED[run].get("max_steps", 6)
    expected = [e for e in unsharded.state.log_history if "loss" in e]
    for entry, reference in zip(logged, expected, strict=True):
        for key in ("loss", "grad_norm", "ascent_grad_norm", "skipped_steps"):
            assert entry[key] == pytest.approx(reference[key], rel=1e-6), key


@pytest.mark.slow
def test_fsdp2_checkpoint_resumes_bit_identically_mid_cycle(tmp_path, launched):
    """Saved after 5 switching steps at k = 2 (mid-cycle); every process saved its shard of
    the optimizer state with the buffers; resuming gives the uninterrupted weights bit for
    bit, and the checkpoint's model file is the full model of slow weights after 5 steps."""
    output_dir, ranks = launched
    run = "switching_adaptive_asam"
    resumed = ranks[0]["resumed"]
    assert_sharded(resumed)
    assert resumed["weights"] == ranks[0][run]["weights"]
    checkpoint = output_dir / run / "checkpoint-5"
    assert {f"lookbehind_optimizer_rank{r}.pt" for r in (0, 1)} <= set(os.listdir(checkpoint))
    five_steps = make_trainer(tmp_path, **{**UNSHARDED[run], "max_steps": 5})
    five_steps.train()
    assert five_steps.lookbehind.cycle_position == 1
    saved = load_file(checkpoint / "model.safetensors")
    for name, p in five_steps.model.named_parameters():
        assert saved[name].shape == p.shape
        assert (saved[name] - p.detach()).abs().max().item() < 1e-10


@pytest.mark.slow
def test_fsdp2_saved_transformers_model_loads_with_from_pretrained(tmp_path, launched):
    """The Trainer's save under FSDP2 is a full transformers model of slow weights:
    ``from_pretrained`` loads the weights of the unsharded Trainer's run."""
    output_dir, ranks = launched
    assert_sharded(ranks[0]["pretrained"])
    loaded = TinyPreTrainedClassifier.from_pretrained(
        output_dir / "pretrained" / "saved", dtype=torch.float64
    )
    unsharded = make_trainer(tmp_path, model=make_pretrained_model())
    unsharded.train()
    saved = {name: p.detach() for name, p in loaded.named_parameters()}
    assert largest_gap(saved, unsharded.model) < 1e-10
    assert largest_gap(saved, make_pretrained_model()) > 1e-3


@pytest.mark.slow
def test_fsdp2_bf16_mixed_precision_trains(launched):
    _, ranks = launched
    result = ranks[0]["bf16"]
    assert_sharded(result)
    assert result["param_dtype"] == "torch.bfloat16"
    weights = as_tensors(result["weights"])
    assert all(torch.isfinite(w).all() for w in weights.values())
    assert len(result["logged"]) == 6
    assert all(e["skipped_steps"] == 0 and 0 < e["lookbehind_alpha"] <= 1 for e in result["logged"])


@pytest.fixture
def restored_environment():
    """``TrainingArguments`` with FSDP sets process environment variables; keep them out of the
    other tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(fsdp="full_shard", fsdp_config={"version": 1}), "FSDP2 only"),
        (dict(deepspeed="ds_config.json"), "FSDP2 only"),
        (
            dict(fsdp="full_shard", fsdp_config={"version": 2}, ascent_sync="per_device"),
            "--ascent_sync per_device needs DDP",
        ),
        (dict(fsdp="full_shard", fsdp_config={"version": 2}, fp16=True), "use --bf16"),
    ],
)
def test_unsupported_sharding_is_refused_when_the_arguments_are_built(
    tmp_path, restored_environment, overrides, message
):
    with pytest.raises(ValueError, match=message):
        make_args(tmp_path, **overrides)


def test_fsdp2_arguments_are_accepted(tmp_path, restored_environment):
    args = make_args(tmp_path, fsdp="full_shard", fsdp_config={"version": 2})
    assert args.fsdp_plugin_args["fsdp_version"] == 2


def test_the_fsdp2_accelerate_config_loads():
    from accelerate.commands.config.config_args import ClusterConfig

    config = ClusterConfig.from_yaml_file(FSDP2_CONFIG)
    assert str(config.distributed_type).endswith("FSDP")
    assert config.fsdp_config["fsdp_version"] == 2
