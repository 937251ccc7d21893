"""The recipes without the Hugging Face Hub: each fails in a second with one message that names
its flags for local data and its tiny offline command, and that command, as each README shows
it, runs on data the repository makes (``hf_lookbehind_recipes.tiny_data``)."""

from __future__ import annotations

import http.server
import json
import math
import os
import re
import resource
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import ROOT

from hf_lookbehind_recipes import offline

EXAMPLES = ROOT / "examples"
RECIPES = list(offline.RECIPES)
SCRIPTS = {
    "cifar": "cifar/run_cifar.py",
    "image_classification": "image_classification/run_image_classification.py",
    "lifelong": "lifelong/run_lifelong.py",
    "sft": "sft/run_sft.py",
    "translation": "translation/run_translation.py",
}
# Every recipe with a README: the main job needs no hub (scikit-learn ships its digits).
READMES = {**SCRIPTS, "noisy_labels": "noisy_labels/run_noisy_labels.py"}
# A command line of each recipe that reads from the hub, and the flags for local data that the
# message must name.
HUB_COMMANDS = {
    "cifar": ([], ["--train_path", "--validation_path"]),
    "image_classification": ([], ["--train_path", "--validation_path", "--model_config"]),
    "lifelong": (["--benchmark", "split_cifar10"], ["--train_path", "--validation_path"]),
    "sft": (
        ["--model_name_or_path", "Qwen/Qwen2.5-0.5B", "--dataset_name", "trl-lib/Capybara"],
        ["--train_file", "--validation_file", "--model_name_or_path"],
    ),
    "translation": (
        ["--dataset_name", "wmt/wmt14", "--dataset_config_name", "de-en"],
        ["--data_dir"],
    ),
}


def readme(recipe: str) -> str:
    return (EXAMPLES / READMES[recipe]).with_name("README.md").read_text()


def tiny_block(recipe: str) -> str:
    """The first bash block after the README's "Tiny offline run" heading."""
    text = readme(recipe)
    assert "\n## Tiny offline run\n" in text, f"{recipe} README has no tiny offline run"
    section = text.split("\n## Tiny offline run\n", 1)[1]
    return re.search(r"```bash\n(.*?)```", section, flags=re.S).group(1).strip()


def environment(tmp_path: Path, **extra: str) -> dict[str, str]:
    """This checkout on the path, an empty hub cache, and no offline setting of the caller's."""
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env.pop("HF_ENDPOINT", None)
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return {**env, "PYTHONPATH": pythonpath, "HF_HOME": str(tmp_path / "hf_home"), **extra}


@pytest.mark.parametrize("recipe", RECIPES)
def test_readme_block_is_the_command_the_message_quotes(recipe):
    assert set(RECIPES) == set(SCRIPTS)
    assert tiny_block(recipe) == offline.RECIPES[recipe][1].tiny_command
    assert f"examples/{SCRIPTS[recipe]}" in tiny_block(recipe)


NO_HUB = {
    "offline mode": {"HF_HUB_OFFLINE": "1"},
    "unreachable endpoint": {"HF_ENDPOINT": "http://127.0.0.1:9"},  # nothing listens on port 9
}


@pytest.mark.parametrize("no_hub", list(NO_HUB))
@pytest.mark.parametrize("recipe", RECIPES)
def test_without_the_hub_each_recipe_stops_at_once_with_its_local_flags_and_tiny_command(
    recipe, no_hub, tmp_path
):
    args, local_flags = HUB_COMMANDS[recipe]
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / SCRIPTS[recipe]), *args,
         "--output_dir", str(tmp_path / "out")],
        capture_output=True, text=True, cwd=ROOT, timeout=120,
        env=environment(tmp_path, **NO_HUB[no_hub]),
    )  # fmt: skip
    seconds = time.monotonic() - started
    assert result.returncode == 1, result.stderr[-2000:]
    assert seconds < 10, f"took {seconds:.1f} s"
    message = result.stderr
    assert "Traceback" not in message and "ConnectionError" not in message
    assert message.splitlines()[0].startswith(Path(SCRIPTS[recipe]).name)
    assert "not in the local cache" in message
    for flag in local_flags:
        assert flag in message, flag
    for line in tiny_block(recipe).splitlines():
        assert line.strip() in message, line
    assert not (tmp_path / "out").exists()


def test_a_cached_dataset_runs_on_in_offline_mode(tmp_path, monkeypatch):
    """Unreachable hub, but the dataset is in the cache: no error, and offline mode is on so
    that the libraries read the cache without retrying."""
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    for module in ("huggingface_hub.constants", "datasets.config"):  # restored afterwards
        if module in sys.modules:
            monkeypatch.setattr(sys.modules[module], "HF_HUB_OFFLINE", False)
    needs = offline.cifar_needs([])
    assert needs == [("dataset", "uoft-cs/cifar10")]
    recipe_help = offline.RECIPES["cifar"][1]
    with pytest.raises(offline.HubUnavailable):
        offline.check_hub(needs, recipe_help, probe=lambda: False)
    snapshot = tmp_path / "hub" / "datasets--uoft-cs--cifar10" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    offline.check_hub(needs, recipe_help, probe=lambda: False)
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    monkeypatch.delenv("HF_HUB_OFFLINE")
    offline.check_hub(needs, recipe_help, probe=lambda: True)  # reachable: nothing changes
    assert "HF_HUB_OFFLINE" not in os.environ


