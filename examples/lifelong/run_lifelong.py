"""Lifelong learning with Lookbehind-SAM (Mordido et al., ICML 2024, Sec. 4.5, Table 2).

Task-incremental Split-CIFAR100 (20 tasks of 5 classes, 3-layer CNN) and Split-TinyImageNet
(40 tasks of 5 classes, 4-layer CNN) in the La-MAML setup (Gupta et al., 2020), plus
Split-CIFAR10 (5 tasks of 2 classes) for quick runs. Methods: SGD, SAM, Multistep-SAM and
Lookbehind-SAM through ``hf_lookbehind.Lookbehind``, each with or without episodic replay
(``--episodic_replay``), and Lookahead-C-MAML / Lookbehind-C-MAML (Algorithms 3-4, ``cmaml.py``).
Each method's defaults are the paper's Table 7 values. After every task, every task's test
accuracy is measured (the accuracy matrix); the run writes ``results.json`` (matrices, average
accuracy and forgetting per seed, mean ± std), prints a table and draws a heatmap per seed.

    python examples/lifelong/run_lifelong.py --benchmark split_cifar100 \\
        --method lookbehind_sam --episodic_replay --seeds 0 1 2 --output_dir out/er_lb

Without the hub it stops at once with the flags for local files and the tiny offline command of
README.md.
"""

from __future__ import annotations

import sys

from hf_lookbehind_recipes.offline import exit_if_hub_unreachable

if __name__ == "__main__":  # without the hub, fail in a second rather than after the imports
    exit_if_hub_unreachable("lifelong", sys.argv[1:])

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from cmaml import cmaml_outer_step
from episodic_memory import ReservoirMemory
from lifelong_data import BENCHMARKS, LifelongDataArguments, TaskData, split_into_tasks
from lifelong_metrics import (
    average_accuracy,
    forgetting,
    format_table,
    plot_accuracy_matrix,
    summarize_seeds,
)
from lifelong_models import MultiHeadCNN
from transformers import HfArgumentParser, set_seed

from hf_lookbehind import Lookbehind
from hf_lookbehind_recipes.cifar_data import NORMALIZATIONS, to_inputs
from hf_lookbehind_recipes.image_data import load_image_splits

# --method -> the engine's method (None: the plain SGD base optimizer)
ENGINE_METHODS = {
    "sgd": None,
    "sam": "sam",
    "multistep_sam": "multistep",
    "lookbehind_sam": "lookbehind",
}
CMAML_METHODS = {"lookahead_cmaml": "lookahead", "lookbehind_cmaml": "lookbehind"}
METHOD_LABELS = {
    "sgd": "SGD",
    "sam": "SAM",
    "multistep_sam": "Multistep-SAM",
    "lookbehind_sam": "Lookbehind-SAM",
    "lookahead_cmaml": "Lookahead-C-MAML",
    "lookbehind_cmaml": "Lookbehind-C-MAML",
}

# The paper's Table 7: {eta}, {eta, rho}, {eta, rho, k}, {eta, rho, k, alpha} per method, keyed
# by (method, episodic replay). Not in Table 7: ER + SGD (SGD's eta is used) and
# Lookahead-C-MAML (the La-MAML code's C-MAML: inner and outer lr 0.075, a batch of 10 split
# into 5 inner steps). Split-CIFAR10 uses the Split-CIFAR100 values.
LA_MAML_GRAD_CLIP = 2.0  # La-MAML's grad_clip_norm default

TABLE_7: dict[str, dict[tuple[str, bool], dict[str, float]]] = {
    "split_cifar100": {
        ("sgd", False): {"learning_rate": 0.03},
        ("sam", False): {"learning_rate": 0.03, "rho": 0.05},
        ("multistep_sam", False): {"learning_rate": 0.01, "rho": 0.01, "k": 2},
        ("lookbehind_sam", False): {"learning_rate": 0.1, "rho": 0.05, "k": 10, "alpha": 0.1},
        ("sgd", True): {"learning_rate": 0.03},
        ("sam", True): {"learning_rate": 0.1, "rho": 0.05},
        ("multistep_sam", True): {"learning_rate": 0.1, "rho": 0.05, "k": 10},
        ("lookbehind_sam", True): {"learning_rate": 0.03, "rho": 0.05, "k": 10, "alpha": 0.2},
        ("lookahead_cmaml", True): {"learning_rate": 0.075, "k": 5},
        ("lookbehind_cmaml", True): {"learning_rate": 0.03, "rho": 0.005, "k": 2, "alpha": 1.0},
    },
    "split_tinyimagenet": {
        ("sgd", False): {"learning_rate": 0.03},
        ("sam", False): {"learning_rate": 0.03, "rho": 0.05},
        ("multistep_sam", False): {"learning_rate": 0.03, "rho": 0.05, "k": 2},
        ("lookbehind_sam", False): {"learning_rate": 0.01, "rho": 0.05, "k": 10, "alpha": 0.1},
        ("sgd", True): {"learning_rate": 0.03},
        ("sam", True): {"learning_rate": 0.03, "rho": 0.1},
        ("multistep_sam", True): {"learning_rate": 0.03, "rho": 0.1, "k": 10},
        ("lookbehind_sam", True): {"learning_rate": 0.01, "rho": 0.1, "k": 5, "alpha": 0.5},
        ("lookahead_cmaml", True): {"learning_rate": 0.075, "k": 5},
        ("lookbehind_cmaml", True): {"learning_rate": 0.03, "rho": 0.1, "k": 2, "alpha": 1.0},
    },
}
TABLE_7["split_cifar10"] = TABLE_7["split_cifar100"]


