"""The README's main job (the Trainer quickstart) and the accelerate configs."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from accelerate.commands.config.config_args import ClusterConfig

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def load_quickstart():
    path = EXAMPLES / "quickstart" / "run_quickstart.py"
    spec = importlib.util.spec_from_file_location("run_quickstart", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses resolve their annotations through it
    spec.loader.exec_module(module)
    return module


def test_quickstart_compares_three_methods(tmp_path, capsys):
    quickstart = load_quickstart()
    results = quickstart.main(
        ["--output_dir", str(tmp_path), "--num_train_epochs", "2", "--disable_tqdm", "true"]
    )
    assert list(results) == ["SGD", "SAM", "Lookbehind-SAM"]
    for row in results.values():
        assert row["accuracy"] > 0.8  # ten classes: chance is 0.1
        assert row["loss"] > 0 and row["seconds"] > 0
    table = capsys.readouterr().out
    assert "Lookbehind-SAM" in table and "test acc" in table


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "multi_node"])
def test_accelerate_configs_load(name):
    config = ClusterConfig.from_yaml_file(EXAMPLES / "accelerate_configs" / f"{name}.yaml")
    assert config.num_processes >= 1
    assert str(config.distributed_type).endswith("NO" if name == "single_gpu" else "MULTI_GPU")
