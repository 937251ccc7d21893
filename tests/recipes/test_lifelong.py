"""The lifelong-learning recipe (examples/lifelong): the paper's metrics on a hand-made
accuracy matrix, the episodic memory's reservoir sampling, the La-MAML CNNs, the class-to-task
split, gradient clipping and argument checks (the runs on real images: test_lifelong_runs.py)."""

from __future__ import annotations

import math
import re

import datasets
import numpy as np
import pytest
import torch
from episodic_memory import ReservoirMemory
from helpers import ROOT
from lifelong_data import LifelongDataArguments, class_order, split_into_tasks
from lifelong_metrics import average_accuracy, forgetting, format_table, summarize_seeds
from lifelong_models import MultiHeadCNN
from PIL import Image
from run_lifelong import Learner, MethodArguments, build_parser

# a[t][tau]: rows after training task t, columns task tau
MATRIX = [
    [0.90, 0.10, 0.20],
    [0.70, 0.80, 0.30],
    [0.60, 0.85, 0.95],
]


def test_average_accuracy_is_the_mean_of_the_last_row():
    assert average_accuracy(MATRIX) == pytest.approx((0.60 + 0.85 + 0.95) / 3)


def test_forgetting_is_the_mean_largest_drop_to_the_last_row():
    # task 0: best before the end 0.90, now 0.60 -> 0.30; task 1: best 0.80, now 0.85 -> -0.05
    assert forgetting(MATRIX) == pytest.approx((0.30 - 0.05) / 2)
    assert forgetting([[0.7]]) == 0.0


def test_summary_over_seeds_and_table():
    runs = [
        {"seed": 0, "average_accuracy": 0.6, "forgetting": 0.1, "wall_seconds": 10.0},
        {"seed": 1, "average_accuracy": 0.8, "forgetting": 0.3, "wall_seconds": 20.0},
    ]
    summary = summarize_seeds(runs)
    assert summary["average_accuracy_mean"] == pytest.approx(0.7)
    assert summary["average_accuracy_std"] == pytest.approx(0.1)  # population std
    assert summary["forgetting_std"] == pytest.approx(0.1)
    table = format_table([("ER + SGD", {"summary": summary, "runs": runs})])
    assert "| ER + SGD | 70.00 ± 10.00 | 20.00 ± 10.00 | 0, 1 | 15 |" in table


def _stream(n: int):
    images = torch.arange(n, dtype=torch.float32).view(n, 1, 1, 1).expand(n, 3, 2, 2)
    return images, torch.arange(n) % 5, torch.arange(n) // 4


def test_memory_fills_to_capacity_and_keeps_examples_whole():
    memory = ReservoirMemory(3, torch.Generator().manual_seed(0))
    assert memory.sample(2) is None
    images, labels, tasks = _stream(10)
    memory.push(images[:2], labels[:2], tasks[:2])
    assert len(memory) == 2 and memory.labels.tolist() == [0, 1]
    memory.push(images[2:], labels[2:], tasks[2:])
    assert len(memory) == 3 and memory.seen == 10
    index = memory.images[:, 0, 0, 0].long()  # which stream example each slot holds
    assert torch.equal(memory.labels, labels[index]) and torch.equal(memory.tasks, tasks[index])
    drawn_images, drawn_labels, _ = memory.sample(5)
    assert len(drawn_labels) == 3  # at most what the memory holds, without repetition
    assert sorted(drawn_images[:, 0, 0, 0].tolist()) == sorted(index.tolist())
    with pytest.raises(ValueError, match="positive integer"):
        ReservoirMemory(0)


def test_reservoir_keeps_every_seen_example_with_equal_probability():
    """After n pushes, each of the n examples is in memory with probability capacity / n."""
    capacity, n, trials = 3, 8, 6_000
    images, labels, tasks = _stream(n)
    kept = torch.zeros(n)
    generator = torch.Generator().manual_seed(0)
    for _ in range(trials):
        memory = ReservoirMemory(capacity, generator)
        for i in range(n):  # one example at a time and in one batch are the same stream
            memory.push(images[i : i + 1], labels[i : i + 1], tasks[i : i + 1])
        kept[memory.images[:, 0, 0, 0].long()] += 1
    frequency = kept / trials
    tolerance = 5 * math.sqrt(capacity / n * (1 - capacity / n) / trials)
    assert (frequency - capacity / n).abs().max() < tolerance, frequency


