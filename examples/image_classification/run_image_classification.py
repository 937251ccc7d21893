"""Fine-tune a timm ViT-B/16 on ImageNet-1k with Lookbehind-SAM/ASAM or any baseline.

Defaults follow the paper's ImageNet fine-tuning (Mordido et al., ICML 2024, Sec. 4.2 and 6.2):
15 epochs of SGD with minibatch switching, k = 2, alpha = 0.8 (or
``--lookbehind_adaptive_alpha``), rho from {0.1, 0.2, 0.5}. Images go through the model's own
preprocessing (timm ``resolve_data_config`` / ``create_transform``); top-1 and top-5 accuracy
of the slow weights are reported.

    accelerate launch examples/image_classification/run_image_classification.py \\
        --dataset_name ILSVRC/imagenet-1k --rho 0.1 --output_dir out/vit_lb --do_train --do_eval

``--model_config '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2,
"num_heads": 2}'`` builds a small randomly initialised ViT instead (no download).
``--model_library transformers --model_name_or_path google/vit-base-patch16-224`` fine-tunes a
``transformers`` image classifier (hub id or local directory) with its image processor's
size, mean and std; the output directory then holds the model and processor for
``from_pretrained``.

``--recipe resnet18_scratch`` trains a timm ResNet-18 from random initialisation instead (the
paper's Table 1, ImageNet column): 90 epochs of SGD (momentum 0.9, weight decay 1e-4 on every
parameter), batch 256, lr 0.1 x global batch / 256, lr x0.1 at epochs 30 and 60, random
resized crops of 224 px with flips for training, resize to 256 and center crop 224 for
evaluation; Lookbehind in same-batch mode (k = 2, alpha 0.5, rho 0.05).

Without the hub (a hub dataset or pretrained weights) it stops at once with the flags for local
files and the tiny offline command of README.md.
"""

from __future__ import annotations

import sys

from hf_lookbehind_recipes.offline import exit_if_hub_unreachable

if __name__ == "__main__":  # without the hub, fail in a second rather than after the imports
    exit_if_hub_unreachable("image_classification", sys.argv[1:])

import argparse
import json
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
from transformers.hf_argparser import string_to_bool

from hf_lookbehind import LookbehindTrainingArguments
from hf_lookbehind_recipes.classifier import ImageClassifier
from hf_lookbehind_recipes.evaluation import top_k_accuracy, track_best_accuracy
from hf_lookbehind_recipes.image_data import (
    DataArguments,
    image_and_label_columns,
    load_image_splits,
    num_classes,
)
from hf_lookbehind_recipes.learning_rate import (
    LearningRateArguments,
    create_trainer,
    scale_learning_rate,
)
from hf_lookbehind_recipes.methods import unread_flags
from hf_lookbehind_recipes.processes import end_process_group
from hf_lookbehind_recipes.training import train_and_evaluate

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
    "lookbehind_alpha": 0.8,
    "rho": 0.1,
    "eval_strategy": "epoch",
    "save_strategy": "epoch",
    "save_total_limit": 1,
    "logging_steps": 50,
    "remove_unused_columns": False,
    "dataloader_num_workers": 8,
}

# ResNet-18 from scratch (Table 1, ImageNet column): the 90-epoch step-decay SGD recipe of
# Goyal et al. (2017) / the torchvision reference, whose lr 0.1 at batch 256 is scaled linearly
# with the global batch; weight decay on every parameter and no gradient clipping (plain SGD);
# no zero-init of the residual branches' last BatchNorm (timm's default does it, torchvision's
# does not); same-batch Lookbehind with the package's k, alpha and rho.
RESNET18_SCRATCH_DEFAULTS = {
    **PAPER_DEFAULTS,
    "model_name_or_path": "resnet18",
    "pretrained": False,
    "model_config": '{"zero_init_last": false}',
    "image_size": 224,
    "crop_pct": 0.875,
    "interpolation": "bilinear",
    "color_jitter": 0.0,
    "num_train_epochs": 90,
    "learning_rate": 0.1,
    "lr_reference_batch_size": 256,
    "lr_schedule": "multistep",
    "lr_decay_epochs": [30, 60],
    "lr_decay_factor": 0.1,
    "warmup_steps": 0,
    "weight_decay": 1e-4,
    "decay_all_parameters": True,
    "max_grad_norm": 0.0,  # no clipping
    "per_device_train_batch_size": 256,
    "per_device_eval_batch_size": 256,
    "minibatch_switching": False,
    "lookbehind_alpha": 0.5,
    "rho": 0.05,
}

