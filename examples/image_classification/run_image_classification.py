"""Fine-tune a timm ViT-B/16 on ImageNet-1k with Lookbehind-SAM/ASAM or any baseline.

Defaults follow the paper's ImageNet fine-tuning (Mordido et al., ICML 2024, Sec. 4.2 and 6.2):
15 epochs of SGD with minibatch switching, k = 2, alpha = 0.8 (or ``--lookbehind_alpha
adaptive``), rho from {0.1, 0.2, 0.5}. Images go through the model's own preprocessing
(timm ``resolve_data_config`` / ``create_transform``); top-1 and top-5 accuracy of the slow
weights are reported.

    accelerate launch examples/image_classification/run_image_classification.py \\
        --dataset_name ILSVRC/imagenet-1k --rho 0.1 --output_dir out/vit_lb --do_train --do_eval

``--model_config '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
"num_heads": 2}'`` builds a small randomly initialised ViT instead (no download).
``--model_library transformers --model_name_or_path google/vit-base-patch16-224`` fine-tunes a
``transformers`` image classifier (hub id or local directory) with its image processor's
size, mean and std; the output directory then holds the model and processor for
``from_pretrained``.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import timm
import torch
from datasets import Dataset
from PIL.Image import Resampling
from timm.data import create_transform, resolve_data_config
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    BaseImageProcessor,
    HfArgumentParser,
    set_seed,
)

from hf_lookbehind import LookbehindTrainer, LookbehindTrainingArguments

sys.path.insert(0, str(Path(__file__).resolve().parent))

from image_classification_utils import (
    DataArguments,
    ImageClassifier,
    image_and_label_columns,
    load_image_splits,
    num_classes,
    top_k_accuracy,
    track_best_accuracy,
    train_and_evaluate,
)

# The paper's fine-tuning setup where it states it; the learning rate, its cosine schedule and
# the batch size are this recipe's choice. Every entry can be overridden on the command line.
PAPER_DEFAULTS = {
    "do_train": True,
    "do_eval": True,
    "num_train_epochs": 15,
    "optim": "sgd",
    "optim_args": "momentum=0.9",
    "learning_rate": 0.01,
    "lr_scheduler_type": "cosine",
    "warmup_steps": 500,
    "weight_decay": 0.0,
    "per_device_train_batch_size": 64,
    "per_device_eval_batch_size": 128,
    "lookbehind_method": "lookbehind",
    "minibatch_switching": True,
    "lookbehind_k": 2,
    "lookbehind_alpha": "0.8",
    "rho": 0.1,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 1,
    "logging_steps": 50,
    "remove_unused_columns": False,
    "dataloader_num_workers": 8,
}


MODEL_LIBRARIES = ("timm", "transformers")


@dataclass
class ModelArguments:
    model_name_or_path: str = field(
        default="vit_base_patch16_224.orig_in21k_ft_in1k",
        metadata={
            "help": "timm model name (weights from the hub unless --model_config is set), or with "
            "--model_library transformers a hub id or local directory of an image classifier "
            "(e.g. google/vit-base-patch16-224)."
        },
    )
    model_library: str = field(
        default="timm",
        metadata={"help": "Which library builds the model.", "choices": list(MODEL_LIBRARIES)},
    )
    model_checkpoint: str | None = field(
        default=None, metadata={"help": "Local timm checkpoint file to load instead of the hub's."}
    )
    model_config: str | None = field(
        default=None,
        metadata={
            "help": "JSON object (or a path to a JSON file) of timm constructor arguments that "
            "override the architecture; the model is then randomly initialised, not downloaded."
        },
    )

    def __post_init__(self) -> None:
        if self.model_library not in MODEL_LIBRARIES:
            raise ValueError(
                f"--model_library must be one of {', '.join(MODEL_LIBRARIES)}, "
                f"got {self.model_library!r}"
            )
        timm_only = {
            "--model_config": self.model_config,
            "--model_checkpoint": self.model_checkpoint,
        }
        given = [flag for flag, value in timm_only.items() if value is not None]
        if self.model_library != "timm" and given:
            raise ValueError(
                f"{' and '.join(given)} build timm models; with --model_library "
                f"{self.model_library} give a hub id or a local directory as --model_name_or_path"
            )


@dataclass
class ImageNetDataArguments(DataArguments):
    dataset_name: str | None = field(
        default="ILSVRC/imagenet-1k",
        metadata={"help": "Hub dataset; ignored when --train_path/--validation_path are set."},
    )


def architecture_overrides(model_config: str | None) -> dict[str, Any]:
    if model_config is None:
        return {}
    path = Path(model_config)
    text = path.read_text() if path.suffix == ".json" and path.is_file() else model_config
    try:
        overrides = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(
            f"--model_config must be a JSON object or a .json file, got {model_config!r}: {error}"
        ) from None
    if not isinstance(overrides, dict):
        raise ValueError(f"--model_config must be a JSON object, got {overrides!r}")
    return overrides


Transform = Callable[[Any], torch.Tensor]


def create_timm_model(model_args: ModelArguments, classes: int) -> tuple[torch.nn.Module, dict]:
    """The timm model and its preprocessing config (input size, interpolation, crop, mean/std)."""
    overrides = architecture_overrides(model_args.model_config)
    if model_args.model_checkpoint is not None:
        overrides = {**overrides, "checkpoint_path": model_args.model_checkpoint}
    model = timm.create_model(
        model_args.model_name_or_path, pretrained=not overrides, num_classes=classes, **overrides
    )
    data_overrides = {}
    if "img_size" in overrides:  # the registered config still names the original size
        data_overrides["input_size"] = (3, *timm.layers.to_2tuple(overrides["img_size"]))
    return model, resolve_data_config(data_overrides, model=model)


def processor_data_config(processor: BaseImageProcessor) -> dict[str, Any]:
    """The timm data config (input size, interpolation, mean/std) of a transformers image
    processor, for the training augmentation (random resized crop and flip) at its size."""
    size = processor.crop_size if getattr(processor, "do_center_crop", False) else processor.size
    if size.get("height") is not None:
        height, width = size["height"], size["width"]
    else:
        height = width = size["shortest_edge"]
    return {
        "input_size": (3, height, width),
        "interpolation": Resampling(processor.resample).name.lower(),
        "mean": tuple(processor.image_mean),
        "std": tuple(processor.image_std),
    }


def create_model(
    model_args: ModelArguments, classes: int
) -> tuple[torch.nn.Module, Transform, Transform, BaseImageProcessor | None]:
    """The model the Trainer trains, its training and evaluation transforms, and (transformers
    models) the image processor to save with it. timm models use timm's transforms of their
    data config; transformers models evaluate through their own image processor and train on
    random resized crops and flips at its size, mean and std."""
    if model_args.model_library == "timm":
        model, data_config = create_timm_model(model_args, classes)
        return (
            ImageClassifier(model),
            create_transform(**data_config, is_training=True),
            create_transform(**data_config, is_training=False),
            None,
        )
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=classes, ignore_mismatched_sizes=True
    )
    processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)

    def evaluation_transform(image: Any) -> torch.Tensor:
        return processor(image, return_tensors="pt")["pixel_values"][0]

    train_transform = create_transform(**processor_data_config(processor), is_training=True)
    return model, train_transform, evaluation_transform, processor


def with_preprocessing(
    dataset: Dataset, image_column: str, label_column: str, transform: Callable
) -> Dataset:
    def preprocess(batch: dict[str, list]) -> dict[str, list]:
        return {
            "pixel_values": [transform(image.convert("RGB")) for image in batch[image_column]],
            "labels": batch[label_column],
        }

    return dataset.with_transform(preprocess)


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    parser = HfArgumentParser((ModelArguments, ImageNetDataArguments, LookbehindTrainingArguments))
    parser.set_defaults(**PAPER_DEFAULTS)
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    set_seed(training_args.seed)
    track_best_accuracy(training_args)

    train_split, eval_split = load_image_splits(data_args, seed=training_args.seed)
    image_column, label_column = image_and_label_columns(train_split, data_args)
    model, train_transform, eval_transform, processor = create_model(
        model_args, num_classes(train_split, label_column)
    )

    trainer = LookbehindTrainer(
        model=model,
        args=training_args,
        train_dataset=with_preprocessing(train_split, image_column, label_column, train_transform),
        eval_dataset=with_preprocessing(eval_split, image_column, label_column, eval_transform),
        compute_metrics=top_k_accuracy((1, 5)),
        processing_class=processor,
    )
    return train_and_evaluate(trainer, training_args)


if __name__ == "__main__":
    main()
