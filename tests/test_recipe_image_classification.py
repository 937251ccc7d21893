"""The ImageNet ViT recipe on the shared one-image-per-class ImageNet sample: class indices of an
image folder, and a short run of ``run_image_classification.main`` with a small ViT built from
``--model_config`` (no download)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from datasets import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "image_classification"))

from image_classification_utils import DataArguments, load_image_splits
from run_image_classification import architecture_overrides, main

TINY_VIT = '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}'


def test_image_folder_classes_follow_the_standard_imagenet_order(shared_data):
    sample = shared_data / "imagenet_sample"
    expected = {}
    for line in (sample / "labels.tsv").read_text().splitlines():
        file_name, index, *_ = line.split("\t")
        expected[file_name] = int(index)
    folder = str(sample / "val")
    args = DataArguments(train_path=folder, validation_path=folder, max_eval_samples=50)
    train, evaluation = load_image_splits(args, seed=0)
    assert len(train) == 1000 and len(evaluation) == 50
    assert train.features["label"].num_classes == 1000
    for split in (train, evaluation):
        paths = split.cast_column("image", Image(decode=False))
        for item in paths:
            assert item["label"] == expected[Path(item["image"]["path"]).name]


def test_data_arguments_need_both_local_paths():
    with pytest.raises(ValueError, match="both --train_path and --validation_path"):
        DataArguments(train_path="train.parquet")


def test_model_config_must_be_a_json_object():
    assert architecture_overrides(TINY_VIT)["embed_dim"] == 32
    with pytest.raises(ValueError, match=r"must be a JSON object or a \.json file"):
        architecture_overrides("{depth: 2}")
    with pytest.raises(ValueError, match="must be a JSON object, got"):
        architecture_overrides("[2]")


def test_short_vit_run_learns_and_reports_top1_top5(shared_data, tmp_path):
    folder = str(shared_data / "imagenet_sample" / "val")
    main(
        [
            "--train_path", folder,
            "--validation_path", folder,
            "--max_train_samples", "160",
            "--max_eval_samples", "64",
            "--model_config", TINY_VIT,
            "--num_train_epochs", "3",
            "--per_device_train_batch_size", "16",
            "--learning_rate", "0.1",
            "--warmup_steps", "0",
            "--logging_steps", "1",
            "--save_strategy", "no",
            "--dataloader_num_workers", "0",
            "--report_to", "none",
            "--seed", "0",
            "--output_dir", str(tmp_path),
        ]
    )  # fmt: skip
    results = json.loads((tmp_path / "all_results.json").read_text())
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]

    losses = {}
    for entry in history:
        if "loss" in entry:
            losses.setdefault(int((entry["epoch"] - 1e-9) // 1), []).append(entry["loss"])
    first, last = (sum(losses[e]) / len(losses[e]) for e in (0, 2))
    assert last < first - 0.2, f"training loss did not fall: {losses}"
    # The paper's ImageNet setting is the default: Lookbehind with minibatch switching, alpha 0.8.
    # (The first log comes mid-cycle, before any slow-weight update.)
    alphas = [entry["lookbehind_alpha"] for entry in history if "lookbehind_alpha" in entry]
    assert len(alphas) >= 20 and alphas == pytest.approx([0.8] * len(alphas))

    assert 0.0 <= results["eval_top1"] <= results["eval_top5"] <= 1.0
    assert results["eval_accuracy"] == results["eval_top1"]
    top1_history = [entry["eval_top1"] for entry in history if "eval_top1" in entry]
    assert len(top1_history) == 3
    assert results["best_eval_accuracy"] == pytest.approx(
        max([*top1_history, results["eval_top1"]])
    )
    epoch_seconds = [e["train_epoch_seconds"] for e in history if "train_epoch_seconds" in e]
    assert results["train_seconds_per_epoch"] == pytest.approx(sum(epoch_seconds[1:]) / 2)
