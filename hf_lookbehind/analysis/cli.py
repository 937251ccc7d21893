"""Command-line entry points of the analysis tools. Each writes ``<tool>.json`` and
``<tool>.png`` into ``--output_dir`` (``lookbehind-<tool> --help`` for the options, or
``python -m hf_lookbehind.analysis <tool> --help``), then prints the paths it wrote and a
one-line summary of the result. They return nothing, as console scripts must; the results are
in the JSON file."""

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


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default after its help, except where there is none to
    show (required options, and those whose help says what an unset value means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=HelpFormatter
    )


def _number(value: float) -> str:
    return f"{value:.4g}"


def report(written: Sequence[Path], summary: str) -> None:
    """What a command prints on success: the files it wrote, then one line of summary."""
    print(f"wrote {', '.join(str(path) for path in written)}")
    print(summary)


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
        "'path/to/file.py:function' returning an nn.Module (or a tuple starting with one). "
        "Default: none, every --model is a Hugging Face image classifier.",
    )
    models.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="Where the models run (cuda when it is available).",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        required=True,
        help="Hub dataset name, local dataset folder, or one parquet/csv/json/arrow file.",
    )
    data.add_argument("--split", default=split, help="Split of a hub dataset or folder.")
    data.add_argument("--image_column", help="Image column. Default: the column of type Image.")
    data.add_argument(
        "--label_column", help="Label column. Default: the column of type ClassLabel."
    )
    data.add_argument(
        "--image_mean",
        type=float,
        nargs=3,
        default=IMAGENET_MEAN,
        metavar=("R", "G", "B"),
        help="Per-channel mean of the inputs of --model_factory models. The default is the "
        "ImageNet statistics of the pretrained CIFAR ResNet-20/56 checkpoints; a model trained "
        "by examples/cifar/run_cifar.py needs CIFAR-10's: 0.4914 0.4822 0.4465.",
    )
    data.add_argument(
        "--image_std",
        type=float,
        nargs=3,
        default=IMAGENET_STD,
        metavar=("R", "G", "B"),
        help="Per-channel std of the inputs of --model_factory models (CIFAR-10's: 0.2471 "
        "0.2435 0.2616).",
    )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the minibatch draws.")
    parser.add_argument(
        "--output_dir", type=Path, required=True, help="Where the JSON and PNG files go."
    )


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


def sharpness_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "lookbehind-sharpness",
        "m-sharpness (eq. 5, or eq. 6 for ASAM) against the radius r: the mean and std over n "
        "minibatches of m training examples, one line per model (Figure 3).",
    )
    _add_model_and_data_arguments(parser, split="train")
    parser.add_argument(
        "--radii",
        type=float,
        nargs="+",
        default=[0.01, 0.02, 0.05, 0.1, 0.2],
        metavar="R",
        help="Radii r of the neighbourhood.",
    )
    parser.add_argument(
        "--neighbourhood",
        choices=NEIGHBOURHOODS,
        default="sam",
        help="sam: the L2 ball (eq. 5); asam: the ball scaled by |w| + eta (eq. 6).",
    )
    parser.add_argument("--asam_eta", type=float, default=0.01, help="eta of the ASAM scaling.")
    parser.add_argument(
        "--asam_all_params",
        action="store_true",
        help="ASAM rescales every parameter, not only those named *weight*.",
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
    return parser


def sharpness_main(argv: Sequence[str] | None = None) -> None:
    args = sharpness_parser().parse_args(argv)
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

    paths = (args.output_dir / "sharpness.json", args.output_dir / "sharpness.png")
    write_json(paths[0], {k: r.to_dict() for k, r in results.items()})
    plot_sharpness(results, paths[1])
    largest = max(args.radii)
    at_largest = ", ".join(
        f"{label} {_number(r.mean[r.radii.index(largest)])}" for label, r in results.items()
    )
    report(
        paths,
        f"sharpness: {len(results)} model(s) at {len(args.radii)} radii; m-sharpness at "
        f"r = {_number(largest)}: {at_largest}",
    )


def noise_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "lookbehind-noise",
        "Accuracy with noisy weights w * N(1, sigma^2) after recomputing the BatchNorm "
        "statistics on training batches: mean and std over noise draws per sigma, one line per "
        "model (Sec. 4.4, Figure 4).",
    )
    _add_model_and_data_arguments(parser, split="test")
    parser.add_argument(
        "--calibration_dataset",
        help="Training data for the BatchNorm statistics. Default: --dataset with "
        "--calibration_split; required when --dataset is a single file.",
    )
    parser.add_argument(
        "--calibration_split", default="train", help="Split of --calibration_dataset."
    )
    parser.add_argument(
        "--max_eval_samples",
        type=int,
        help="Evaluate on a random subset (seeded) of this many examples. Default: all.",
    )
    parser.add_argument("--batch_size", type=int, default=256, help="Evaluation batch size.")
    parser.add_argument(
        "--calibration_batch_size", type=int, default=128, help="BatchNorm calibration batch size."
    )
    parser.add_argument(
        "--calibration_batches",
        type=int,
        default=50,
        help="Training batches that recompute the BatchNorm statistics.",
    )
    parser.add_argument(
        "--sigmas",
        type=float,
        nargs="+",
        default=[0.0, 0.02, 0.04, 0.06, 0.08, 0.1],
        metavar="SIGMA",
        help="Noise levels sigma (0: the clean model).",
    )
    parser.add_argument("--draws", type=int, default=5, help="Noise draws per sigma.")
    return parser


