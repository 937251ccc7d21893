"""The pretrained CIFAR-10 ResNet-20/56 (``load_pretrained_resnet`` of
``hf_lookbehind_recipes.cifar_models``) classify the shared CIFAR-10 test images with the
checkpoints' normalisation nearly as well as they record.

Measured on the first 2,000 test images of the JPEG copy: ResNet-20 80.85%, ResNet-56 83.75%
(all 10,000: 81.03% and 83.20%), against the 91.78% and 93.62% the checkpoints record on the
original PNG test set; the JPEG re-encoding costs about 10 points. The floors sit 3 points below
the measured accuracies."""

from __future__ import annotations

import datasets
import pytest
import torch

from hf_lookbehind_recipes.cifar_data import NORMALIZATIONS, CifarTensorDataset, decode_images
from hf_lookbehind_recipes.cifar_models import CifarResNetA, load_pretrained_resnet

TEST_IMAGES = 2000


@pytest.fixture
def cifar10_test_subset(shared_data) -> CifarTensorDataset:
    files = {"test": str(shared_data / "cifar10" / "test.parquet")}
    test = datasets.load_dataset("parquet", data_files=files)["test"].select(range(TEST_IMAGES))
    return CifarTensorDataset(
        decode_images(test, "img"),
        torch.tensor(test["label"]),
        NORMALIZATIONS["imagenet"],
        augment=False,
    )


@pytest.mark.parametrize(
    ("name", "blocks_per_stage", "recorded", "floor"),
    [
        ("resnet20", 3, 91.78, 0.78),
        pytest.param("resnet56", 9, 93.62, 0.80, marks=pytest.mark.slow),
    ],
)
def test_pretrained_resnet_accuracy(
    shared_data, cifar10_test_subset, name, blocks_per_stage, recorded, floor
):
    path = shared_data / "pretrained_cifar10_resnet" / f"{name}.th"
    model, recorded_accuracy = load_pretrained_resnet(path)
    assert isinstance(model, CifarResNetA) and len(model.layer1) == blocks_per_stage
    assert recorded_accuracy == pytest.approx(recorded, abs=1e-4)

    batch = cifar10_test_subset.__getitems__(list(range(TEST_IMAGES)))
    pixels = torch.stack([example["pixel_values"] for example in batch])
    labels = torch.stack([example["labels"] for example in batch])
    with torch.inference_mode():
        predictions = torch.cat([model.eval()(chunk).argmax(1) for chunk in pixels.split(500)])
    accuracy = (predictions == labels).float().mean().item()
    assert floor <= accuracy <= recorded / 100


def test_load_pretrained_resnet_rejects_incomplete_checkpoints(tmp_path):
    state = {f"module.{key}": value for key, value in CifarResNetA(3).state_dict().items()}
    del state["module.linear.weight"]
    path = tmp_path / "headless.th"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError, match="not a CIFAR ResNet-A checkpoint"):
        load_pretrained_resnet(path)
