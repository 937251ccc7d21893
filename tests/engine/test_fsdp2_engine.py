"""The engine under FSDP2 (``fully_shard``, parameters as ``DTensor`` shards) in two gloo
processes against the same engine unsharded in one process on the whole batch, float64: every
method and mode to 1e-10, buffers sharded like the parameters, and a mid-cycle checkpoint of the
sharded state resumed bit-identically. The processes run once
(``tests/helpers/fsdp2_harness.py``)."""

from __future__ import annotations

import json

import pytest
from helpers import HELPERS
from helpers.fsdp2_harness import SETUPS
from helpers.two_processes import run_two_processes

HARNESS = HELPERS / "fsdp2_harness.py"

# Persistent buffers, in parameter copies (multistep_avg: the gradient sum covers only the
# parameters that receive a gradient, checked separately).
BUFFER_COPIES = {
    "lookbehind_sam": 2,
    "lookbehind_adaptive_per_tensor": 3,
    "lookbehind_adaptive_global_asam": 3,
    "switching_asam_weights_only_adamw": 2,
    "switching_adaptive_global": 3,
    "sam": 1,
    "asam_weights_only": 1,
    "clipped": 2,
    "lookahead_sam": 2,
    "switching_fisher": 2,
}


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    output_dir = tmp_path_factory.mktemp("fsdp2_engine")
    run_two_processes(HARNESS, [str(output_dir)], "torchrun")
    return [json.loads((output_dir / f"engine_rank{r}.json").read_text()) for r in (0, 1)]


@pytest.mark.slow
@pytest.mark.parametrize("setup", SETUPS)
def test_sharded_engine_equals_the_unsharded_engine(ranks, setup):
    for result in ranks:
        facts = result[setup]
        assert facts["all_sharded_dtensors"]
        assert facts["gap"] < 1e-10
        assert facts["moved"] > 1e-3


@pytest.mark.slow
@pytest.mark.parametrize("setup", SETUPS)
def test_no_step_gathers_a_parameter(ranks, setup):
    """Outside the closures (where FSDP2 gathers for the passes) the engine issues only
    all-reduces of vectors with one partial sum per tensor (norms, dot products)."""
    for result in ranks:
        facts = result[setup]
        assert facts["engine_collectives"] == ["all_reduce"]
        assert 0 < facts["largest_engine_collective"] <= facts["parameter_tensors"]


@pytest.mark.slow
@pytest.mark.parametrize("setup", BUFFER_COPIES)
def test_buffers_are_sharded_like_the_parameters(ranks, setup):
    """Each rank holds its shard of every buffer: (1, 2 or 3)/world of the parameters."""
    local = [result[setup]["local_param_numel"] for result in ranks]
    assert sum(local) == ranks[0][setup]["full_param_numel"]
    assert all(0 < n < ranks[0][setup]["full_param_numel"] for n in local)
    for result, n in zip(ranks, local):
        assert result[setup]["local_buffer_numel"] == BUFFER_COPIES[setup] * n


@pytest.mark.slow
def test_sharded_checkpoint_resumes_bit_identically_mid_cycle(ranks):
    for result in ranks:
        resumed = result["resume_mid_cycle"]
        assert resumed["all_sharded_dtensors"]
        assert resumed["saved_position"] == resumed["resumed_position"] == 1
        assert set(resumed["saved_buffers"]) == {
            "lookbehind_fast",
            "lookbehind_perturbed",
            "lookbehind_first_fast",
        }
        assert resumed["identical"]
