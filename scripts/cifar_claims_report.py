"""Tables and figures of the CIFAR claims study (``scripts/cifar_claims_study.py``) from its
records: per setting, every (method, rho) over its seeds, rho chosen per method on the
validation split, the matched-distance pairs, and one figure of four panels in the paper's form
(the loss-sharpness trade-off of Fig. 1/3, accuracy under weight noise of Fig. 4, accuracy
against rho of Fig. 6, accuracy against gradient computations of Table 10)."""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from pathlib import Path

from cifar_claims_study import EPOCHS, LOOKBEHIND_RHOS, METHODS, NOISE, SAM_RHOS, SEEDS

LABELS = {
    "sam": "SAM",
    "lookbehind_a0.5": "Lookbehind-SAM α 0.5",
    "lookbehind_adaptive": "Lookbehind-SAM adaptive α",
}
COLOURS = {"sam": "tab:blue", "lookbehind_a0.5": "tab:orange", "lookbehind_adaptive": "tab:green"}
SHARPNESS_RADIUS = "0.1"
TEST_IMAGES = 10_000


def spread(values: list[float], scale: float = 1.0, digits: int = 2) -> str:
    """``mean ± std`` (sample std over seeds; the mean alone for one value)."""
    values = [v * scale for v in values if v is not None]
    if not values:
        return "–"
    mean = statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def grouped(records: list[dict]) -> dict[tuple[str, int, float], list[dict]]:
    groups: dict[tuple[str, int, float], list[dict]] = defaultdict(list)
    for record in records:
        groups[record["method"], record["epochs"], record["rho"]].append(record)
    for runs in groups.values():
        runs.sort(key=lambda r: r["seed"])
    return dict(sorted(groups.items()))


def chosen(groups: dict, method: str) -> float | None:
    """rho of the best mean validation accuracy among the complete 40-epoch rows of
    ``method``, or None while any row of its grid lacks a seed."""
    rhos = SAM_RHOS if method == "sam" else LOOKBEHIND_RHOS
    rows = {rho: groups.get((method, EPOCHS, rho), []) for rho in rhos}
    if any(len(runs) < len(SEEDS) for runs in rows.values()):
        return None
    return max(rhos, key=lambda rho: statistics.fmean(r["validation_accuracy"] for r in rows[rho]))


