"""What the main job (``examples/noisy_labels``, run by ``scripts/run_demo.sh``) prints: one
line per run and one progress bar, then the table; ``--verbose`` shows the Trainer's logs; in
several processes only the main process prints; and it needs no package beyond the ``trainer``
extra and scikit-learn, the two that ``run_demo.sh`` installs."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest
import run_noisy_labels
from helpers import ROOT
from helpers.two_processes import free_port

SCRIPT = ROOT / "examples" / "noisy_labels" / "run_noisy_labels.py"
LABELS = list(run_noisy_labels.METHODS)  # sgd sam lookbehind lookbehind_adaptive
TINY = ["--num_train_epochs", "1", "--per_device_train_batch_size", "256", "--seeds", "2"]


def run_job(*args: str, prefix: tuple[str, ...] = (), **env: str) -> subprocess.CompletedProcess:
    environment = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
        "OMP_NUM_THREADS": "1",
        **env,
    }
    result = subprocess.run(
        [sys.executable, *prefix, str(SCRIPT), *args],
        capture_output=True,
        env=environment,
        cwd=ROOT,
        timeout=600,
    )  # bytes: text mode would turn the bar's carriage returns into line breaks
    result.stdout, result.stderr = result.stdout.decode(), result.stderr.decode()
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def lines(text: str) -> list[str]:
    """Printed lines; a progress bar redrawn in place (``\\r``) is one line."""
    return [line for line in text.split("\n") if line.strip()]


def expected_labels() -> list[str]:
    """The table's row labels for the default flags, from the job's own naming."""
    parser = run_noisy_labels.HfArgumentParser(run_noisy_labels.LookbehindTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(run_noisy_labels.default_training_arguments())
    return [
        run_noisy_labels.method_label(m, run_noisy_labels.method_arguments(args, m)) for m in LABELS
    ]


def run_lines(stdout: str, label: str, seed: int) -> list[str]:
    return [line for line in stdout.splitlines() if line.startswith(f"{label}, seed {seed}: ")]


@pytest.mark.slow
def test_one_line_per_run_one_bar_then_the_table(tmp_path):
    result = run_job(*TINY, "--output_dir", str(tmp_path))
    labels, seeds = expected_labels(), 2
    for label in labels:
        for seed in range(seeds):
            (line,) = run_lines(result.stdout, label, seed)
            assert re.search(r"test acc \d+\.\d\d% \(best \d+\.\d\d%\), noisy fit", line), line
        table_row = [line for line in result.stdout.splitlines() if line.startswith(f"| {label} |")]
        assert len(table_row) == 1
    runs = len(labels) * seeds
    # header, the runs, a blank line, the caption, the table (header, rule, one row per method)
    assert len(lines(result.stdout)) == 1 + runs + 1 + 2 + len(labels)
    assert "{'loss'" not in result.stdout + result.stderr  # no Trainer log dicts
    bars = lines(result.stderr)
    assert len(bars) <= 2, bars  # the one bar (and its final redraw)
    assert all(bar.strip().startswith("training") for bar in bars), bars
    assert f"{runs * 5}/{runs * 5}" in result.stderr  # 1257 images / 256 = 5 steps per run


@pytest.mark.slow
def test_verbose_shows_the_trainer_logs(tmp_path):
    verbose = run_job(
        *TINY, "--methods", "sgd", "--verbose", "--output_dir", str(tmp_path / "verbose")
    )
    everything = verbose.stdout + verbose.stderr
    assert "'eval_accuracy'" in everything and "'train_runtime'" in everything
    quiet_lines = 1 + 2 + 1 + 2 + 1 + 2  # what the quiet job prints for one method, two seeds
    assert len(lines(everything)) > quiet_lines


@pytest.mark.slow
def test_several_processes_print_once_without_ddp_warnings(tmp_path):
    prefix = ("-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port")
    result = run_job(
        "--max_steps", "2", "--seeds", "1", "--methods", "sgd", "lookbehind",
        "--output_dir", str(tmp_path), prefix=(*prefix, str(free_port())),
    )  # fmt: skip
    stdout = result.stdout
    assert stdout.count("digits: 1257 training images") == 1
    assert stdout.count("| method | test acc %") == 1
    for label in expected_labels()[::2]:  # sgd, lookbehind
        assert len(run_lines(stdout, label, 0)) == 1
    assert "find_unused_parameters" not in result.stderr


def test_default_flags_keep_ddp_from_searching_unused_parameters():
    parser = run_noisy_labels.HfArgumentParser(run_noisy_labels.LookbehindTrainingArguments)
    (args,) = parser.parse_args_into_dataclasses(run_noisy_labels.default_training_arguments())
    assert args.ddp_find_unused_parameters is False
    network = run_noisy_labels.digits_network(8)
    import torch

    network(torch.zeros(2, 64)).sum().backward()  # every parameter gets a gradient
    assert all(p.grad is not None for p in network.parameters())


# The packages of the examples extra that the trainer extra and scikit-learn do not bring.
EXAMPLES_ONLY = (
    "datasets", "matplotlib", "peft", "sacrebleu", "sacremoses", "timm", "torchvision", "trl",
)  # fmt: skip


def test_run_demo_installs_only_what_the_main_job_imports(tmp_path):
    demo = (ROOT / "scripts" / "run_demo.sh").read_text()
    (install,) = [line for line in demo.splitlines() if "pip install" in line]
    assert '".[trainer]"' in install and "scikit-learn" in install
    assert "examples" not in install
    blocker = (
        "import runpy, sys\n"
        f"for name in {EXAMPLES_ONLY!r}: sys.modules[name] = None\n"
        f"sys.argv = [{str(SCRIPT)!r}, '--max_steps', '1', '--seeds', '1', '--methods', 'sgd',"
        f" '--output_dir', {str(tmp_path)!r}]\n"
        f"runpy.run_path({str(SCRIPT)!r}, run_name='__main__')\n"
    )
    environment = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, "-c", blocker], capture_output=True, text=True, env=environment, cwd=ROOT
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "| SGD |" in result.stdout


def test_the_flag_table_of_the_demo_page_matches_the_job():
    """docs/noisy_labels_demo.md's table of flags: each flag is one the job parses, with the
    default the job uses."""
    text = (ROOT / "docs" / "noisy_labels_demo.md").read_text()
    rows = re.findall(r"^\| `(--\w+)` \| `([^`]*)` \|", text, flags=re.M)
    assert len(rows) >= 10, rows
    parser = run_noisy_labels.HfArgumentParser(
        (run_noisy_labels.NoisyLabelsArguments, run_noisy_labels.LookbehindTrainingArguments)
    )
    benchmark, args = parser.parse_args_into_dataclasses(
        run_noisy_labels.default_training_arguments()
    )
    defaults = {**vars(args), **vars(benchmark)}
    for flag, shown in rows:
        name = flag.removeprefix("--")
        assert name in defaults, flag
        value = defaults[name]
        if isinstance(value, list):
            assert " ".join(map(str, value)) == shown, flag
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            assert float(shown) == value, flag
        else:  # strings, booleans, and the Trainer's enums (their value)
            assert str(getattr(value, "value", value)) == shown, flag
    assert text.index("the table below") < text.index(f"| `{rows[0][0]}` |")
