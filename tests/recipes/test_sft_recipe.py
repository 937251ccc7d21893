"""The SFT recipe end to end on a tiny Llama saved to a local folder (a character-level
tokenizer, a few chats in local JSON lines files): every method's passes per step, adapters
only, and the saved adapter reloaded and evaluated by a plain SFTTrainer."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import run_sft
import torch
from helpers import ROOT
from helpers.tiny_lm import conversations, save_causal_lm
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from trl import SFTConfig, SFTTrainer

RECIPE = ROOT / "examples" / "sft"
STEPS = 4
METHODS = {  # the README's four methods, and their passes per step
    "adamw": (["--lookbehind_method", "none"], 1),
    "sam": (["--lookbehind_method", "sam", "--rho", "0.05"], 2),
    "lookbehind_switching": (
        ["--minibatch_switching", "--lookbehind_k", "2", "--lookbehind_alpha", "0.5"],
        2,
    ),
    "lookbehind_same_batch": (["--lookbehind_k", "2", "--lookbehind_alpha", "0.5"], 3),
}


@pytest.fixture(scope="module")
def local_files(tmp_path_factory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("sft_data")
    files = {"model": save_causal_lm(folder / "model")}
    for name, examples in (("train", conversations(16)), ("eval", conversations(8, 100))):
        files[name] = folder / f"{name}.jsonl"
        files[name].write_text("".join(json.dumps(example) + "\n" for example in examples))
    return files


def recipe_flags(files: dict[str, Path], output_dir: Path) -> list[str]:
    return [
        "--model_name_or_path", str(files["model"]),
        "--train_file", str(files["train"]),
        "--validation_file", str(files["eval"]),
        "--output_dir", str(output_dir),
        "--max_steps", str(STEPS),
        "--per_device_train_batch_size", "4",
        "--per_device_eval_batch_size", "8",
        "--learning_rate", "1e-2",
        "--logging_steps", "1",
        "--lora_r", "4",
        "--lora_target_modules", "q_proj", "v_proj",
        "--report_to", "none",
        "--save_strategy", "no",
        "--use_cpu",
        "--disable_tqdm", "true",
    ]  # fmt: skip


@pytest.mark.parametrize("method", METHODS)
def test_each_method_trains_the_adapters_with_its_passes(local_files, tmp_path, method):
    flags, passes = METHODS[method]
    results = run_sft.main([*recipe_flags(local_files, tmp_path), *flags])
    assert results["gradient_computations"] == passes * STEPS
    assert results["train_samples"] == 16 and results["eval_samples"] == 8
    assert results["eval_perplexity"] == pytest.approx(torch.tensor(results["eval_loss"]).exp())
    adapter = load_file(tmp_path / "adapter_model.safetensors")
    assert adapter and all("lora_" in name for name in adapter)
    assert any(weight.abs().max() > 0 for name, weight in adapter.items() if "lora_B" in name)


def test_the_saved_adapter_reloads_to_the_evaluated_model(local_files, tmp_path):
    """The adapter saved after Lookbehind-SAM, put on a fresh copy of the base model, gives a
    plain SFTTrainer the evaluation loss the recipe reported; the base weights are the saved
    model's."""
    flags, _ = METHODS["lookbehind_switching"]
    results = run_sft.main([*recipe_flags(local_files, tmp_path / "run"), *flags])
    base = AutoModelForCausalLM.from_pretrained(local_files["model"])
    untouched = {name: p.detach().clone() for name, p in base.named_parameters()}
    reloaded = PeftModel.from_pretrained(base, tmp_path / "run")
    for name, p in reloaded.get_base_model().named_parameters():
        if "lora_" not in name:
            assert torch.equal(p, untouched[name.replace(".base_layer", "")]), name
    _, data_args, _, _ = run_sft.parse_arguments(recipe_flags(local_files, tmp_path / "run"))
    plain = SFTTrainer(
        model=reloaded,
        args=SFTConfig(
            output_dir=str(tmp_path / "plain"),
            per_device_eval_batch_size=8,
            report_to=[],
            use_cpu=True,
        ),
        train_dataset=run_sft.load_splits(data_args)["train"],
        processing_class=AutoTokenizer.from_pretrained(local_files["model"]),
    )
    metrics = plain.evaluate(run_sft.load_splits(data_args)["eval"])
    assert metrics["eval_loss"] == pytest.approx(results["eval_loss"], rel=1e-6)
    assert metrics["eval_mean_token_accuracy"] == pytest.approx(
        results["eval_mean_token_accuracy"], rel=1e-6
    )


def test_data_arguments_need_one_source():
    with pytest.raises(ValueError, match="exactly one of --dataset_name and --train_file"):
        run_sft.parse_arguments(["--model_name_or_path", "m", "--output_dir", "out"])


def test_every_flag_in_the_readme_is_a_recipe_flag():
    """The README's ``--flags`` are the ones run_sft.py parses (argparse would also take an
    unambiguous prefix, so the test compares whole option strings)."""
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", (RECIPE / "README.md").read_text()))
    assert {"--lookbehind_method", "--minibatch_switching", "--lora_r"} <= mentioned
    launcher = {"--multi_gpu", "--num_processes"}  # accelerate launch's
    unknown = mentioned - launcher - set(run_sft.argument_parser()._option_string_actions)
    assert not unknown, f"flags in examples/sft/README.md that the recipe lacks: {unknown}"


def test_without_a_gpu_the_recipe_trains_in_float32_without_use_cpu(local_files, tmp_path):
    """TRL's default bf16 needs an accelerator (or --use_cpu); without either the recipe's
    default is float32, so the command needs no --use_cpu on a CPU. With --use_cpu, TRL's default
    stays."""
    from transformers.utils import is_torch_bf16_gpu_available

    if is_torch_bf16_gpu_available():
        pytest.skip("an accelerator with bfloat16: TRL's default applies")
    flags = [flag for flag in recipe_flags(local_files, tmp_path) if flag != "--use_cpu"]
    _, _, training_args, _ = run_sft.parse_arguments(flags)
    assert training_args.bf16 is False and not training_args.use_cpu
    adamw, passes = METHODS["adamw"]
    results = run_sft.main([*flags, *adamw])
    assert results["gradient_computations"] == passes * STEPS
    _, _, with_cpu, _ = run_sft.parse_arguments(recipe_flags(local_files, tmp_path))
    assert with_cpu.bf16 is True and with_cpu.use_cpu
    with pytest.raises(ValueError, match="use_cpu"):  # asking for bf16 still needs --use_cpu
        run_sft.parse_arguments([*flags, "--bf16", "true"])
