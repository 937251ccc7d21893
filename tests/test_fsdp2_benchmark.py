"""``scripts/benchmark_fsdp2.py`` at a tiny size in two gloo processes: every persistent term
per process under FSDP2 is half of the unsharded one (the layers split evenly), and the
Lookbehind buffers are 1, 2 or 3 parameter copies."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from two_processes import run_two_processes

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "benchmark_fsdp2.py"
BUFFER_COPIES = {
    "sam": 1,
    "lookbehind k=2": 2,
    "lookbehind k=2 adaptive": 3,
    "lookbehind k=5": 2,
    "lookbehind switching k=2": 2,
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