def noise_main(argv: Sequence[str] | None = None) -> None:
    parser = noise_parser()
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

    paths = (args.output_dir / "noise.json", args.output_dir / "noise.png")
    write_json(paths[0], {k: r.to_dict() for k, r in results.items()})
    plot_noise_robustness(results, paths[1])
    largest = max(args.sigmas)
    accuracies = ", ".join(
        f"{label} {_number(r.clean_accuracy)} -> "
        f"{_number(r.accuracy_mean[r.sigmas.index(largest)])}"
        for label, r in results.items()
    )
    report(
        paths,
        f"noise: {len(results)} model(s), {args.draws} draw(s) per sigma; accuracy clean -> "
        f"at sigma {_number(largest)}: {accuracies}",
    )


def curves_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "lookbehind-curves",
        "alpha (Figure 10), loss, accuracy, ascent gradient norm and perturbation distance over "
        "training, from the trainer_state.json of Trainer output directories.",
    )
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="[LABEL=]OUTPUT_DIR",
        help="Trainer output directories (or their trainer_state.json).",
    )
    parser.add_argument(
        "--output_dir", type=Path, required=True, help="Where the JSON and PNG files go."
    )
    return parser


def curves_main(argv: Sequence[str] | None = None) -> None:
    args = curves_parser().parse_args(argv)
    runs = {
        label: training_curves(load_log_history(run)) for label, run in labelled(args.runs).items()
    }
    from .plotting import CURVE_TITLES, plot_training_curves

    paths = (args.output_dir / "curves.json", args.output_dir / "curves.png")
    write_json(paths[0], curves_to_dict(runs))
    plot_training_curves(runs, paths[1])
    keys = [key for key in CURVE_TITLES if any(key in curves for curves in runs.values())]
    last_steps = ", ".join(
        f"{label} {max(curve.steps[-1] for curve in curves.values())}"
        for label, curves in runs.items()
        if curves
    )
    report(
        paths,
        f"curves: {len(runs)} run(s), {len(keys)} metric(s) ({', '.join(keys)}); last logged "
        f"step: {last_steps}",
    )


def tradeoff_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "lookbehind-tradeoff",
        "Loss-sharpness trade-off (Figure 1): one labelled point per run, x = its m-sharpness "
        "at --radius, y = --metric.",
    )
    parser.add_argument(
        "--sharpness_json",
        type=Path,
        nargs="+",
        required=True,
        help="sharpness.json files written by lookbehind-sharpness (their labels are the runs).",
    )
    parser.add_argument(
        "--radius",
        type=float,
        required=True,
        help="The radius r (one of those the sharpness was measured at).",
    )
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
        help="The output directory of each run, for metrics other than base_loss (repeat).",
    )
    parser.add_argument(
        "--output_dir", type=Path, required=True, help="Where the JSON and PNG files go."
    )
    return parser


def tradeoff_main(argv: Sequence[str] | None = None) -> None:
    args = tradeoff_parser().parse_args(argv)
    sharpness: dict[str, SharpnessResult] = {}
    for path in args.sharpness_json:
        for label, data in json.loads(path.read_text()).items():
            sharpness[label] = SharpnessResult.from_dict(data)
    if args.metric == "base_loss":
        values = {label: result.base_loss for label, result in sharpness.items()}
    else:
        values = {label: read_metric(d, args.metric) for label, d in labelled(args.run_dir).items()}
    points = tradeoff_points(sharpness, args.radius, values)
    from .plotting import plot_tradeoff, readable

    paths = (args.output_dir / "tradeoff.json", args.output_dir / "tradeoff.png")
    write_json(paths[0], [vars(point) for point in points])
    plot_tradeoff(
        points,
        paths[1],
        xlabel=f"m-sharpness at r = {args.radius}",
        ylabel=readable(args.metric),
    )
    report(
        paths,
        f"tradeoff: {len(points)} run(s) at r = {_number(args.radius)} (m-sharpness, "
        f"{args.metric}): "
        + ", ".join(f"{p.label} ({_number(p.sharpness)}, {_number(p.value)})" for p in points),
    )