def grid_table(groups: dict) -> list[str]:
    lines = [
        "| method | epochs | ρ | seeds | distance ‖P−S‖ | gradient computations | validation acc "
        f"| test acc | train loss | m-sharpness (r {SHARPNESS_RADIUS}) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for (method, epochs, rho), runs in groups.items():
        mark = " (chosen)" if epochs == EPOCHS and chosen(groups, method) == rho else ""
        lines.append(
            f"| {LABELS[method]} | {epochs} | {rho:g}{mark} | "
            f"{','.join(str(r['seed']) for r in runs)} | "
            f"{spread([r['perturbation_distance'] for r in runs], digits=3)} | "
            f"{runs[0]['gradient_computations']} | "
            f"{spread([r['validation_accuracy'] for r in runs], 100)} | "
            f"{spread([r['test_accuracy'] for r in runs], 100)} | "
            f"{spread([r['train_loss'] for r in runs], digits=3)} | "
            f"{spread([r['m_sharpness'][SHARPNESS_RADIUS] for r in runs], digits=3)} |"
        )
    return lines


def matched_pairs(groups: dict) -> list[str]:
    """SAM at rho 2r against Lookbehind-SAM at r (about the same ‖P_k − S‖), and both at the
    same nominal rho: the per-seed test-accuracy differences, Lookbehind minus SAM."""
    lines = [
        "| Lookbehind-SAM | ρ | SAM ρ | comparison | test acc difference per seed | mean |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for method in ("lookbehind_a0.5", "lookbehind_adaptive"):
        for rho in LOOKBEHIND_RHOS:
            for sam_rho, kind in ((2 * rho, "matched distance"), (rho, "same ρ")):
                ours = {r["seed"]: r for r in groups.get((method, EPOCHS, rho), [])}
                sams = {r["seed"]: r for r in groups.get(("sam", EPOCHS, sam_rho), [])}
                seeds = sorted(ours.keys() & sams.keys())
                if not seeds:
                    continue
                gaps = [100 * (ours[s]["test_accuracy"] - sams[s]["test_accuracy"]) for s in seeds]
                lines.append(
                    f"| {LABELS[method]} | {rho:g} | {sam_rho:g} | {kind} | "
                    f"{' / '.join(f'{g:+.2f}' for g in gaps)} | {statistics.fmean(gaps):+.2f} |"
                )
    return lines


def noise_table(groups: dict) -> list[str]:
    rows = [(m, chosen(groups, m)) for m in METHODS]
    rows = [(m, rho) for m, rho in rows if rho is not None]
    if not rows:
        return []
    sigmas = list(groups[rows[0][0], EPOCHS, rows[0][1]][0]["noise_accuracy"])
    lines = [
        "| method (chosen ρ) | " + " | ".join(f"σ {s}" for s in sigmas) + " |",
        "| --- |" + " --- |" * len(sigmas),
    ]
    for method, rho in rows:
        runs = groups[method, EPOCHS, rho]
        cells = [spread([r["noise_accuracy"][s] for r in runs], 100) for s in sigmas]
        lines.append(f"| {LABELS[method]} ({rho:g}) | " + " | ".join(cells) + " |")
    return lines


def figure(groups: dict, setting: str, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, grid = plt.subplots(2, 2, figsize=(12, 9.5))
    axes = grid.flatten()
    for method in METHODS:
        rows = [(rho, runs) for (m, e, rho), runs in groups.items() if m == method and e == EPOCHS]
        if not rows:
            continue
        colour, label = COLOURS[method], LABELS[method]

        def mean(runs, key):
            return statistics.fmean(key(r) for r in runs)

        def std(runs, key):
            return statistics.stdev([key(r) for r in runs]) if len(runs) > 1 else 0.0

        def sharp(r):
            return r["m_sharpness"][SHARPNESS_RADIUS]

        def loss(r):
            return r["train_loss"]

        def acc(r):
            return 100 * r["test_accuracy"]

        def distance(r):
            return r["perturbation_distance"]

        axes[0].errorbar(
            [mean(runs, sharp) for _, runs in rows], [mean(runs, loss) for _, runs in rows],
            xerr=[std(runs, sharp) for _, runs in rows], yerr=[std(runs, loss) for _, runs in rows],
            color=colour, marker="o", label=label, capsize=3,
        )  # fmt: skip
        for rho, runs in rows:
            axes[0].annotate(f"ρ {rho:g}", (mean(runs, sharp), mean(runs, loss)), fontsize=7)
        rho = chosen(groups, method)
        if rho is not None:
            runs = groups[method, EPOCHS, rho]
            sigmas = list(runs[0]["noise_accuracy"])
            axes[1].errorbar(
                [float(s) for s in sigmas],
                [mean(runs, lambda r, s=s: 100 * r["noise_accuracy"][s]) for s in sigmas],
                yerr=[std(runs, lambda r, s=s: 100 * r["noise_accuracy"][s]) for s in sigmas],
                color=colour, marker="o", label=f"{label} (ρ {rho:g})", capsize=3,
            )  # fmt: skip
        axes[2].errorbar(
            [mean(runs, distance) for _, runs in rows], [mean(runs, acc) for _, runs in rows],
            yerr=[std(runs, acc) for _, runs in rows], color=colour, marker="o", label=label,
            capsize=3,
        )  # fmt: skip
        for rho, runs in rows:
            axes[2].annotate(f"ρ {rho:g}", (mean(runs, distance), mean(runs, acc)), fontsize=7)
        budget = [
            (runs[0]["gradient_computations"], runs, e)
            for (m, e, r), runs in groups.items()
            if m == method and (r == chosen(groups, method) or e != EPOCHS)
        ]
        for computations, runs, epochs in budget:
            axes[3].errorbar(
                [computations], [mean(runs, acc)], yerr=[std(runs, acc)], color=colour,
                marker="o" if epochs == EPOCHS else "s", capsize=3,
                label=f"{label}, {epochs} epochs",
            )  # fmt: skip
    axes[0].set(xlabel=f"m-sharpness (r {SHARPNESS_RADIUS})", ylabel="final training loss")
    axes[0].set_title("loss-sharpness trade-off (Fig. 1/3)")
    axes[1].set(xlabel="weight noise σ", ylabel="test accuracy (%)")
    axes[1].set_title("noisy weights, chosen ρ (Fig. 4)")
    axes[2].set(xlabel="perturbation distance ‖P_k − S‖ (ρ marked)", ylabel="test accuracy (%)")
    axes[2].set_xscale("log")
    distances = sorted({*SAM_RHOS, *(2 * rho for rho in LOOKBEHIND_RHOS)})
    axes[2].set_xticks(distances, [f"{d:g}" for d in distances])
    axes[2].minorticks_off()
    axes[2].set_title("sensitivity to ρ (Fig. 6)")
    axes[3].set(xlabel="gradient computations", ylabel="test accuracy (%)")
    axes[3].set_title("accuracy against compute (Table 10)")
    for ax in axes:
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"CIFAR-10 subset, ResNet-8, {setting}: mean ± std over seeds")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(records_dir: Path) -> None:
    """Write ``report.md`` and one ``<setting>.png`` per setting into ``records_dir``."""
    lines = ["# CIFAR claims study: tables from the records", ""]
    standard_error = 100 * math.sqrt(0.25 / TEST_IMAGES)
    lines += [
        f"One seed's test accuracy has a binomial standard error of at most {standard_error:.2f} "
        f"points ({TEST_IMAGES:,} test images); ± is the std over seeds.",
        "",
    ]
    written = []
    for setting in NOISE:
        records = [
            json.loads(p.read_text()) for p in sorted((records_dir / setting).glob("*.json"))
        ]
        if not records:
            continue
        groups = grouped(records)
        lines += [f"## {setting} ({len(records)} runs)", "", *grid_table(groups), ""]
        lines += ["Lookbehind-SAM minus SAM, test accuracy:", "", *matched_pairs(groups), ""]
        noise = noise_table(groups)
        if noise:
            lines += ["Test accuracy under weight noise (first 2,000 test images):", "", *noise, ""]
        path = records_dir / f"{setting}.png"
        figure(groups, setting, path)
        written.append(path)
    output = records_dir / "report.md"
    output.write_text("\n".join(lines))
    for path in [output, *written]:
        print(f"wrote {path}")
