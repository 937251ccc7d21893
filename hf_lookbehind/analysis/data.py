"""Models and image-classification data for the command-line tools (``datasets``,
``transformers`` and ``torchvision`` are imported on use).

A model is either a Hugging Face image classifier (hub name or local directory, loaded with
``AutoModelForImageClassification`` and preprocessed by its ``AutoImageProcessor``) or whatever
a factory ``module:function`` / ``path/to/file.py:function`` returns for a path (an
``nn.Module``, or a tuple whose first element is one); factory models get images scaled to
[0, 1] and normalised with a per-channel mean and std (all images must share one size).
A dataset is a hub name, a local directory (``datasets`` detects image folders and
parquet/csv/json files), or one parquet/csv/json/arrow file (a single split).
"""

from __future__ import annotations

import importlib
import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

FILE_BUILDERS = {
    ".parquet": "parquet",
    ".csv": "csv",
    ".json": "json",
    ".jsonl": "json",
    ".arrow": "arrow",
}


def import_callable(spec: str) -> Callable[..., Any]:
    """``package.module:name`` or ``path/to/file.py:name`` -> the object ``name``."""
    location, sep, name = spec.rpartition(":")
    if not sep or not location or not name:
        raise ValueError(f"expected 'module:function' or 'file.py:function', got {spec!r}")
    if location.endswith(".py"):
        path = Path(location)
        if not path.is_file():
            raise FileNotFoundError(f"factory file {path} does not exist")
        module_spec = importlib.util.spec_from_file_location(path.stem, path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
    else:
        module = importlib.import_module(location)
    if not hasattr(module, name):
        raise ValueError(f"{location} has no attribute {name!r}")
    return getattr(module, name)


def load_classifier(name_or_path: str, factory: str | None = None) -> nn.Module:
    """The model at ``name_or_path``: built by ``factory(name_or_path)`` when a factory is
    given, else ``AutoModelForImageClassification.from_pretrained(name_or_path)``."""
    if factory is None:
        from transformers import AutoModelForImageClassification

        return AutoModelForImageClassification.from_pretrained(name_or_path)
    built = import_callable(factory)(name_or_path)
    model = built[0] if isinstance(built, tuple) else built
    if not isinstance(model, nn.Module):
        raise TypeError(f"{factory} returned {type(built).__name__}, not an nn.Module")
    return model


def load_split(dataset: str, split: str):
    """One split of a hub dataset, a local dataset directory, or a single data file."""
    from datasets import load_dataset

    path = Path(dataset)
    if path.is_file():
        if path.suffix not in FILE_BUILDERS:
            raise ValueError(f"{path}: unknown data file type; allowed: {sorted(FILE_BUILDERS)}")
        return load_dataset(FILE_BUILDERS[path.suffix], data_files=str(path), split="train")
    return load_dataset(str(path) if path.is_dir() else dataset, split=split)


def column_of_type(dataset, feature_type: str, given: str | None, fallbacks: Sequence[str]):
    """The column ``given``, else the first whose feature is ``feature_type`` (``"Image"``,
    ``"ClassLabel"``), else the first of ``fallbacks`` present."""
    if given is not None:
        if given not in dataset.column_names:
            raise ValueError(f"no column {given!r}; columns: {dataset.column_names}")
        return given
    for name, feature in dataset.features.items():
        if type(feature).__name__ == feature_type:
            return name
    for name in fallbacks:
        if name in dataset.column_names:
            return name
    raise ValueError(
        f"found no {feature_type} column among {dataset.column_names}; name it explicitly"
    )


def image_classification_loader(
    dataset,
    *,
    batch_size: int,
    image_processor: Any | None = None,
    normalization: tuple[Sequence[float], Sequence[float]] | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    max_samples: int | None = None,
    shuffle: bool = False,
    seed: int = 0,
) -> DataLoader:
    """Minibatches of a ``datasets`` image-classification split.

    With ``image_processor`` (a Hugging Face image processor) a batch is ``{"pixel_values",
    "labels"}`` for a ``transformers`` model; with ``normalization`` (per-channel ``(mean,
    std)`` after scaling to [0, 1]) it is ``(pixels, labels)`` for a plain ``nn.Module``.
    ``max_samples`` keeps a random subset (seeded) of that many examples.
    """
    from datasets import Image

    if (image_processor is None) == (normalization is None):
        raise ValueError("pass exactly one of image_processor and normalization")
    image_column = column_of_type(dataset, "Image", image_column, ("img", "image"))
    label_column = column_of_type(dataset, "ClassLabel", label_column, ("label", "labels"))
    if max_samples is not None and max_samples < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(max_samples))
    dataset = dataset.select_columns([image_column, label_column])
    dataset = dataset.cast_column(image_column, Image(mode="RGB"))

    if image_processor is not None:

        def collate(examples: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
            images = [example[image_column] for example in examples]
            pixels = image_processor(images=images, return_tensors="pt")["pixel_values"]
            labels = torch.tensor([example[label_column] for example in examples])
            return {"pixel_values": pixels, "labels": labels}

    else:
        from torchvision.transforms.v2.functional import normalize, to_dtype

        mean, std = (list(values) for values in normalization)
        dataset = dataset.with_format("torch")

        def collate(examples: list[dict[str, Any]]) -> tuple[torch.Tensor, torch.Tensor]:
            images = torch.stack([example[image_column] for example in examples])
            pixels = normalize(to_dtype(images, torch.float32, scale=True), mean, std)
            labels = torch.stack([example[label_column] for example in examples])
            return pixels, labels

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset, batch_size=batch_size, shuffle=shuffle, generator=generator, collate_fn=collate
    )
