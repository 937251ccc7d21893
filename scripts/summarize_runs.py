"""Tables of recipe runs, from what each run wrote (``all_results.json``, ``trainer_state.json``).

CIFAR (default): final accuracy, seconds of training per epoch, and that time over the first
run's (the baseline; SGD costs 1 pass per step, SAM 2, Lookbehind k + 1); with label noise
(``--kind noisy``) also the share of the corrupted training labels the model fits and its
accuracy on the clean ones, at the end of training, and the gradient computations. Translation:
validation and test BLEU, validation loss, seconds per Trainer step, the steps trained and the
step whose weights were scored (the best checkpoint's, for runs trained to the plateau).

    python scripts/summarize_runs.py sgd=out/sgd sam=out/sam lookbehind=out/lb --json t.json
    python scripts/summarize_runs.py --group_seeds out/sgd_seed0 out/sgd_seed1 out/sam_seed0 ...
    python scripts/summarize_runs.py --kind translation out/adam_seed0 out/sam_rho0.1_seed0
    python scripts/summarize_runs.py --kind noisy out/sgd_seed0 out/sgd_seed1 out/sam_seed0 ...

``--group_seeds`` (always on for translation and noisy) makes one row of the runs whose folders
differ only in a ``_seed<N>`` suffix: the mean over the seeds and each seed's value. ``--curve KEY``
adds a second table: KEY (``eval_bleu``, ``eval_loss``, ...) at every step where it was logged,
mean over the seeds, to show where each run levels off.

The tables leave out ``best_eval_accuracy`` (the best of the evaluations after each epoch): the
recipes evaluate on the test set, so that best is an oracle choice of epoch on it. The rows of
``--json`` keep it.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
from collections.abc import Sequence
from pathlib import Path

from hf_lookbehind.analysis.cli import labelled
from hf_lookbehind.analysis.curves import load_log_history, trainer_state_path, training_curves
from hf_lookbehind.analysis.sweep import read_metric
from hf_lookbehind_recipes.tables import markdown_table

COLUMNS = ("eval_accuracy", "best_eval_accuracy", "train_seconds_per_epoch")
NOISE_COLUMNS = ("noise_fitted", "clean_train_accuracy", "gradient_computations")
TRANSLATION_COLUMNS = ("eval_bleu", "test_bleu", "test_sacrebleu", "eval_loss")
SEED_SUFFIX = re.compile(r"_seed(\d+)$")


def epoch_seconds(run_dir: str | Path) -> list[float]:
    """``train_epoch_seconds`` of every epoch (the log entries of ``EpochTimer``)."""
    return [entry["train_epoch_seconds"] for entry in load_log_history(run_dir)
            if "train_epoch_seconds" in entry]  # fmt: skip


def last_training_loss(run_dir: str | Path) -> float:
    """The last logged training loss: the loss of each step's first pass, at the slow weights
    in same-batch mode (in switching mode every other step's first pass is perturbed, so the
    translation table leaves it out)."""
    return [entry["loss"] for entry in load_log_history(run_dir) if "loss" in entry][-1]


def cifar_row(run_dir: str) -> dict[str, float]:
    row = {column: read_metric(run_dir, column) for column in COLUMNS}
    row["median_seconds_per_epoch"] = statistics.median(epoch_seconds(run_dir)[1:])
    row["last_train_loss"] = last_training_loss(run_dir)
    return row


def noisy_row(run_dir: str) -> dict[str, float]:
    noise = {column: read_metric(run_dir, column) for column in NOISE_COLUMNS}
    return {**cifar_row(run_dir), **noise}


def scored_steps(run_dir: str | Path) -> tuple[int, int]:
    """The steps a run trained and the step of the weights its results score: the best
    checkpoint's with ``--load_best_model_at_end`` (training to the plateau), else the last."""
    state = json.loads(trainer_state_path(run_dir).read_text())
    best = state.get("best_model_checkpoint")
    steps = state["global_step"]
    return steps, int(best.rsplit("-", 1)[1]) if best else steps


def translation_row(run_dir: str) -> dict[str, float]:
    row = {column: read_metric(run_dir, column) for column in TRANSLATION_COLUMNS}
    row["seconds_per_step"] = 1.0 / read_metric(run_dir, "train_steps_per_second")
    row["steps"], row["scored_step"] = scored_steps(run_dir)
    return row


def curve_row(run_dir: str, key: str) -> dict[str, float]:
    """``key`` at every step where the run logged it, one column per step (the last value logged
    at a step, e.g. the final evaluation, wins)."""
    curve = training_curves(load_log_history(run_dir), (key,)).get(key)
    if curve is None:
        raise ValueError(f"{run_dir}: its log history has no {key!r}")
    return {str(step): value for step, value in zip(curve.steps, curve.values)}


def summarize(run_dirs: dict[str, str]) -> list[dict[str, float | str]]:
    """One row per CIFAR run (the table of ``scripts/device_check.sh``)."""
    rows = [
        {"run": label, **{column: read_metric(run_dir, column) for column in COLUMNS}}
        for label, run_dir in run_dirs.items()
    ]
    baseline_seconds = rows[0]["train_seconds_per_epoch"] if rows else None
    for row in rows:
        row["time_vs_first"] = row["train_seconds_per_epoch"] / baseline_seconds
    return rows


