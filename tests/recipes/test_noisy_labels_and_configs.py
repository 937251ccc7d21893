"""The README's main job (the noisy-label benchmark, ``examples/noisy_labels``), every variant of
it the README and docs/ show, and the accelerate configs."""

from __future__ import annotations

import math
import re
import shlex

import numpy as np
import pytest
import run_noisy_labels
from accelerate.commands.config.config_args import ClusterConfig
from helpers import ROOT

EXAMPLES = ROOT / "examples"
DEMO = "bash scripts/run_demo.sh"


def documented_demo_commands() -> list[str]:
    """Every ``bash scripts/run_demo.sh ...`` command of README.md and docs/ (code blocks and
    inline code), comments dropped."""
    pages = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
    text = "\n".join(page.read_text() for page in pages)
    found = re.findall(r"^(bash scripts/run_demo\.sh[^\n#`]*)", text, flags=re.M)
    found += re.findall(r"`(bash scripts/run_demo\.sh[^`]*)`", text)
    return sorted({command.strip() for command in found})


def test_readme_documents_demo_variants():
    commands = documented_demo_commands()
    assert DEMO in commands and len(commands) >= 4, commands
    assert (
        (ROOT / "scripts" / "run_demo.sh")
        .read_text()
        .rstrip()
        .endswith('examples/noisy_labels/run_noisy_labels.py "$@"')
    )  # the flags reach the benchmark unchanged


@pytest.mark.slow
@pytest.mark.parametrize("command", documented_demo_commands())
def test_documented_demo_command_runs(command, tmp_path, capsys):
    """The README's command as shown, shortened to 3 Trainer steps per run (``--max_steps``
    overrides the epochs and changes nothing else)."""
    flags = shlex.split(command)[2:]
    shortened = ["--max_steps", "3", "--output_dir", str(tmp_path), "--disable_tqdm", "true"]
    results = run_noisy_labels.main(flags + shortened)

    parser = run_noisy_labels.HfArgumentParser(run_noisy_labels.NoisyLabelsArguments)
    documented, _ = parser.parse_args_into_dataclasses(flags, return_remaining_strings=True)
    seeds = documented.seeds
    assert results and all(len(runs) == seeds for runs in results.values())
    for runs in results.values():
        for run in runs:
            assert 0.0 <= run["accuracy"] <= 1.0 and math.isfinite(run["loss"])
    table = capsys.readouterr().out
    assert f"mean ± std over {seeds} seed(s)" in table
    assert "| method | test acc % | best test acc % | test loss | noisy fit % | train s |" in table
    assert all(f"| {label} | " in table for label in results)


def test_noisy_labels_replace_the_given_share_with_uniform_classes():
    labels = np.repeat(np.arange(10), 300)
    noisy = run_noisy_labels.noisy_labels(labels, 0.4, seed=0)
    assert np.array_equal(noisy, run_noisy_labels.noisy_labels(labels, 0.4, seed=0))  # fixed seed
    assert not np.array_equal(noisy, run_noisy_labels.noisy_labels(labels, 0.4, seed=1))
    changed = noisy != labels
    # 1,200 labels redrawn uniformly from 10 classes: 9/10 of them change (binomial sd ~10).
    assert abs(changed.sum() - 0.9 * 1200) < 50
    assert np.bincount(noisy[changed], minlength=10).min() > 60  # every wrong class is drawn
    assert np.array_equal(run_noisy_labels.noisy_labels(labels, 0.0, seed=0), labels)


def test_lookbehind_flags_reach_the_lookbehind_runs_only(tmp_path):
    parser = run_noisy_labels.HfArgumentParser(run_noisy_labels.LookbehindTrainingArguments)
    flags = ["--output_dir", str(tmp_path), "--lookbehind_adaptive_alpha", "--lookbehind_k", "5"]
    flags += ["--adaptive_alpha_scope", "global", "--rho", "0.3"]
    defaults = run_noisy_labels.default_training_arguments()
    (args,) = parser.parse_args_into_dataclasses([*defaults, *flags])
    sam = run_noisy_labels.method_arguments(args, "sam")
    assert (sam.lookbehind_method, sam.lookbehind_k, sam.lookbehind_alpha) == ("sam", None, None)
    assert sam.lookbehind_adaptive_alpha is False
    assert sam.adaptive_alpha_scope is None and sam.rho == 0.3
    sgd = run_noisy_labels.method_arguments(args, "sgd")
    assert (sgd.lookbehind_method, sgd.rho, sgd.lookbehind_alpha) == ("none", None, None)
    assert sgd.lookbehind_adaptive_alpha is False
    for method in ("lookbehind", "lookbehind_adaptive"):
        lookbehind = run_noisy_labels.method_arguments(args, method)
        assert (lookbehind.lookbehind_k, lookbehind.lookbehind_alpha) == (5, None)
        assert lookbehind.lookbehind_adaptive_alpha is True
        assert lookbehind.adaptive_alpha_scope == "global" and lookbehind.rho == 0.3


@pytest.mark.slow
def test_clean_labels_are_learned_with_every_method(tmp_path):
    flags = ["--output_dir", str(tmp_path), "--num_train_epochs", "2", "--disable_tqdm", "true"]
    results = run_noisy_labels.main([*flags, "--label_noise", "0", "--seeds", "1"])
    assert list(results) == [
        "SGD",
        "SAM",
        "Lookbehind-SAM (α=0.5)",
        "Lookbehind-SAM (adaptive α)",
    ]
    for (run,) in results.values():
        assert run["accuracy"] > 0.8  # ten classes: chance is 0.1
        assert run["loss"] > 0 and run["seconds"] > 0 and math.isnan(run["noisy_fit"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--prediction_loss_only", "true"], "drop --prediction_loss_only"),
        (["--metric_for_best_model", "top5"], "not among the evaluation's metrics"),
        (["--label_noise", "1.0"], r"in \[0, 1\), got 1.0"),
        (["--seeds", "0"], "at least 1"),
        (["--methods", "adam"], "--methods takes one or more of"),
    ],
)
def test_benchmark_rejects_what_would_fail_after_training(flags, message, tmp_path):
    output_dir = tmp_path / "out"
    with pytest.raises(ValueError, match=message):
        run_noisy_labels.main(["--output_dir", str(output_dir), *flags])
    assert not output_dir.exists()  # rejected before any Trainer was built


@pytest.mark.parametrize("name", ["single_gpu", "multi_gpu", "multi_node"])
def test_accelerate_configs_load(name):
    config = ClusterConfig.from_yaml_file(EXAMPLES / "accelerate_configs" / f"{name}.yaml")
    assert config.num_processes >= 1
    assert str(config.distributed_type).endswith("NO" if name == "single_gpu" else "MULTI_GPU")