@dataclass
class MethodArguments:
    method: str = field(
        default="lookbehind_sam",
        metadata={"help": "Learning method.", "choices": [*ENGINE_METHODS, *CMAML_METHODS]},
    )
    episodic_replay: bool = field(
        default=False,
        metadata={
            "help": "Join a replay batch from the episodic memory to every step (ER). The "
            "C-MAML methods always replay (their meta-batch is memory sample + batch)."
        },
    )
    learning_rate: float | None = field(
        default=None, metadata={"help": "eta (inner and outer for C-MAML); default: Table 7."}
    )
    rho: float | None = field(default=None, metadata={"help": "Ascent radius; default: Table 7."})
    k: int | None = field(
        default=None,
        metadata={
            "help": "Inner steps: ascent steps (Multistep/Lookbehind-SAM) or pieces of the "
            "batch (C-MAML); default: Table 7."
        },
    )
    alpha: float | None = field(
        default=None, metadata={"help": "Slow-weight step size in (0, 1]; default: Table 7."}
    )
    first_order: bool = field(
        default=False, metadata={"help": "C-MAML: first-order meta-gradient (no second order)."}
    )
    max_grad_norm: float | None = field(
        default=None,
        metadata={
            "help": "Clip the norm of every descent gradient to this; C-MAML also clamps its "
            "inner gradients to [-c, c] (La-MAML's grad_clip_norm). Default: 2.0 for C-MAML "
            "(La-MAML's value), off for the others (the paper's algorithms print none); 0: off."
        },
    )
    epochs_per_task: int = field(default=10, metadata={"help": "Epochs over each task's data."})
    batch_size: int = field(default=10, metadata={"help": "Incoming batch size (La-MAML: 10)."})
    replay_batch_size: int = field(
        default=10, metadata={"help": "Examples drawn from the memory per step (La-MAML: 10)."}
    )
    memory_size: int = field(
        default=200, metadata={"help": "Episodic memory slots, all tasks together (La-MAML: 200)."}
    )

    def __post_init__(self) -> None:
        if self.method not in ENGINE_METHODS and self.method not in CMAML_METHODS:
            raise ValueError(
                f"unknown method {self.method!r}; allowed: {[*ENGINE_METHODS, *CMAML_METHODS]}"
            )
        for name in ("epochs_per_task", "batch_size", "replay_batch_size", "memory_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_grad_norm is not None and self.max_grad_norm < 0:
            raise ValueError(f"--max_grad_norm must be >= 0 (0: off), got {self.max_grad_norm}")
        if self.first_order and self.method not in CMAML_METHODS:
            raise ValueError("--first_order applies to lookahead_cmaml and lookbehind_cmaml only")

    @property
    def gradient_clip(self) -> float | None:
        """The clipping bound in force, ``None`` when off."""
        default = LA_MAML_GRAD_CLIP if self.method in CMAML_METHODS else 0.0
        bound = default if self.max_grad_norm is None else self.max_grad_norm
        return bound or None

    @property
    def uses_memory(self) -> bool:
        return self.episodic_replay or self.method in CMAML_METHODS

    def label(self) -> str:
        prefix = "ER + " if self.episodic_replay and self.method in ENGINE_METHODS else ""
        suffix = " (first-order)" if self.first_order else ""
        return prefix + METHOD_LABELS[self.method] + suffix

    def hyperparameters(self, benchmark: str) -> dict[str, float]:
        """Table 7's values for this method, overridden by the flags given; checked."""
        settings = dict(TABLE_7[benchmark][(self.method, self.uses_memory)])
        for name in ("learning_rate", "rho", "k", "alpha"):
            if getattr(self, name) is not None:
                settings[name] = getattr(self, name)
        if settings["learning_rate"] <= 0:
            raise ValueError(f"--learning_rate must be positive, got {settings['learning_rate']}")
        if settings.get("rho", 1.0) <= 0:
            raise ValueError(f"--rho must be positive, got {settings['rho']}")
        if int(settings.get("k", 1)) != settings.get("k", 1) or settings.get("k", 1) < 1:
            raise ValueError(f"--k must be a positive integer, got {settings['k']}")
        if not 0 < settings.get("alpha", 1.0) <= 1:
            raise ValueError(f"--alpha must be in (0, 1], got {settings['alpha']}")
        if self.method in CMAML_METHODS and settings["k"] > self.batch_size:
            raise ValueError(
                f"C-MAML splits each batch into k pieces: k={settings['k']} needs "
                f"--batch_size >= k, got {self.batch_size}"
            )
        return settings


@dataclass
class RunArguments:
    output_dir: str = field(default="out/lifelong", metadata={"help": "Where results go."})
    seeds: list[int] = field(default_factory=lambda: [0], metadata={"help": "Run seeds."})
    device: str = field(default="auto", metadata={"help": "auto (cuda if available), cpu, cuda."})
    cnn_channels: int = field(
        default=160, metadata={"help": "Channels of each convolution (La-MAML: 160)."}
    )
    eval_batch_size: int = field(default=1000, metadata={"help": "Evaluation batch size."})


class Learner:
    """Trains the model on one incoming batch (plus a replay sample) per call."""

    def __init__(self, model: MultiHeadCNN, method_args: MethodArguments, settings: dict) -> None:
        self.model, self.method, self.settings = model, method_args.method, settings
        self.first_order = method_args.first_order
        self.max_grad_norm = method_args.gradient_clip
        if self.method in ENGINE_METHODS:
            self.optimizer = torch.optim.SGD(model.parameters(), lr=settings["learning_rate"])
            engine_method = ENGINE_METHODS[self.method]
            if engine_method is not None:
                self.optimizer = Lookbehind(
                    self.optimizer,
                    method=engine_method,
                    rho=settings["rho"],
                    max_grad_norm=self.max_grad_norm,
                    **{name: settings[name] for name in ("k", "alpha") if name in settings},
                )

    def step(self, current: tuple, replay: tuple | None) -> None:
        joined = current if replay is None else tuple(map(torch.cat, zip(replay, current)))
        if self.method in CMAML_METHODS:
            pieces = list(zip(*(part.tensor_split(self.settings["k"]) for part in current)))
            cmaml_outer_step(
                self.model,
                [piece for piece in pieces if len(piece[0])],
                joined,
                algorithm=CMAML_METHODS[self.method],
                lr=self.settings["learning_rate"],
                rho=self.settings.get("rho", 0.0),
                alpha=self.settings.get("alpha", 1.0),
                first_order=self.first_order,
                grad_clip=self.max_grad_norm,
            )
            return
        images, labels, tasks = joined

        def closure() -> torch.Tensor:
            loss = F.cross_entropy(self.model(images, tasks), labels)
            loss.backward()
            return loss

        self.optimizer.zero_grad()
        if isinstance(self.optimizer, Lookbehind):
            self.optimizer.step(closure)  # clips every descent gradient itself
            return
        closure()
        if self.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
        self.optimizer.step()


def on_device(batch: tuple, normalization, device: torch.device) -> tuple:
    """(uint8 images, labels, tasks) -> (normalised inputs, labels, tasks) on ``device``."""
    images, labels, tasks = batch
    return to_inputs(images, normalization).to(device), labels.to(device), tasks.to(device)


@torch.no_grad()
def evaluate(
    model: MultiHeadCNN, tasks: Sequence[TaskData], normalization, device, batch_size: int
) -> list[float]:
    """Test accuracy on every task, each scored by its own head."""
    model.eval()
    accuracies = []
    for index, task in enumerate(tasks):
        correct = 0
        for images, labels in zip(
            task.test_images.split(batch_size), task.test_labels.split(batch_size)
        ):
            inputs = to_inputs(images, normalization).to(device)
            heads = torch.full((len(images),), index, device=device)
            correct += (model(inputs, heads).argmax(1).cpu() == labels).sum().item()
        accuracies.append(correct / len(task.test_labels))
    model.train()
    return accuracies


def train_sequence(
    tasks: Sequence[TaskData],
    data_args: LifelongDataArguments,
    method_args: MethodArguments,
    run_args: RunArguments,
    seed: int,
    device: torch.device,
) -> dict:
    """Train on the tasks in order with one seed; the accuracy matrix and the metrics."""
    set_seed(seed)
    spec = BENCHMARKS[data_args.benchmark]
    normalization = NORMALIZATIONS[spec.normalization]
    model = MultiHeadCNN(
        spec.architecture,
        spec.num_tasks,
        spec.classes_per_task,
        image_size=tasks[0].train_images.shape[-1],
        channels=run_args.cnn_channels,
    ).to(device)
    learner = Learner(model, method_args, method_args.hyperparameters(data_args.benchmark))
    generator = torch.Generator().manual_seed(seed)
    memory = None
    if method_args.uses_memory:
        memory = ReservoirMemory(method_args.memory_size, generator)
    matrix, train_seconds = [], 0.0
    started, cpu_started = time.perf_counter(), time.process_time()
    for task_id, task in enumerate(tasks):
        task_started = time.perf_counter()
        for epoch in range(method_args.epochs_per_task):
            order = torch.randperm(len(task.train_labels), generator=generator)
            for indices in order.split(method_args.batch_size):
                images, labels = task.train_images[indices], task.train_labels[indices]
                task_ids = torch.full((len(indices),), task_id)
                replay = memory.sample(method_args.replay_batch_size) if memory else None
                learner.step(
                    on_device((images, labels, task_ids), normalization, device),
                    None if replay is None else on_device(replay, normalization, device),
                )
                if memory is not None and epoch == 0:  # the stream: each example offered once
                    memory.push(images, labels, task_ids)
        train_seconds += time.perf_counter() - task_started
        matrix.append(evaluate(model, tasks, normalization, device, run_args.eval_batch_size))
        print(
            f"seed {seed}, after task {task_id}: accuracies "
            f"{' '.join(f'{100 * a:.1f}' for a in matrix[-1])}",
            flush=True,
        )
    return {
        "seed": seed,
        "accuracy_matrix": matrix,
        "average_accuracy": average_accuracy(matrix),
        "forgetting": forgetting(matrix),
        "train_seconds": train_seconds,
        "wall_seconds": time.perf_counter() - started,
        "cpu_seconds": time.process_time() - cpu_started,
    }


def build_parser() -> HfArgumentParser:
    """The recipe's command line: data, method and run arguments."""
    return HfArgumentParser((LifelongDataArguments, MethodArguments, RunArguments))


def main(argv: Sequence[str] | None = None) -> dict:
    data_args, method_args, run_args = build_parser().parse_args_into_dataclasses(args=argv)
    settings = method_args.hyperparameters(data_args.benchmark)  # fails before any data loads
    exit_if_hub_unreachable("lifelong", sys.argv[1:] if argv is None else argv)
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu")
        if run_args.device == "auto"
        else run_args.device
    )
    train, test = load_image_splits(data_args, seed=data_args.class_order_seed)
    tasks, order = split_into_tasks(train, test, data_args)
    output_dir = Path(run_args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    label = method_args.label()
    runs = []
    for seed in run_args.seeds:
        run = train_sequence(tasks, data_args, method_args, run_args, seed, device)
        plot_accuracy_matrix(
            run["accuracy_matrix"],
            f"{label}, {data_args.benchmark}, seed {seed}",
            output_dir / f"accuracy_matrix_seed{seed}.png",
        )
        runs.append(run)
        print(
            f"{label} seed {seed}: average accuracy {100 * run['average_accuracy']:.2f}%, "
            f"forgetting {100 * run['forgetting']:.2f}%, {run['wall_seconds']:.0f} s wall, "
            f"{run['cpu_seconds']:.0f} s CPU"
        )
    results = {
        "label": label,
        "benchmark": data_args.benchmark,
        "method": method_args.method,
        "episodic_replay": method_args.uses_memory,
        "hyperparameters": settings,
        "max_grad_norm": method_args.gradient_clip,
        "arguments": {**asdict(data_args), **asdict(method_args), **asdict(run_args)},
        "class_order": order,
        "task_classes": [task.classes for task in tasks],
        "train_examples_per_task": [len(task.train_labels) for task in tasks],
        "test_examples_per_task": [len(task.test_labels) for task in tasks],
        "device": str(device),
        "torch_threads": torch.get_num_threads(),
        "runs": runs,
        "summary": summarize_seeds(runs),
    }
    (output_dir / "results.json").write_text(json.dumps(results, indent=1))
    print(format_table([(label, results)]))
    return results


if __name__ == "__main__":
    main()