def group_by_seed(run_dirs: Sequence[str], read_row) -> list[dict]:
    """Runs ``NAME_seed<N>`` grouped by NAME (in order of first appearance): the mean of every
    column, each seed's values under ``per_seed`` and the seeds."""
    groups: dict[str, list[tuple[int, dict[str, float]]]] = {}
    for run_dir in run_dirs:
        name = Path(run_dir.rstrip("/")).name
        match = SEED_SUFFIX.search(name)
        if match is None:
            raise ValueError(f"{run_dir}: --group_seeds needs folders named NAME_seed<N>")
        groups.setdefault(name[: match.start()], []).append((int(match[1]), read_row(run_dir)))
    rows = []
    for name, runs in groups.items():
        runs.sort()
        per_seed = [values for _, values in runs]
        row = {column: statistics.fmean(v[column] for v in per_seed) for column in per_seed[0]}
        rows.append({"run": name, **row, "seeds": [s for s, _ in runs], "per_seed": per_seed})
    return rows


def _cell(row: dict, column: str, scale: float, digits: int) -> str:
    """The value, or for several seeds the mean and each seed's value (one value where they
    are all the same)."""
    mean = f"{scale * row[column]:.{digits}f}"
    per_seed = [f"{scale * v[column]:.{digits}f}" for v in row.get("per_seed", ())]
    if len(set(per_seed)) < 2:
        return mean
    return f"{mean} ({' / '.join(per_seed)})"


# (header, column, scale, digits) of the CIFAR tables' cells
ACCURACY_CELLS = (("final acc", "eval_accuracy", 100, 2),)
NOISE_CELLS = (("noise fitted", "noise_fitted", 100, 1),
               ("clean train acc", "clean_train_accuracy", 100, 1))  # fmt: skip
LOSS_CELLS = (("last train loss", "last_train_loss", 1, 3),)
COST_CELLS = (("gradient computations", "gradient_computations", 1, 0),)


def cifar_markdown(rows: list[dict], noise: bool = False) -> str:
    """The CIFAR table of runs grouped by seed; with ``noise``, the fitted noise and the clean
    training accuracy come before the times, and the Trainer's gradient computations (the
    exact cost) take the place of the last training loss."""
    leading = ACCURACY_CELLS + NOISE_CELLS if noise else ACCURACY_CELLS
    trailing = COST_CELLS if noise else LOSS_CELLS
    baseline = rows[0]["median_seconds_per_epoch"]
    header = ("run", "seeds", *(cell[0] for cell in leading), "s/epoch (median)",
              "time vs first", *(cell[0] for cell in trailing))  # fmt: skip
    return markdown_table(
        header,
        [
            (r["run"], ", ".join(map(str, r["seeds"])),
             *(_cell(r, *cell[1:]) for cell in leading),
             _cell(r, "median_seconds_per_epoch", 1, 1),
             f"{r['median_seconds_per_epoch'] / baseline:.2f}",
             *(_cell(r, *cell[1:]) for cell in trailing))
            for r in rows
        ],
    )  # fmt: skip


def translation_markdown(rows: list[dict]) -> str:
    header = ("run", "seeds", "BLEU val", "BLEU test", "sacreBLEU test", "val loss", "s/step",
              "steps", "scored at step")  # fmt: skip
    return markdown_table(
        header,
        [
            (r["run"], ", ".join(map(str, r["seeds"])), _cell(r, "eval_bleu", 1, 2),
             _cell(r, "test_bleu", 1, 2), _cell(r, "test_sacrebleu", 1, 2),
             _cell(r, "eval_loss", 1, 3), _cell(r, "seconds_per_step", 1, 2),
             _cell(r, "steps", 1, 0), _cell(r, "scored_step", 1, 0))
            for r in rows
        ],
    )  # fmt: skip


def curve_markdown(rows: list[dict], key: str) -> str:
    steps = sorted({int(c) for row in rows for c in row["per_seed"][0]})
    return markdown_table(
        (f"{key} at step", *map(str, steps)),
        [
            (row["run"], *(f"{row[str(step)]:.3f}" if str(step) in row else "" for step in steps))
            for row in rows
        ],
    )


def markdown(rows: list[dict[str, float | str]]) -> str:
    return markdown_table(
        ("run", "final acc", "s/epoch", "time vs first"),
        [
            (r["run"], f"{100 * r['eval_accuracy']:.2f}", f"{r['train_seconds_per_epoch']:.2f}",
             f"{r['time_vs_first']:.2f}")
            for r in rows
        ],
    )  # fmt: skip


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="+", metavar="[LABEL=]OUTPUT_DIR")
    parser.add_argument("--kind", choices=("cifar", "noisy", "translation"), default="cifar")
    parser.add_argument(
        "--group_seeds",
        action="store_true",
        help="One row per NAME of folders NAME_seed<N>: means and per-seed values.",
    )
    parser.add_argument(
        "--curve",
        metavar="KEY",
        help="Also print KEY (e.g. eval_bleu) at every logged step, mean over the seeds.",
    )
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    args = parser.parse_args(argv)
    if args.kind == "translation":
        rows = group_by_seed(args.run_dir, translation_row)
        print(translation_markdown(rows))
    elif args.kind == "noisy":
        rows = group_by_seed(args.run_dir, noisy_row)
        print(cifar_markdown(rows, noise=True))
    elif args.group_seeds:
        rows = group_by_seed(args.run_dir, cifar_row)
        print(cifar_markdown(rows))
    else:
        rows = summarize(labelled(args.run_dir))
        print(markdown(rows))
    if args.curve:
        print()
        print(curve_markdown(group_by_seed(args.run_dir, lambda d: curve_row(d, args.curve)),
                             args.curve))  # fmt: skip
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
