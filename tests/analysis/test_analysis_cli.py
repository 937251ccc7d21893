"""The m-sharpness and noisy-weight command lines on real CIFAR-10 images, with a factory-built
pretrained ResNet-20 and with a (tiny, local) Hugging Face image classifier."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hf_lookbehind.analysis import m_sharpness
from hf_lookbehind.analysis.cli import noise_main, sharpness_main
from hf_lookbehind.analysis.data import image_classification_loader, load_split
from hf_lookbehind_recipes.cifar_models import load_pretrained_resnet

FACTORY = "hf_lookbehind_recipes.cifar_models:load_pretrained_resnet"


@pytest.fixture
def cifar(shared_data) -> Path:
    return shared_data / "cifar10"


def test_sharpness_command_line_matches_the_function(tmp_path, shared_data, cifar):
    checkpoint = shared_data / "pretrained_cifar10_resnet" / "resnet20.th"
    sharpness_main(
        ["--model", f"r20={checkpoint}", "--model_factory", FACTORY,
         "--dataset", str(cifar / "test.parquet"), "--batch_size", "8", "--num_batches", "2",
         "--radii", "0.01", "0.05", "--ascent_steps", "2", "--output_dir", str(tmp_path)]
    )  # fmt: skip
    written = json.loads((tmp_path / "sharpness.json").read_text())
    assert list(written) == ["r20"]
    assert (tmp_path / "sharpness.png").stat().st_size > 0
    assert written["r20"]["batch_size"] == 8 and written["r20"]["num_batches"] == 2

    model, _ = load_pretrained_resnet(checkpoint)
    batches = image_classification_loader(
        load_split(str(cifar / "test.parquet"), "test"),
        batch_size=8,
        normalization=((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
        max_samples=16,
        shuffle=True,
    )
    direct = m_sharpness(model, batches, [0.01, 0.05], ascent_steps=2, progress=False)
    assert direct.per_batch == written["r20"]["per_batch"]
    assert direct.mean == written["r20"]["mean"]
    assert all(v > 0 for row in direct.per_batch for v in row)


@pytest.fixture
def tiny_vit(tmp_path) -> Path:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        intermediate_size=32, num_labels=10,
    )  # fmt: skip
    path = tmp_path / "tiny_vit"
    transformers.ViTForImageClassification(config).save_pretrained(path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_noise_command_line_with_a_hugging_face_model(tmp_path, tiny_vit, cifar):
    common = ["--model", f"vit={tiny_vit}", "--dataset", str(cifar / "test.parquet")]
    noise_main(
        [*common, "--calibration_dataset", str(cifar / "train.parquet"),
         "--max_eval_samples", "32", "--calibration_batches", "1", "--calibration_batch_size", "8",
         "--sigmas", "0", "1.0", "--draws", "2", "--output_dir", str(tmp_path / "out")]
    )  # fmt: skip
    written = json.loads((tmp_path / "out" / "noise.json").read_text())
    assert written["vit"]["sigmas"] == [0.0, 1.0]
    assert written["vit"]["accuracy_mean"][0] == written["vit"]["clean_accuracy"]
    assert written["vit"]["loss_mean"][1] != written["vit"]["clean_loss"]
    assert len(written["vit"]["per_draw_accuracy"][1]) == 2
    assert (tmp_path / "out" / "noise.png").stat().st_size > 0
    with pytest.raises(SystemExit):  # a single file is one split: no calibration data
        noise_main([*common, "--output_dir", str(tmp_path / "x")])
