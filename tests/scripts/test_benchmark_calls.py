"""The engine's host work per parameter tensor stays within its budget: a count from one run of
``scripts/benchmark_calls.py``'s measurement (not a timing), on small MLPs."""

from __future__ import annotations

import benchmark_calls
import pytest


@pytest.mark.parametrize("case", benchmark_calls.CASES)
def test_python_calls_per_parameter_tensor_are_within_budget(case):
    settings = benchmark_calls.CASES[case]
    small, _ = benchmark_calls.engine_calls(40, settings)
    large, base = benchmark_calls.engine_calls(160, settings)
    slope = (large - small) / 120
    assert 0 <= slope <= benchmark_calls.BUDGET
    assert base > 0  # the base optimizer's step ran and was counted apart


def test_the_script_prints_one_row_per_case(capsys):
    benchmark_calls.main(["--tensors", "40", "80"])
    rows = capsys.readouterr().out.splitlines()[2:]
    assert [row[:40].strip() for row in rows] == list(benchmark_calls.CASES)