def test_the_probe_takes_any_answer_as_reachable(monkeypatch):
    class NotFound(http.server.BaseHTTPRequestHandler):
        def do_HEAD(self):
            self.send_response(404)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), NotFound)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{server.server_port}")
        assert offline.hub_reachable(timeout=5)
    finally:
        server.shutdown()
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    started = time.monotonic()
    assert not offline.hub_reachable(timeout=5)
    assert time.monotonic() - started < 5


def test_what_each_command_line_needs_from_the_hub(tmp_path):
    """The small readers agree with the recipes' own parsers on what comes from the hub."""
    import run_image_classification
    from lifelong_data import BENCHMARKS

    from hf_lookbehind_recipes.cifar import CifarDataArguments

    assert CifarDataArguments().dataset_name == offline.CIFAR_DATASET
    assert run_image_classification.ImageNetDataArguments().dataset_name == offline.IMAGENET_DATASET
    assert run_image_classification.ModelArguments().model_name_or_path == offline.VIT_MODEL
    assert {name: b.dataset_name for name, b in BENCHMARKS.items()} == offline.LIFELONG_DATASETS

    local = ["--train_path", str(tmp_path), "--validation_path", str(tmp_path)]
    assert offline.cifar_needs(local) == []
    assert offline.cifar_needs([f"--dataset_name={tmp_path}"]) == []  # a local dataset folder
    assert offline.cifar_needs(["--dataset_name", "uoft-cs/cifar100"]) == [
        ("dataset", "uoft-cs/cifar100")
    ]
    vit = ("model", f"timm/{offline.VIT_MODEL}")
    assert offline.image_classification_needs(local) == [vit]
    assert offline.image_classification_needs([*local, "--model_config", "{}"]) == []
    assert offline.image_classification_needs([*local, "--pretrained", "false"]) == []
    assert offline.image_classification_needs([*local, "--recipe", "resnet18_scratch"]) == []
    transformers = ["--model_library", "transformers", "--model_name_or_path"]
    assert offline.image_classification_needs([*local, *transformers, str(tmp_path)]) == []
    assert offline.lifelong_needs(["--benchmark", "split_tinyimagenet"]) == [
        ("dataset", "zh-plus/tiny-imagenet")
    ]
    assert offline.sft_needs(["--model_name_or_path", str(tmp_path), "--train_file", "x"]) == []
    assert offline.translation_needs(["--data_dir", str(tmp_path)]) == []


def check_outputs(recipe: str, folder: Path, stdout: str) -> None:
    """What each tiny run leaves: its metrics, in range."""
    out = folder / "outputs" / "tiny" / recipe
    if recipe == "noisy_labels":
        rows = [line for line in stdout.splitlines() if line.startswith("| ")]
        assert len(rows) == 2 + 4  # header, rule, one row per method
        assert "mean ± std over 1 seed(s)" in stdout
        return
    if recipe == "lifelong":
        results = json.loads((out / "results.json").read_text())
        assert 0 <= results["runs"][0]["average_accuracy"] <= 1
        assert len(results["runs"][0]["accuracy_matrix"]) == 5  # split_cifar10: 5 tasks
        return
    results = json.loads((out / "all_results.json").read_text())
    if recipe == "sft":
        assert math.isfinite(results["eval_loss"]) and results["gradient_computations"] == 8
        assert (out / "adapter_model.safetensors").is_file()
    elif recipe == "translation":
        assert results["test_bleu"] >= 0 and results["test_samples"] == 16
    else:
        assert 0 <= results["eval_accuracy"] <= 1 and results["epoch"] == 2


@pytest.mark.slow
@pytest.mark.parametrize("recipe", list(READMES))
def test_the_readme_tiny_command_runs_offline_in_under_a_minute_of_cpu(recipe, tmp_path):
    """The README's block as it is, with bash, in a fresh folder that sees the repository's
    examples/ (as from the repository's root), offline and with an empty hub cache."""
    (tmp_path / "examples").symlink_to(EXAMPLES)
    python = tmp_path / "bin" / "python"  # `python` of the block: this interpreter
    python.parent.mkdir()
    python.symlink_to(sys.executable)
    env = environment(tmp_path, HF_HUB_OFFLINE="1")
    env["PATH"] = os.pathsep.join([str(python.parent), env.get("PATH", "")])
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.monotonic()
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", tiny_block(recipe)],
        capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600,
    )  # fmt: skip
    wall = time.monotonic() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    assert result.returncode == 0, result.stderr[-4000:]
    check_outputs(recipe, tmp_path, result.stdout)
    print(f"{recipe}: {wall:.0f} s wall, {cpu:.0f} s CPU")
    assert cpu < 60, f"{recipe}: {cpu:.0f} s of CPU time"