def _lamaml_parameters(convolutions: int, hidden: int, outputs: int, channels: int = 160) -> int:
    """Parameter count of La-MAML's ``pc_cnn`` config (modelfactory.py): 3x3 convolutions with
    bias, then linear 16 * channels -> hidden -> hidden -> outputs."""
    conv = (3 * 9 + 1) * channels + (convolutions - 1) * (channels * 9 + 1) * channels
    return conv + (16 * channels + 1) * hidden + (hidden + 1) * hidden + (hidden + 1) * outputs


@pytest.mark.parametrize(
    ("architecture", "tasks", "size", "convolutions", "hidden"),
    [("cnn3", 20, 32, 3, 320), ("cnn4", 40, 64, 4, 640)],
)
def test_cnn_matches_lamaml_architecture(architecture, tasks, size, convolutions, hidden):
    model = MultiHeadCNN(architecture, tasks, 5, image_size=size)
    count = sum(p.numel() for p in model.parameters())
    assert count == _lamaml_parameters(convolutions, hidden, tasks * 5)


def test_each_example_is_scored_by_its_own_task_head():
    torch.manual_seed(0)
    model = MultiHeadCNN("cnn3", 4, 2, image_size=32, channels=8)
    images = torch.randn(3, 3, 32, 32)
    tasks = torch.tensor([2, 0, 2])
    logits = model(images, tasks)
    all_heads = model.heads(model.features(images)).view(3, 4, 2)
    torch.testing.assert_close(logits, all_heads[[0, 1, 2], [2, 0, 2]])
    with torch.no_grad():
        model.heads.weight[2:4].add_(1.0)  # task 1's head only
        torch.testing.assert_close(model(images, tasks), logits)
    with pytest.raises(ValueError, match="unknown architecture 'cnn5'"):
        MultiHeadCNN("cnn5", 4, 2, image_size=32)


def _tiny_image_dataset(labels: list[int]) -> datasets.Dataset:
    images = [Image.fromarray(np.full((4, 4, 3), label * 20, dtype=np.uint8)) for label in labels]
    features = datasets.Features(
        {"img": datasets.Image(), "label": datasets.ClassLabel(num_classes=10)}
    )
    return datasets.Dataset.from_dict({"img": images, "label": labels}, features=features)


def test_tasks_get_the_recorded_classes_with_within_task_labels():
    train = _tiny_image_dataset([c for c in range(10) for _ in range(6)])
    test = _tiny_image_dataset([c for c in range(10) for _ in range(3)])
    args = LifelongDataArguments(
        benchmark="split_cifar10",
        train_path="x.parquet",
        validation_path="y.parquet",
        train_samples_per_task=8,
    )
    tasks, order = split_into_tasks(train, test, args)
    assert order == class_order(10, 0) and sorted(order) == list(range(10))
    assert [task.classes for task in tasks] == [order[2 * t : 2 * t + 2] for t in range(5)]
    for task in tasks:
        assert task.train_labels.tolist() == [0] * 4 + [1] * 4  # 8 per task, equal per class
        assert task.test_labels.tolist() == [0] * 3 + [1] * 3  # all test images
        pixel = task.train_images[:, 0, 0, 0].long()
        torch.testing.assert_close(pixel, torch.tensor(task.classes)[task.train_labels] * 20)
    assert class_order(10, 1) != order


