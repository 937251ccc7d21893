"""No recipe setting may fail only after training: greedy decoding trains, saves and reloads
end to end, and the settings that would fail at a save, an evaluation or a metric are rejected
before any training, with a message saying what to change."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import run_cifar
import run_image_classification
import run_translation
from helpers.translation import smoke_argv
from transformers import MarianMTModel


@pytest.mark.slow
def test_greedy_decoding_trains_saves_and_reloads(shared_data, tmp_path):
    """``--generation_num_beams 1`` on IWSLT'14 pairs: checkpoints and the final model save, and
    the reloaded model translates exactly as the trained one did."""
    trained, reloaded = tmp_path / "trained", tmp_path / "reloaded"
    greedy = ("--generation_num_beams=1", "--lookbehind_method=lookbehind")
    results = run_translation.main(
        smoke_argv(shared_data, trained, *greedy, "--save_strategy=steps", "--save_steps=9")
    )
    assert (trained / "model.safetensors").is_file()
    assert sorted(p.name for p in trained.glob("checkpoint-*")) == ["checkpoint-18", "checkpoint-9"]
    saved = json.loads((trained / "generation_config.json").read_text())
    assert saved["num_beams"] == 1 and not saved.get("early_stopping", False)
    assert MarianMTModel.from_pretrained(trained).generation_config.num_beams == 1
    assert results["eval_gen_len"] > 0  # the greedy translations are not empty

    again = run_translation.main(
        smoke_argv(
            shared_data,
            reloaded,
            *greedy,
            "--do_train=False",
            f"--model_name_or_path={trained}",
            f"--subword_dir={trained / 'subwords'}",
        )
    )
    for split in ("eval", "test"):
        lines = (trained / f"{split}_generations.txt").read_text().splitlines()
        assert lines == (reloaded / f"{split}_generations.txt").read_text().splitlines()
        assert again[f"{split}_bleu"] == results[f"{split}_bleu"]


def write_generation_config(folder: Path, **settings) -> Path:
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps(settings))
    return folder


TRANSLATION_REJECTED = {
    "no beams": (("--generation_num_beams=0",), "num_beams >= 1"),
    "generation beyond the positions": (
        ("--max_positions=64", "--max_source_length=64", "--max_target_length=64"),
        "--generation_max_length 100 is longer than the model's 64 positions",
    ),
    "sentences beyond the positions": (
        ("--max_positions=512",),
        "--max_source_length 1024 is longer than the model's 512 positions",
    ),
    "unknown best metric": (
        ("--metric_for_best_model=accuracy",),
        "not among the evaluation's metrics \\(loss, bleu, sacrebleu, gen_len\\)",
    ),
    "BLEU without generation": (
        ("--predict_with_generate=False", "--metric_for_best_model=bleu"),
        "or add --predict_with_generate",
    ),
    "loss only with generation": (("--prediction_loss_only=True",), "drop --prediction_loss_only"),
}


@pytest.mark.parametrize("case", list(TRANSLATION_REJECTED))
def test_translation_rejects_before_training(shared_data, tmp_path, case):
    flags, message = TRANSLATION_REJECTED[case]
    output_dir = tmp_path / "run"
    argv = smoke_argv(shared_data, output_dir, "--generation_max_length=100", *flags)
    with pytest.raises(ValueError, match=message):
        run_translation.main(argv)
    assert not (output_dir / "trainer_state.json").exists()
    assert not list(output_dir.glob("checkpoint-*"))


def test_translation_rejects_a_generation_config_file_that_cannot_be_saved(shared_data, tmp_path):
    """The ``--generation_config`` of ``Seq2SeqTrainingArguments`` replaces the model's; one
    that ``save_pretrained`` would refuse (early stopping without beams) is refused when the
    Trainer is built, before training."""
    folder = write_generation_config(
        tmp_path / "generation", num_beams=1, early_stopping=True, max_length=20
    )
    output_dir = tmp_path / "run"
    argv = smoke_argv(shared_data, output_dir, f"--generation_config={folder}")
    with pytest.raises(ValueError, match=r"GenerationConfig is invalid(.|\n)*early_stopping"):
        run_translation.main(argv)
    assert not (output_dir / "trainer_state.json").exists()


def cifar_argv(shared_data: Path, output_dir: Path, *extra: str) -> list[str]:
    data = shared_data / "cifar10"
    return [
        "--model_name=resnet20",
        f"--train_path={data / 'train.parquet'}",
        f"--validation_path={data / 'test.parquet'}",
        f"--output_dir={output_dir}",
        "--use_cpu",
        "--report_to=none",
        *extra,
    ]


def test_cifar_reports_a_missing_path_as_missing(shared_data, tmp_path):
    argv = cifar_argv(shared_data, tmp_path, f"--train_path={tmp_path / 'missing.parquet'}")
    with pytest.raises(FileNotFoundError, match=r"missing\.parquet does not exist"):
        run_cifar.main(argv)
    (tmp_path / "notes.txt").write_text("not images")
    with pytest.raises(ValueError, match=r"not an image folder or a file ending in \.parquet"):
        run_cifar.main(cifar_argv(shared_data, tmp_path, f"--train_path={tmp_path / 'notes.txt'}"))


@pytest.mark.parametrize(
    ("recipe", "flags", "message"),
    [
        (run_cifar, ("--metric_for_best_model=top5",), r"evaluation's metrics \(loss, accuracy\)"),
        (run_cifar, ("--prediction_loss_only=True",), "drop --prediction_loss_only"),
        (
            run_image_classification,
            ("--metric_for_best_model=top10",),
            r"evaluation's metrics \(loss, accuracy, top1, top5\)",
        ),
        (run_image_classification, ("--prediction_loss_only=True",), "drop --prediction"),
    ],
)
def test_image_recipes_reject_evaluation_settings_before_training(
    shared_data, tmp_path, recipe, flags, message
):
    output_dir = tmp_path / "run"
    argv = cifar_argv(shared_data, output_dir, *flags)
    if recipe is run_image_classification:
        folder = shared_data / "imagenet_sample" / "val"
        argv = [
            f"--train_path={folder}",
            f"--validation_path={folder}",
            f"--output_dir={output_dir}",
            "--use_cpu",
            "--report_to=none",
            *flags,
        ]
    with pytest.raises(ValueError, match=message):
        recipe.main(argv)
    assert not output_dir.exists()  # rejected before the data, the model and the Trainer
