"""Task-incremental split benchmarks: the classes of an image-classification dataset are
assigned to tasks by a fixed, recorded permutation (task t gets classes
``order[t * c : (t + 1) * c]``), each task keeps its own within-task labels 0..c-1, and its
images are decoded once into uint8 tensors (only the examples the run uses)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from datasets import Dataset

from hf_lookbehind_recipes.cifar_data import decode_images
from hf_lookbehind_recipes.image_data import DataArguments, image_and_label_columns, num_classes


@dataclass(frozen=True)
class Benchmark:
    dataset_name: str
    num_tasks: int
    classes_per_task: int
    architecture: str  # lifelong_models.ARCHITECTURES
    normalization: str  # hf_lookbehind_recipes.cifar_data.NORMALIZATIONS
    label_column: str | None = None
    eval_split: str | None = None


BENCHMARKS: dict[str, Benchmark] = {
    "split_cifar100": Benchmark("uoft-cs/cifar100", 20, 5, "cnn3", "cifar100", "fine_label"),
    "split_tinyimagenet": Benchmark(
        "zh-plus/tiny-imagenet", 40, 5, "cnn4", "imagenet", eval_split="valid"
    ),
    "split_cifar10": Benchmark("uoft-cs/cifar10", 5, 2, "cnn3", "cifar10"),
}


@dataclass
class LifelongDataArguments(DataArguments):
    benchmark: str = field(
        default="split_cifar100",
        metadata={
            "help": "Split-CIFAR100 (20 tasks x 5 classes), Split-TinyImageNet (40 x 5) or "
            "Split-CIFAR10 (5 x 2); sets the dataset, tasks, model and normalisation.",
            "choices": list(BENCHMARKS),
        },
    )
    class_order_seed: int = field(
        default=0,
        metadata={"help": "Seed of the class-to-task permutation (the same for every run seed)."},
    )
    train_samples_per_task: int | None = field(
        default=None,
        metadata={"help": "Training images per task (equal per class); default: all."},
    )
    test_samples_per_task: int | None = field(
        default=None, metadata={"help": "Test images per task (equal per class); default: all."}
    )

    def __post_init__(self) -> None:
        if self.benchmark not in BENCHMARKS:
            raise ValueError(f"unknown benchmark {self.benchmark!r}; allowed: {list(BENCHMARKS)}")
        spec = BENCHMARKS[self.benchmark]
        if self.dataset_name is None and not self.train_path:
            self.dataset_name = spec.dataset_name
        if self.eval_split is None:
            self.eval_split = spec.eval_split
        if self.label_column_name is None and spec.label_column and not self.train_path:
            self.label_column_name = spec.label_column
        for name in ("train_samples_per_task", "test_samples_per_task"):
            value = getattr(self, name)
            if value is not None and value < spec.classes_per_task:
                raise ValueError(
                    f"--{name} must be at least the {spec.classes_per_task} classes of a task, "
                    f"got {value}"
                )
        super().__post_init__()


@dataclass
class TaskData:
    """One task: its dataset classes (position = within-task label) and its images."""

    classes: list[int]
    train_images: torch.Tensor
    train_labels: torch.Tensor
    test_images: torch.Tensor
    test_labels: torch.Tensor


def class_order(total_classes: int, seed: int) -> list[int]:
    """The fixed permutation of the dataset's classes that assigns them to tasks."""
    return torch.randperm(total_classes, generator=torch.Generator().manual_seed(seed)).tolist()


def _task_split(
    dataset: Dataset,
    labels: torch.Tensor,
    image_column: str,
    classes: list[int],
    per_task: int | None,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor]:
    chosen, task_labels = [], []
    for position, label in enumerate(classes):
        indices = torch.nonzero(labels == label).flatten()
        indices = indices[torch.randperm(len(indices), generator=generator)]
        if per_task is not None:
            indices = indices[: per_task // len(classes)]
        chosen.append(indices)
        task_labels.append(torch.full((len(indices),), position))
    indices = torch.cat(chosen)
    images = decode_images(dataset.select(indices.tolist()), image_column)
    return images, torch.cat(task_labels)


def split_into_tasks(
    train: Dataset, test: Dataset, args: LifelongDataArguments
) -> tuple[list[TaskData], list[int]]:
    """The benchmark's tasks (in order) and the class permutation they were cut from."""
    spec = BENCHMARKS[args.benchmark]
    image_column, label_column = image_and_label_columns(train, args)
    total = num_classes(train, label_column)
    needed = spec.num_tasks * spec.classes_per_task
    if total < needed:
        raise ValueError(
            f"{args.benchmark} needs {needed} classes ({spec.num_tasks} tasks x "
            f"{spec.classes_per_task}), the data has {total}"
        )
    order = class_order(total, args.class_order_seed)
    generator = torch.Generator().manual_seed(args.class_order_seed)
    train_labels, test_labels = (
        torch.as_tensor(split.with_format("numpy", columns=[label_column])[:][label_column])
        for split in (train, test)
    )
    tasks = []
    for task in range(spec.num_tasks):
        classes = order[task * spec.classes_per_task : (task + 1) * spec.classes_per_task]
        train_part = _task_split(
            train, train_labels, image_column, classes, args.train_samples_per_task, generator
        )
        test_part = _task_split(
            test, test_labels, image_column, classes, args.test_samples_per_task, generator
        )
        tasks.append(TaskData(classes, *train_part, *test_part))
    return tasks, order