def sweep_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "lookbehind-sweep",
        "alpha x k sensitivity grid (Figure 7): launch the runs one after the other (skipping "
        "finished ones) or only collect them, then draw the heatmap of the accuracy relative to "
        "a baseline run. Arguments after '--' are appended to every command.",
    )
    parser.add_argument(
        "--output_root",
        type=Path,
        required=True,
        help="Folder of the cells' run directories (alpha_<alpha>-k_<k>).",
    )
    parser.add_argument(
        "--alphas", nargs="+", default=["0.2", "0.5", "0.8"], help="The alpha of each row."
    )
    parser.add_argument(
        "--ks", type=int, nargs="+", default=[2, 5, 10], help="The k of each column."
    )
    parser.add_argument(
        "--template",
        help="The command that trains one cell, with the fields {alpha}, {k} and {output_dir} "
        "(replaced by each cell's values); needed unless --collect_only. No default.",
    )
    parser.add_argument(
        "--collect_only", action="store_true", help="Launch nothing; read the finished cells."
    )
    parser.add_argument(
        "--baseline_dir",
        type=Path,
        help="Output directory of the baseline run. Default: none, the heatmap shows the values.",
    )
    parser.add_argument(
        "--metric", default="eval_accuracy", help="The key of all_results.json to compare."
    )
    parser.add_argument(
        "--output_dir",
        type=Path,
        help="Where the JSON and PNG files go. Default: --output_root.",
    )
    return parser


def sweep_main(argv: Sequence[str] | None = None) -> None:
    parser = sweep_parser()
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
    paths = (output_dir / "sweep.json", output_dir / "sweep.png")
    write_json(paths[0], grid.to_dict())
    plot_sweep_heatmap(grid, paths[1])
    cells = [
        (value, alpha, k)
        for alpha, row in zip(grid.alphas, grid.values)
        for k, value in zip(grid.ks, row)
        if value is not None
    ]
    summary = f"sweep: {len(cells)} of {len(grid.alphas) * len(grid.ks)} cells finished"
    if cells:
        value, alpha, k = max(cells)
        summary += f"; highest {grid.metric} {_number(value)} at alpha {alpha}, k {k}"
        if grid.baseline is not None:
            summary += f" ({value - grid.baseline:+.4g} against the baseline)"
    report(paths, summary)


def compute_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "lookbehind-compute",
        "A metric against the gradient computations (forward/backward passes) that "
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
        "--reference",
        help="Label of the reference run (Table 10: Multistep). Default: the first run.",
    )
    parser.add_argument(
        "--target",
        type=float,
        help="The value to reach (the reference must reach it). Default: the reference's best.",
    )
    parser.add_argument(
        "--lower_is_better", action="store_true", help="For losses: reach at most the target."
    )
    parser.add_argument(
        "--output_dir", type=Path, required=True, help="Where the JSON and PNG files go."
    )
    return parser


def compute_main(argv: Sequence[str] | None = None) -> None:
    args = compute_parser().parse_args(argv)
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

    paths = (args.output_dir / "compute.json", args.output_dir / "compute.png")
    write_json(paths[0], {**comparison.to_dict(), "curves": compute_curves_to_dict(curves)})
    plot_metric_against_computations(curves, paths[1], metric=args.metric, comparison=comparison)
    fractions = ", ".join(
        f"{label} {run.fraction:.0%}" if run.fraction is not None else f"{label} never"
        for label, run in comparison.runs.items()
    )
    report(
        paths,
        f"compute: {args.metric} {_number(comparison.target)} reached by {reference} after "
        f"{comparison.reference_computations} gradient computations; share of that each run "
        f"needed: {fractions}",
    )


PARSERS = {
    "sharpness": sharpness_parser,
    "noise": noise_parser,
    "curves": curves_parser,
    "tradeoff": tradeoff_parser,
    "sweep": sweep_parser,
    "compute": compute_parser,
}
