"""Where ``scripts/run_cpu_comparisons.sh`` keeps its committed run records: by default in
``results/``, one complete record per run, and none left under ``examples/``."""

from __future__ import annotations

import pytest
from helpers import ROOT

SCRIPT = ROOT / "scripts" / "run_cpu_comparisons.sh"
RECORD_FILES = ("all_results.json", "trainer_state.json", "flags.txt")


@pytest.mark.parametrize(
    ("variable", "folder"),
    [
        ("LR_RECORDS", "results/translation_lr_study"),
        ("NOISY_RECORDS", "results/cifar_noisy_labels"),
    ],
)
def test_records_default_to_a_results_folder_of_complete_records(variable, folder):
    assert f"{variable}=${{{variable}:-{folder}}}" in SCRIPT.read_text()
    runs = sorted(path.parent for path in (ROOT / folder).rglob("all_results.json"))
    assert runs, f"no run records in {folder}"
    for run in runs:
        assert run.name.rsplit("_seed", 1)[-1].isdigit(), run
        missing = [name for name in RECORD_FILES if not (run / name).is_file()]
        assert not missing, f"{run.relative_to(ROOT)} lacks {missing}"


def test_no_run_records_under_examples():
    assert not sorted((ROOT / "examples").rglob("trainer_state.json"))
