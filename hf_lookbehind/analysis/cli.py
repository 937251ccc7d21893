"""Command-line entry points of the analysis tools. Each writes ``<tool>.json`` and
``<tool>.png`` into ``--output_dir`` (``lookbehind-<tool> --help`` for the options, or
``python -m hf_lookbehind.analysis <tool> --help``). They return nothing, as console scripts
must; the results are in the JSON file."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .compute import (
    compare_at_equal_performance,
    compute_curves_to_dict,
    metric_against_computations,
)
from .curves import (
    curves_to_dict,
    load_log_history,
    tradeoff_points,
    training_curves,
)
from .data import image_classification_loader, load_classifier, load_split
from .noise import noisy_weight_robustness
from .sharpness import NEIGHBOURHOODS, SharpnessResult, m_sharpness
from .sweep import collect_sweep, launch_sweep, read_metric

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def labelled(values: Sequence[str]) -> dict[str, str]:
    """``LABEL=VALUE`` or ``VALUE`` (labelled by its file or folder name) -> ``{label: value}``."""
    result = {}
    for item in values:
        label, sep, value = item.partition("=")
        if not sep:
            label, value = Path(item.rstrip("/")).stem, item
        if label in result:
            raise ValueError(f"label {label!r} is used twice; name the runs with LABEL=VALUE")
        result[label] = value
    return result


def write_json(path: Path, payload: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


def _add_model_and_data_arguments(parser: argparse.ArgumentParser, split: str) -> None:
    models = parser.add_argument_group("models")
    models.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[LABEL=]NAME_OR_PATH",
        help="A model to analyse (repeat for several): a Hugging Face image classifier (hub "
        "name or local directory), or the argument of --model_factory.",
    )
    models.add_argument(
        "--model_factory",
        metavar="MODULE:FUNCTION",
        help="Builds each --model from its path: 'package.module:function' or "
        "'path/to/file.py:function' returning an nn.Module (or a tuple starting with one).",
    )
    models.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        required=True,
        help="Hub dataset name, local dataset folder, or one parquet/csv/json/arrow file.",
    )
    data.add_argument("--split", default=split, help="Split of a hub dataset or folder.")
    data.add_argument("--image_column", help="Default: the Image column.")
    data.add_argument("--label_column", help="Default: the ClassLabel column.")
    data.add_argument(
        "--image_mean",
        type=float,
        nargs=3,
        default=IMAGENET_MEAN,
        help="Per-channel mean for --model_factory models (default: the pretrained CIFAR "
        "ResNet-20/56 checkpoints' ImageNet statistics).",
    )
    data.add_argument("--image_std", type=float, nargs=3, default=IMAGENET_STD)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output_dir", type=Path, required=True)


def _loader(args, name_or_path: str, dataset, **options):
    if args.model_factory is not None:
        preprocessing = {"normalization": (args.image_mean, args.image_std)}
    else:
        from transformers import AutoImageProcessor

        preprocessing = {"image_processor": AutoImageProcessor.from_pretrained(name_or_path)}
    return image_classification_loader(
        dataset,
        image_column=args.image_column,
        label_column=args.label_column,
        seed=args.seed,
        **preprocessing,
        **options,
    )


def sharpness_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lookbehind-sharpness",
        description="m-sharpness (eq. 5, or eq. 6 for ASAM) against the radius r: the mean and "
        "std over n minibatches of m training examples, one line per model (Figure 3).",
    )
    _add_model_and_data_arguments(parser, split="train")
    parser.add_argument("--radii", type=float, nargs="+", default=[0.01, 0.02, 0.05, 0.1, 0.2])
    parser.add_argument("--neighbourhood", choices=NEIGHBOURHOODS, default="sam")
    parser.add_argument("--asam_eta", type=float, default=0.01)
    parser.add_argument(
        "--asam_all_params",
        action="store_true",
        help="ASAM rescales every parameter (default: only those named *weight*).",
    )
    parser.add_argument("--batch_size", type=int, default=128, help="m, examples per minibatch.")
    parser.add_argument("--num_batches", type=int, default=16, help="n, minibatches.")
    parser.add_argument(
        "--ascent_steps",
        type=int,
        default=10,
        help="Gradient evaluations of the projected ascent per minibatch and radius.",
    )
    parser.add_argument(
        "--ascent_step_size", type=float, default=1.0, help="Ascent step length, a fraction of r."
    )
    args = parser.parse_args(argv)
    dataset = load_split(args.dataset, args.split)
    results = {}
    for label, name_or_path in labelled(args.model).items():
        model = load_classifier(name_or_path, args.model_factory).to(args.device)
        batches = _loader(
            args,
            name_or_path,
            dataset,
            batch_size=args.batch_size,
            max_samples=args.batch_size * args.num_batches,
            shuffle=True,
        )
        results[label] = m_sharpness(
            model,
            batches,
            args.radii,
            neighbourhood=args.neighbourhood,
            num_batches=args.num_batches,
            ascent_steps=args.ascent_steps,
            step_size=args.ascent_step_size,
            asam_eta=args.asam_eta,
            asam_weights_only=not args.asam_all_params,
            seed=args.seed,
        )
    from .plotting import plot_sharpness

    write_json(args.output_dir / "sharpness.json", {k: r.to_dict() for k, r in results.items()})
    plot_sharpness(results, args.output_dir / "sharpness.png")


def noise_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lookbehind-noise",
        description="Accuracy with noisy weights w * N(1, sigma^2) after recomputing the "
        "BatchNorm statistics on training batches: mean and std over noise draws per sigma, "
        "one line per model (Sec. 4.4, Figure 4).",
    )
    _add_model_and_data_arguments(parser, split="test")
    parser.add_argument(
        "--calibration_dataset",
        help="Training data for the BatchNorm statistics (default: --dataset with "
        "--calibration_split; required when --dataset is a single file).",
    )
    parser.add_argument("--calibration_split", default="train")
    parser.add_argument("--max_eval_samples", type=int, help="A random subset (seeded).")
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--calibration_batch_size", type=int, default=128)
    parser.add_argument("--calibration_batches", type=int, default=50)
    parser.add_argument(
        "--sigmas", type=float, nargs="+", default=[0.0, 0.02, 0.04, 0.06, 0.08, 0.1]
    )
    parser.add_argument("--draws", type=int, default=5)
    args = parser.parse_args(argv)
    calibration_dataset = args.calibration_dataset or args.dataset
    if calibration_dataset == args.dataset and Path(args.dataset).is_file():
        parser.error("a single data file is one split: pass --calibration_dataset (training data)")
    eval_split = load_split(args.dataset, args.split)
    calibration_split = load_split(calibration_dataset, args.calibration_split)
    results = {}
    for label, name_or_path in labelled(args.model).items():
        model = load_classifier(name_or_path, args.model_factory).to(args.device)
        eval_batches = _loader(
            args,
            name_or_path,
            eval_split,
            batch_size=args.batch_size,
            max_samples=args.max_eval_samples,
        )
        calibration_batches = _loader(
            args,
            name_or_path,
            calibration_split,
            batch_size=args.calibration_batch_size,
            max_samples=args.calibration_batch_size * args.calibration_batches,
            shuffle=True,
        )
        results[label] = noisy_weight_robustness(
            model,
            eval_batches,
            calibration_batches,
            args.sigmas,
            draws=args.draws,
            num_calibration_batches=args.calibration_batches,
            seed=args.seed,
        )
    from .plotting import plot_noise_robustness

    write_json(args.output_dir / "noise.json", {k: r.to_dict() for k, r in results.items()})
    plot_noise_robustness(results, args.output_dir / "noise.png")


def curves_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lookbehind-curves",
        description="alpha (Figure 10), loss, accuracy, ascent gradient norm and perturbation "
        "distance over training, from the trainer_state.json of Trainer output directories.",
    )
    parser.add_argument(
        "runs", nargs="+", metavar="[LABEL=]OUTPUT_DIR", help="Trainer output directories."
    )
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = {
        label: training_curves(load_log_history(run)) for label, run in labelled(args.runs).items()
    }
    from .plotting import plot_training_curves

    write_json(args.output_dir / "curves.json", curves_to_dict(runs))
    plot_training_curves(runs, args.output_dir / "curves.png")


def tradeoff_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lookbehind-tradeoff",
        description="Loss-sharpness trade-off (Figure 1): one labelled point per run, x = its "
        "m-sharpness at --radius, y = --metric.",
    )
    parser.add_argument(
        "--sharpness_json",
        type=Path,
        nargs="+",
        required=True,
        help="sharpness.json files written by lookbehind-sharpness (their labels are the runs).",
    )
    parser.add_argument("--radius", type=float, required=True)
    parser.add_argument(
        "--metric",
        default="base_loss",
        help="base_loss (the loss L(w) on the sharpness minibatches) or a key of each run's "
        "all_results.json (e.g. eval_accuracy, train_loss), read from --run_dir.",
    )
    parser.add_argument(
        "--run_dir",
        action="append",
        default=[],
        metavar="LABEL=OUTPUT_DIR",
        help="The output directory of each run, for metrics other than base_loss.",
    )
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    sharpness: dict[str, SharpnessResult] = {}
    for path in args.sharpness_json:
        for label, data in json.loads(path.read_text()).items():
            sharpness[label] = SharpnessResult.from_dict(data)
    if args.metric == "base_loss":
        values = {label: result.base_loss for label, result in sharpness.items()}
    else:
        values = {label: read_metric(d, args.metric) for label, d in labelled(args.run_dir).items()}
    points = tradeoff_points(sharpness, args.radius, values)
    from .plotting import plot_tradeoff

    write_json(args.output_dir / "tradeoff.json", [vars(point) for point in points])
    plot_tradeoff(
        points,
        args.output_dir / "tradeoff.png",
        xlabel=f"m-sharpness at r = {args.radius}",
        ylabel=args.metric,
    )


def sweep_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lookbehind-sweep",
        description="alpha x k sensitivity grid (Figure 7): launch the runs one after the other "
        "(skipping finished ones) or only collect them, then draw the heatmap of the accuracy "
        "relative to a baseline run. Arguments after '--' are appended to every command.",
    )
    parser.add_argument("--output_root", type=Path, required=True)
    parser.add_argument("--alphas", nargs="+", default=["0.2", "0.5", "0.8"])
    parser.add_argument("--ks", type=int, nargs="+", default=[2, 5, 10])
    parser.add_argument(
        "--template",
        help="The command that trains one cell, with the fields {alpha}, {k} and {output_dir} "
        "(replaced by each cell's values); needed unless --collect_only.",
    )
    parser.add_argument("--collect_only", action="store_true", help="Launch nothing.")
    parser.add_argument("--baseline_dir", type=Path, help="Output directory of the baseline run.")
    parser.add_argument("--metric", default="eval_accuracy")
    parser.add_argument("--output_dir", type=Path, help="Default: --output_root.")
    argv = list(argv) if argv is not None else sys.argv[1:]
    extra_args = argv[argv.index("--") + 1 :] if "--" in argv else []
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if not args.collect_only:
        if args.template is None:
            parser.error("--template (the command of one run) is needed to launch the sweep")
        launch_sweep(
            args.alphas, args.ks, args.output_root, template=args.template, extra_args=extra_args
        )
    grid = collect_sweep(args.output_root, metric=args.metric, baseline_dir=args.baseline_dir)
    from .plotting import plot_sweep_heatmap

    output_dir = args.output_dir or args.output_root
    write_json(output_dir / "sweep.json", grid.to_dict())
    plot_sweep_heatmap(grid, output_dir / "sweep.png")


def compute_main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="lookbehind-compute",
        description="A metric against the gradient computations (forward/backward passes) that "
        "LookbehindTrainer logs, one line per run, and the computations at which each run first "
        "reaches the reference run's best value, as a fraction of the reference's (Table 10).",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="[LABEL=]OUTPUT_DIR",
        help="Trainer output directories (or their trainer_state.json).",
    )
    parser.add_argument(
        "--metric",
        default="eval_accuracy",
        help="A key of the evaluation entries, e.g. eval_accuracy, eval_top5, eval_bleu.",
    )
    parser.add_argument(
        "--reference", help="Label of the reference run (Table 10: Multistep); default the first."
    )
    parser.add_argument(
        "--target",
        type=float,
        help="The value to reach instead of the reference's best (the reference must reach it).",
    )
    parser.add_argument(
        "--lower_is_better", action="store_true", help="For losses: reach at most the target."
    )
    parser.add_argument("--output_dir", type=Path, required=True)
    args = parser.parse_args(argv)
    runs = labelled(args.runs)
    curves = {
        label: metric_against_computations(load_log_history(run), args.metric)
        for label, run in runs.items()
    }
    reference = args.reference or next(iter(runs))
    comparison = compare_at_equal_performance(
        curves,
        reference,
        metric=args.metric,
        target=args.target,
        greater_is_better=not args.lower_is_better,
    )
    from .plotting import plot_metric_against_computations

    write_json(
        args.output_dir / "compute.json",
        {**comparison.to_dict(), "curves": compute_curves_to_dict(curves)},
    )
    plot_metric_against_computations(
        curves, args.output_dir / "compute.png", metric=args.metric, comparison=comparison
    )
