"""The ImageNet ViT recipe on the shared one-image-per-class ImageNet sample: class indices of an
image folder, and short runs of ``run_image_classification.main`` with a small timm ViT built
from ``--model_config`` and with a small transformers ViT saved to a local directory (no
download)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from datasets import Image
from PIL.Image import Resampling
from run_image_classification import (
    ModelArguments,
    architecture_overrides,
    create_model,
    main,
    processor_data_config,
)
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    ViTConfig,
    ViTForImageClassification,
    ViTImageProcessor,
)

from hf_lookbehind_recipes.image_data import DataArguments, load_image_splits

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


def _run_short(shared_data: Path, output_dir: Path, *model_flags: str) -> None:
    """3 epochs on 160 images of the shared sample, evaluated on 64 of them."""
    folder = str(shared_data / "imagenet_sample" / "val")
    main(
        [
            *model_flags,
            "--train_path", folder,
            "--validation_path", folder,
            "--max_train_samples", "160",
            "--max_eval_samples", "64",
            "--num_train_epochs", "3",
            "--per_device_train_batch_size", "16",
            "--learning_rate", "0.1",
            "--warmup_steps", "0",
            "--logging_steps", "1",
            "--save_strategy", "no",
            "--dataloader_num_workers", "0",
            "--report_to", "none",
            "--seed", "0",
            "--output_dir", str(output_dir),
        ]
    )  # fmt: skip


def test_short_vit_run_learns_and_reports_top1_top5(shared_data, tmp_path):
    _run_short(shared_data, tmp_path, "--model_config", TINY_VIT)
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


def _save_tiny_transformers_vit(directory: Path) -> None:
    config = ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=1000,
    )
    torch.manual_seed(0)
    ViTForImageClassification(config).save_pretrained(directory)
    processor = ViTImageProcessor(size={"height": 32, "width": 32}, resample=Resampling.BICUBIC)
    processor.save_pretrained(directory)


def test_transformers_model_uses_its_image_processor(shared_data, tmp_path):
    _save_tiny_transformers_vit(tmp_path)
    model_args = ModelArguments(model_name_or_path=str(tmp_path), model_library="transformers")
    model, train_transform, eval_transform, processor = create_model(model_args, 1000)
    assert isinstance(model, ViTForImageClassification)
    assert processor_data_config(processor) == {
        "input_size": (3, 32, 32),
        "interpolation": "bicubic",
        "mean": (0.5, 0.5, 0.5),
        "std": (0.5, 0.5, 0.5),
    }
    folder = str(shared_data / "imagenet_sample" / "val")
    image = load_image_splits(DataArguments(train_path=folder, validation_path=folder), 0)[0][0]
    image = image["image"].convert("RGB")
    expected = processor(image, return_tensors="pt")["pixel_values"][0]
    assert torch.equal(eval_transform(image), expected)
    augmented = train_transform(image)
    assert augmented.shape == (3, 32, 32) and -1.0 <= augmented.min() <= augmented.max() <= 1.0


def test_timm_only_flags_are_rejected_for_transformers_models():
    with pytest.raises(ValueError, match="--model_config build timm models"):
        ModelArguments(model_library="transformers", model_config=TINY_VIT)
    with pytest.raises(ValueError, match="--model_library must be one of timm, transformers"):
        ModelArguments(model_library="keras")


def test_short_transformers_vit_run_saves_a_loadable_classifier(shared_data, tmp_path):
    pretrained, output_dir = tmp_path / "pretrained", tmp_path / "out"
    _save_tiny_transformers_vit(pretrained)
    _run_short(
        shared_data,
        output_dir,
        *("--model_library", "transformers", "--model_name_or_path", str(pretrained)),
    )
    results = json.loads((output_dir / "all_results.json").read_text())
    history = json.loads((output_dir / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert sum(losses[-10:]) / 10 < sum(losses[:10]) / 10 - 0.2, losses

    # The output directory is a complete classifier: reloaded with its processor, it scores the
    # evaluation images as the final evaluation did (the slow weights were saved).
    folder = str(shared_data / "imagenet_sample" / "val")
    model = AutoModelForImageClassification.from_pretrained(output_dir).eval()
    processor = AutoImageProcessor.from_pretrained(output_dir)
    args = DataArguments(train_path=folder, validation_path=folder, max_eval_samples=64)
    evaluation = load_image_splits(args, seed=0)[1]
    images = [item.convert("RGB") for item in evaluation["image"]]
    with torch.no_grad():
        logits = model(**processor(images, return_tensors="pt")).logits
    labels = np.asarray(evaluation["label"])
    top1 = float((logits.argmax(-1).numpy() == labels).mean())
    top5 = float(np.mean([y in row for y, row in zip(labels, logits.topk(5).indices.numpy())]))
    assert results["eval_top1"] == pytest.approx(top1)
    assert results["eval_top5"] == pytest.approx(top5)
