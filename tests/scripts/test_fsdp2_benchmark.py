"""``scripts/benchmark_fsdp2.py`` at a tiny size in two gloo processes: every persistent term
per process under FSDP2 is half of the unsharded one (the layers split evenly), the Lookbehind
buffers are 1, 2 or 3 parameter copies, and an outer step issues one small all-reduce per
global norm (one per pass and one for the perturbation distance) and three for adaptive alpha,
none unsharded."""

from __future__ import annotations

import json

import pytest
from helpers import ROOT
from helpers.two_processes import run_two_processes

SCRIPT = ROOT / "scripts" / "benchmark_fsdp2.py"
BUFFER_COPIES = {
    "sam": 1,
    "lookbehind k=2": 2,
    "lookbehind k=2 adaptive": 3,
    "lookbehind k=5": 2,
    "lookbehind switching k=2": 2,
}
# Forward/backward passes of one outer step (switching: a cycle of two calls of two passes).
PASSES = {
    "sam": 2,
    "lookbehind k=2": 3,
    "lookbehind k=2 adaptive": 3,
    "lookbehind k=5": 6,
    "lookbehind switching k=2": 4,
}


@pytest.mark.slow
def test_benchmark_reports_the_memory_fsdp2_saves(tmp_path):
    output = tmp_path / "benchmark.json"
    run_two_processes(
        SCRIPT,
        ["--width", "16", "--depth", "1", "--batch_size", "4", "--repeats", "1",
         "--warmup", "1", "--json", str(output)],
        "torchrun",
    )  # fmt: skip
    result = json.loads(output.read_text())
    assert result["world"] == 2
    for method, copies in BUFFER_COPIES.items():
        unsharded = result["memory_mib"][f"{method} unsharded"]
        sharded = result["memory_mib"][f"{method} fsdp2"]
        for term, mib in unsharded.items():
            assert sharded[term] == pytest.approx(mib / 2), (method, term)
        assert unsharded["lookbehind"] == pytest.approx(copies * unsharded["params"])
        assert result["ms"][method] > 0 and result["floor_ms"][method] > 0
        sharded = result["operations"][f"{method} fsdp2"]
        unsharded = result["operations"][f"{method} unsharded"]
        assert sharded["passes"] == unsharded["passes"] == PASSES[method]
        norms = PASSES[method] + 1  # the check of every pass, and the perturbation distance
        assert sharded["collectives"] == norms + (3 if "adaptive" in method else 0), method
        assert unsharded["collectives"] == 0 and sharded["ops"] > unsharded["ops"] > 0