def test_table_7_defaults_and_overrides():
    er_lookbehind = MethodArguments(method="lookbehind_sam", episodic_replay=True)
    assert er_lookbehind.hyperparameters("split_tinyimagenet") == {
        "learning_rate": 0.01,
        "rho": 0.1,
        "k": 5,
        "alpha": 0.5,
    }
    assert er_lookbehind.label() == "ER + Lookbehind-SAM"
    tuned = MethodArguments(method="lookbehind_cmaml", rho=0.05, first_order=True)
    assert tuned.hyperparameters("split_cifar100") == {
        "learning_rate": 0.03,
        "rho": 0.05,
        "k": 2,
        "alpha": 1.0,
    }
    assert tuned.uses_memory and tuned.label() == "Lookbehind-C-MAML (first-order)"


@pytest.mark.parametrize("method", ["sgd", "sam"])
def test_max_grad_norm_clips_the_descent_gradient(method):
    """One SGD step (SAM: its descent at the perturbed point) with the gradient norm clipped."""
    torch.manual_seed(0)
    model = MultiHeadCNN("cnn3", 2, 2, image_size=8, channels=4).double()
    batch = (torch.randn(6, 3, 8, 8, dtype=torch.float64), torch.tensor([0, 1] * 3),
             torch.tensor([0, 1, 1, 0, 0, 1]))  # fmt: skip
    before = [p.detach().clone() for p in model.parameters()]
    loss_at = lambda: torch.nn.functional.cross_entropy(model(batch[0], batch[2]), batch[1])  # noqa: E731
    if method == "sam":  # move to the SAM point rho g / ||g||
        gradient = torch.autograd.grad(loss_at(), list(model.parameters()))
        norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in gradient]))
        with torch.no_grad():
            for p, g in zip(model.parameters(), gradient):
                p.add_(0.05 * g / norm)
    gradient = torch.autograd.grad(loss_at(), list(model.parameters()))
    norm = torch.linalg.vector_norm(torch.stack([g.norm() for g in gradient])).item()
    assert norm > 0.01
    expected = [b - 0.1 * 0.01 / (norm + 1e-6) * g for b, g in zip(before, gradient)]
    with torch.no_grad():
        for p, b in zip(model.parameters(), before):
            p.copy_(b)
    args = MethodArguments(method=method, learning_rate=0.1, rho=0.05, max_grad_norm=0.01)
    Learner(model, args, args.hyperparameters("split_cifar10")).step(batch, None)
    for p, e in zip(model.parameters(), expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=1e-10)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        ({"method": "adam"}, "unknown method 'adam'"),
        ({"method": "sgd", "first_order": True}, "--first_order applies"),
        ({"method": "sam", "rho": 0.0}, "--rho must be positive"),
        ({"method": "lookbehind_sam", "alpha": 1.5}, r"--alpha must be in \(0, 1\]"),
        ({"method": "lookahead_cmaml", "k": 20}, "needs --batch_size >= k"),
        ({"method": "sgd", "memory_size": 0}, "--memory_size must be a positive integer"),
        ({"method": "lookahead_cmaml", "max_grad_norm": -1.0}, "--max_grad_norm must be >= 0"),
    ],
)
def test_bad_method_settings_fail_before_training(flags, message):
    with pytest.raises(ValueError, match=message):
        MethodArguments(**flags).hyperparameters("split_cifar100")


def test_bad_data_settings_fail_when_parsed():
    with pytest.raises(ValueError, match="unknown benchmark"):
        LifelongDataArguments(benchmark="split_mnist")
    with pytest.raises(ValueError, match="at least the 5 classes"):
        LifelongDataArguments(train_samples_per_task=3)


def test_every_flag_in_the_readme_is_a_recipe_flag():
    """The README's ``--flags`` are the ones run_lifelong.py parses (argparse would also take an
    unambiguous prefix, so the test compares whole option strings)."""
    readme = ROOT / "examples" / "lifelong" / "README.md"
    mentioned = set(re.findall(r"(?<![\w-])--[a-z][a-z0-9_]*", readme.read_text()))
    assert {"--method", "--max_grad_norm", "--episodic_replay"} <= mentioned
    unknown = mentioned - set(build_parser()._option_string_actions)
    assert not unknown, f"flags in examples/lifelong/README.md that the recipe lacks: {unknown}"
