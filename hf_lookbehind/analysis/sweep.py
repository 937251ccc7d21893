"""The alpha x k sensitivity grid (Figure 7 of the paper): launch or collect recipe runs and
compare their accuracy with a baseline run.

Each grid cell is a run directory ``<output_root>/alpha_<alpha>-k_<k>`` whose
``all_results.json`` (written by the recipes through ``trainer.save_metrics``) holds the
accuracy. Runs are launched one after the other from the caller's command template, in which
``{alpha}``, ``{k}`` and ``{output_dir}`` are replaced (shell-quoted; other braces are left
alone); a cell whose results exist already is not rerun.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import subprocess
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm.auto import tqdm

RESULTS_FILE = "all_results.json"
_RUN_DIR = re.compile(r"^alpha_(?P<alpha>.+)-k_(?P<k>\d+)$")


def run_dir_name(alpha: str, k: int) -> str:
    return f"alpha_{alpha}-k_{k}"


def read_metric(run_dir: str | Path, metric: str = "eval_accuracy") -> float:
    """``metric`` from ``run_dir/all_results.json``."""
    path = Path(run_dir) / RESULTS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist: the run has not finished")
    results = json.loads(path.read_text())
    if metric not in results:
        raise KeyError(f"{path} has no {metric!r}; it has {sorted(results)}")
    return float(results[metric])


def _alpha_order(alpha: str) -> tuple[int, float, str]:
    """Numbers in increasing order, then names (``adaptive``)."""
    try:
        return (0, float(alpha), alpha)
    except ValueError:
        return (1, math.inf, alpha)


def launch_sweep(
    alphas: Sequence[str | float],
    ks: Sequence[int],
    output_root: str | Path,
    *,
    template: str,
    extra_args: Sequence[str] = (),
    progress: bool = True,
) -> list[Path]:
    """Run ``template`` for every ``(alpha, k)`` not finished yet, sequentially; returns the run
    directories. ``extra_args`` are appended to every command. A failing run raises
    ``subprocess.CalledProcessError`` (with the command) and stops the sweep."""
    if not alphas or not ks:
        raise ValueError("the sweep needs at least one alpha and one k")
    for field in ("{alpha}", "{k}", "{output_dir}"):
        if field not in template:
            raise ValueError(f"the command template must contain {field}: {template!r}")
    output_root = Path(output_root)
    cells = [(str(alpha), int(k)) for alpha in alphas for k in ks]
    run_dirs = []
    for alpha, k in tqdm(cells, desc="sweep", disable=not progress):
        run_dir = output_root / run_dir_name(alpha, k)
        run_dirs.append(run_dir)
        if (run_dir / RESULTS_FILE).is_file():
            continue
        command = template
        for field, value in (("alpha", alpha), ("k", str(k)), ("output_dir", str(run_dir))):
            command = command.replace(f"{{{field}}}", shlex.quote(value))
        subprocess.run([*shlex.split(command), *extra_args], check=True)
    return run_dirs


@dataclass
class SweepGrid:
    """``metric`` of each run: ``values[i][j]`` for ``alphas[i]`` and ``ks[j]`` (``None`` for
    a run that is missing or unfinished); ``baseline`` is the reference run's value."""

    alphas: list[str]
    ks: list[int]
    values: list[list[float | None]]
    metric: str
    baseline: float | None = None

    def relative(self) -> list[list[float | None]]:
        """``value - baseline`` per cell (Figure 7 plots the accuracy gain over SAM)."""
        if self.baseline is None:
            raise ValueError("the grid has no baseline value")
        return [[None if v is None else v - self.baseline for v in row] for row in self.values]

    def to_dict(self) -> dict:
        data = asdict(self)
        if self.baseline is not None:
            data["relative"] = self.relative()
        return data


def collect_sweep(
    output_root: str | Path,
    *,
    metric: str = "eval_accuracy",
    baseline_dir: str | Path | None = None,
) -> SweepGrid:
    """The grid of every ``alpha_<alpha>-k_<k>`` run directory under ``output_root``."""
    output_root = Path(output_root)
    runs = {}
    for path in output_root.iterdir() if output_root.is_dir() else ():
        match = _RUN_DIR.match(path.name)
        if match and path.is_dir():
            runs[match["alpha"], int(match["k"])] = path
    if not runs:
        raise FileNotFoundError(f"no alpha_<alpha>-k_<k> run directories in {output_root}")
    alphas = sorted({alpha for alpha, _ in runs}, key=_alpha_order)
    ks = sorted({k for _, k in runs})
    values = [
        [
            read_metric(runs[alpha, k], metric)
            if (alpha, k) in runs and (runs[alpha, k] / RESULTS_FILE).is_file()
            else None
            for k in ks
        ]
        for alpha in alphas
    ]
    baseline = read_metric(baseline_dir, metric) if baseline_dir is not None else None
    return SweepGrid(alphas=alphas, ks=ks, values=values, metric=metric, baseline=baseline)
