"""One table of recipe runs: final and best accuracy, seconds of training per epoch, and that
time over the first run's (the baseline; SGD costs 1 pass per step, SAM 2, Lookbehind k + 1).

    python scripts/summarize_runs.py sgd=out/sgd sam=out/sam lookbehind=out/lb --json t.json
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from pathlib import Path

from hf_lookbehind.analysis.cli import labelled
from hf_lookbehind.analysis.sweep import read_metric

COLUMNS = ("eval_accuracy", "best_eval_accuracy", "train_seconds_per_epoch")


def summarize(run_dirs: dict[str, str]) -> list[dict[str, float | str]]:
    rows = [
        {"run": label, **{column: read_metric(run_dir, column) for column in COLUMNS}}
        for label, run_dir in run_dirs.items()
    ]
    baseline_seconds = rows[0]["train_seconds_per_epoch"] if rows else None
    for row in rows:
        row["time_vs_first"] = row["train_seconds_per_epoch"] / baseline_seconds
    return rows


def markdown(rows: list[dict[str, float | str]]) -> str:
    lines = [
        "| run | final acc | best acc | s/epoch | time vs first |",
        "| --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['run']} | {100 * r['eval_accuracy']:.2f} | {100 * r['best_eval_accuracy']:.2f} "
        f"| {r['train_seconds_per_epoch']:.2f} | {r['time_vs_first']:.2f} |"
        for r in rows
    ]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", nargs="+", metavar="[LABEL=]OUTPUT_DIR")
    parser.add_argument("--json", type=Path, help="Also write the rows here.")
    args = parser.parse_args(argv)
    rows = summarize(labelled(args.run_dir))
    print(markdown(rows))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
