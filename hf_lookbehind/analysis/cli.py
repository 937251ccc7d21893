"""Command-line entry points of the analysis tools. Each writes ``<tool>.json`` and
``<tool>.png`` into ``--output_dir`` (``lookbehind-<tool> --help`` for the options, or
``python -m hf_lookbehind.analysis <tool> --help``), then prints the paths it wrote and a
one-line summary of the result. They return nothing, as console scripts must; the results are
in the JSON file. Their options are declared in :mod:`.arguments`."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .arguments import (
    compute_parser,
    curves_parser,
    noise_parser,
    sharpness_parser,
    sweep_parser,
    tradeoff_parser,
)
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
from .sharpness import SharpnessResult, m_sharpness
from .sweep import collect_sweep, launch_sweep, read_metric


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
