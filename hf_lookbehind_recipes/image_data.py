"""Image-classification data for the recipes: where the images come from (a hub dataset by name,
or local files and image folders), the training and evaluation splits, and their columns."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from datasets import ClassLabel, Dataset, DatasetDict, load_dataset

from hf_lookbehind.analysis.data import FILE_BUILDERS, column_of_type

LABEL_COLUMNS = ("label", "labels", "fine_label")


@dataclass
class DataArguments:
    """Where the images come from: a hub dataset by name, or local files/folders."""

    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub dataset name (ignored when --train_path/--validation_path are set)."
        },
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Hub config name."})
    train_path: str | None = field(
        default=None,
        metadata={
            "help": "Local training data: a parquet/arrow/csv/json file in the hub schema, or an "
            "image folder (<class>/<image> layout)."
        },
    )
    validation_path: str | None = field(
        default=None, metadata={"help": "Local evaluation data, in the same form as --train_path."}
    )
    eval_split: str | None = field(
        default=None,
        metadata={"help": "Hub split to evaluate on; default 'validation', else 'test'."},
    )
    image_column_name: str | None = field(
        default=None, metadata={"help": "Image column; default: the column of type Image."}
    )
    label_column_name: str | None = field(
        default=None,
        metadata={"help": f"Label column; default: the first of {', '.join(LABEL_COLUMNS)}."},
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on a random subset of this many examples."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on a random subset of this many examples."}
    )

    def __post_init__(self) -> None:
        if (self.train_path is None) != (self.validation_path is None):
            raise ValueError(
                "local data needs both --train_path and --validation_path, got "
                f"train_path={self.train_path!r}, validation_path={self.validation_path!r}"
            )
        if self.train_path is None and self.dataset_name is None:
            raise ValueError(
                "give --dataset_name (a hub dataset) or --train_path/--validation_path"
            )

    @property
    def is_local(self) -> bool:
        return self.train_path is not None


def _local_builder(paths: Sequence[str]) -> tuple[str, list[str]]:
    """The ``datasets`` builder for local paths and their data-file patterns."""
    kinds = set()
    for path in map(Path, paths):
        if path.is_dir():
            kinds.add("imagefolder")
        elif path.suffix in FILE_BUILDERS and path.is_file():
            kinds.add(FILE_BUILDERS[path.suffix])
        elif not path.exists():
            raise FileNotFoundError(
                f"{path} does not exist: give an image folder or a file ending in "
                f"{', '.join(FILE_BUILDERS)}"
            )
        else:
            raise ValueError(
                f"{path}: not an image folder or a file ending in {', '.join(FILE_BUILDERS)}"
            )
    if len(kinds) != 1:
        raise ValueError(f"train and validation data must be of one kind, got {sorted(kinds)}")
    builder = kinds.pop()
    patterns = [str(Path(p) / "**") if builder == "imagefolder" else p for p in paths]
    return builder, patterns


def load_image_splits(args: DataArguments, seed: int) -> tuple[Dataset, Dataset]:
    """The training and evaluation splits, subsampled to ``max_*_samples``. Local image folders
    are loaded in one call, so both splits share one class-index mapping (sorted folder names)."""
    if args.is_local:
        builder, (train, validation) = _local_builder([args.train_path, args.validation_path])
        splits = load_dataset(builder, data_files={"train": train, "validation": validation})
        eval_split = "validation"
    else:
        splits = load_dataset(args.dataset_name, args.dataset_config_name)
        eval_split = args.eval_split or ("validation" if "validation" in splits else "test")
    if not isinstance(splits, DatasetDict) or "train" not in splits or eval_split not in splits:
        raise ValueError(f"need a 'train' and a {eval_split!r} split, got {list(splits)}")
    subsets = []
    for split, limit in (("train", args.max_train_samples), (eval_split, args.max_eval_samples)):
        dataset = splits[split]
        if limit is not None:
            dataset = dataset.shuffle(seed=seed).select(range(min(limit, len(dataset))))
        subsets.append(dataset)
    return subsets[0], subsets[1]


def image_and_label_columns(dataset: Dataset, args: DataArguments) -> tuple[str, str]:
    """The image and label column names: the flags, or detected from the features."""
    image = column_of_type(dataset, "Image", args.image_column_name, ("img", "image"))
    label = column_of_type(dataset, "ClassLabel", args.label_column_name, LABEL_COLUMNS)
    return image, label


def num_classes(dataset: Dataset, label_column: str) -> int:
    feature = dataset.features[label_column]
    if isinstance(feature, ClassLabel):
        return feature.num_classes
    return int(max(dataset[label_column])) + 1