RECIPES = {"vit_finetune": PAPER_DEFAULTS, "resnet18_scratch": RESNET18_SCRATCH_DEFAULTS}


MODEL_LIBRARIES = ("timm", "transformers")
TOP_K = (1, 5)  # the accuracies reported


@dataclass
class ModelArguments:
    recipe: str = field(
        default="vit_finetune",
        metadata={
            "help": "Sets the defaults of every other flag: vit_finetune (ViT-B/16 fine-tuning, "
            "Table 4) or resnet18_scratch (ResNet-18 from random initialisation, 90 epochs, "
            "Table 1). Flags given on the command line override them.",
            "choices": list(RECIPES),
        },
    )
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
    pretrained: bool = field(
        default=True,
        metadata={
            "help": "Start a timm model from the hub's pretrained weights; False: random "
            "initialisation (training from scratch)."
        },
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
        if self.recipe not in RECIPES:
            raise ValueError(f"--recipe must be one of {', '.join(RECIPES)}, got {self.recipe!r}")
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
    image_size: int | None = field(
        default=None,
        metadata={
            "help": "Side of the training crops and of the evaluation center crop (timm models); "
            "default: the model's input size."
        },
    )
    crop_pct: float | None = field(
        default=None,
        metadata={
            "help": "Evaluation: resize the shorter side to image_size / crop_pct, then center "
            "crop image_size (timm models); default: the model's."
        },
    )
    interpolation: str | None = field(
        default=None,
        metadata={
            "help": "Resize interpolation (bilinear, bicubic, ...; timm models); default: the "
            "model's."
        },
    )
    color_jitter: float = field(
        default=0.4,
        metadata={
            "help": "Strength of the colour jitter of the training images (timm's default 0.4); "
            "0 turns it off."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.image_size is not None and self.image_size <= 0:
            raise ValueError(
                f"--image_size must be a positive size in pixels, got {self.image_size}"
            )
        if self.crop_pct is not None and not 0.0 < self.crop_pct <= 1.0:
            raise ValueError(f"--crop_pct must be in (0, 1], got {self.crop_pct}")
        if self.color_jitter < 0:
            raise ValueError(f"--color_jitter must be >= 0, got {self.color_jitter}")

    def timm_data_overrides(self) -> dict[str, Any]:
        """The set preprocessing flags, as timm ``resolve_data_config`` arguments."""
        overrides: dict[str, Any] = {}
        if self.image_size is not None:
            overrides["input_size"] = (3, self.image_size, self.image_size)
        if self.crop_pct is not None:
            overrides["crop_pct"] = self.crop_pct
        if self.interpolation is not None:
            overrides["interpolation"] = self.interpolation
        return overrides


def recipe_defaults(argv: Sequence[str] | None) -> dict[str, Any]:
    """The defaults of the ``--recipe`` named on the command line (``vit_finetune`` if none),
    without those that the ``--lookbehind_method`` it names does not read, nor the static
    alpha with ``--lookbehind_adaptive_alpha`` (the Trainer refuses a setting that would have
    no effect)."""
    reader = argparse.ArgumentParser(add_help=False)
    reader.add_argument("--recipe", choices=list(RECIPES), default="vit_finetune")
    reader.add_argument("--lookbehind_method")
    reader.add_argument(
        "--lookbehind_adaptive_alpha", nargs="?", const=True, default=False, type=string_to_bool
    )
    named = reader.parse_known_args(argv)[0]
    defaults = RECIPES[named.recipe]
    unread = unread_flags(
        named.lookbehind_method or defaults["lookbehind_method"], named.lookbehind_adaptive_alpha
    )
    return {name: value for name, value in defaults.items() if name not in unread}


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


def create_timm_model(
    model_args: ModelArguments, classes: int, data_args: ImageNetDataArguments | None = None
) -> tuple[torch.nn.Module, dict]:
    """The timm model and its preprocessing config (input size, interpolation, crop, mean/std):
    the model's own, with the preprocessing flags of ``data_args`` (default: none set) on top."""
    data_args = data_args if data_args is not None else ImageNetDataArguments()
    overrides = architecture_overrides(model_args.model_config)
    if model_args.model_checkpoint is not None:
        overrides = {**overrides, "checkpoint_path": model_args.model_checkpoint}
    pretrained = model_args.pretrained and not overrides
    model = timm.create_model(
        model_args.model_name_or_path, pretrained=pretrained, num_classes=classes, **overrides
    )
    model_input_size = model.pretrained_cfg["input_size"]
    if "img_size" in overrides:  # the registered config still names the original size
        model_input_size = (3, *timm.layers.to_2tuple(overrides["img_size"]))
    data_overrides = {"input_size": model_input_size, **data_args.timm_data_overrides()}
    if model.pretrained_cfg.get("fixed_input_size") and (
        data_overrides["input_size"] != model_input_size
    ):
        raise ValueError(
            f"{model_args.model_name_or_path} takes inputs of {model_input_size[1:]} pixels only, "
            f"got --image_size {data_args.image_size}; change the model's size with --model_config "
            "'{\"img_size\": N}'"
        )
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
    model_args: ModelArguments, classes: int, data_args: ImageNetDataArguments | None = None
) -> tuple[torch.nn.Module, Transform, Transform, BaseImageProcessor | None]:
    """The model the Trainer trains, its training and evaluation transforms, and (transformers
    models) the image processor to save with it. timm models use timm's transforms of their
    data config (training: random resized crop, flip, colour jitter; evaluation: resize to
    size / crop_pct and center crop); transformers models evaluate through their own image
    processor and train on random resized crops and flips at its size, mean and std. The
    preprocessing flags come from ``data_args`` (default: the flags' defaults)."""
    data_args = data_args if data_args is not None else ImageNetDataArguments()
    augmentation = {"is_training": True, "color_jitter": data_args.color_jitter or None}
    if model_args.model_library == "timm":
        model, data_config = create_timm_model(model_args, classes, data_args)
        return (
            ImageClassifier(model),
            create_transform(**data_config, **augmentation),
            create_transform(**data_config, is_training=False),
            None,
        )
    model = AutoModelForImageClassification.from_pretrained(
        model_args.model_name_or_path, num_labels=classes, ignore_mismatched_sizes=True
    )
    processor = AutoImageProcessor.from_pretrained(model_args.model_name_or_path)

    def evaluation_transform(image: Any) -> torch.Tensor:
        return processor(image, return_tensors="pt")["pixel_values"][0]

    train_transform = create_transform(**processor_data_config(processor), **augmentation)
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


Arguments = tuple[
    ModelArguments, ImageNetDataArguments, LearningRateArguments, LookbehindTrainingArguments
]


def parse_arguments(argv: Sequence[str] | None = None) -> Arguments:
    """The flags over the defaults of their ``--recipe``, with the learning rate scaled to the
    global batch (``--lr_reference_batch_size``)."""
    parser = HfArgumentParser(
        (ModelArguments, ImageNetDataArguments, LearningRateArguments, LookbehindTrainingArguments)
    )
    parser.set_defaults(**recipe_defaults(argv))
    model_args, data_args, lr_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    timm_flags = [
        f"--{name}" for name in ("image_size", "crop_pct", "interpolation")
        if getattr(data_args, name) is not None
    ]  # fmt: skip
    if model_args.model_library != "timm" and timm_flags:
        raise ValueError(
            f"{', '.join(timm_flags)} set the preprocessing of timm models; a "
            f"{model_args.model_library} model uses its image processor's"
        )
    scale_learning_rate(training_args, lr_args)
    return model_args, data_args, lr_args, training_args


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    model_args, data_args, lr_args, training_args = parse_arguments(argv)
    set_seed(training_args.seed)
    track_best_accuracy(training_args, top_k=TOP_K)
    exit_if_hub_unreachable("image_classification", sys.argv[1:] if argv is None else argv)

    train_split, eval_split = load_image_splits(data_args, seed=training_args.seed)
    image_column, label_column = image_and_label_columns(train_split, data_args)
    model, train_transform, eval_transform, processor = create_model(
        model_args, num_classes(train_split, label_column), data_args
    )

    trainer = create_trainer(
        lr_args,
        model=model,
        args=training_args,
        train_dataset=with_preprocessing(train_split, image_column, label_column, train_transform),
        eval_dataset=with_preprocessing(eval_split, image_column, label_column, eval_transform),
        compute_metrics=top_k_accuracy(TOP_K),
        processing_class=processor,
    )
    return train_and_evaluate(trainer)


if __name__ == "__main__":
    main()
    end_process_group()
