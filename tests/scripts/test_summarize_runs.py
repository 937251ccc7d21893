"""``scripts/summarize_runs.py`` on run folders written here: seeds grouped into one row with
the mean and each seed's value, the median epoch time, and the translation columns."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from summarize_runs import main


def write_run(folder: Path, results: dict, log_history: list[dict], **state) -> str:
    folder.mkdir(parents=True)
    (folder / "all_results.json").write_text(json.dumps(results))
    state = {"log_history": log_history, "global_step": 1000, **state}
    (folder / "trainer_state.json").write_text(json.dumps(state))
    return str(folder)


def cifar_run(folder: Path, final: float, best: float, epochs: list[float], loss: float) -> str:
    history = [{"train_epoch_seconds": s} for s in epochs] + [{"loss": 9.0}, {"loss": loss}]
    results = {"eval_accuracy": final, "best_eval_accuracy": best, "train_seconds_per_epoch": 0}
    return write_run(folder, results, history)


def test_cifar_seeds_are_grouped_with_means_and_median_epoch_time(tmp_path, capsys):
    runs = [
        cifar_run(tmp_path / "sgd_seed1", 0.50, 0.60, [99.0, 2.0, 3.0, 40.0], 0.2),
        cifar_run(tmp_path / "sgd_seed0", 0.40, 0.50, [99.0, 2.0, 5.0, 4.0], 0.4),
        cifar_run(tmp_path / "sam_seed0", 0.70, 0.70, [99.0, 8.0, 8.0, 8.0], 0.3),
    ]
    main(["--group_seeds", *runs, "--json", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [(row["run"], row["seeds"]) for row in rows] == [("sgd", [0, 1]), ("sam", [0])]
    sgd = rows[0]
    assert sgd["eval_accuracy"] == pytest.approx(0.45)
    assert sgd["best_eval_accuracy"] == pytest.approx(0.55)
    # the first epoch is left out; medians 4 (seed 0) and 3 (seed 1)
    assert sgd["median_seconds_per_epoch"] == pytest.approx(3.5)
    assert sgd["last_train_loss"] == pytest.approx(0.3)
    lines = capsys.readouterr().out.splitlines()
    # the best evaluation (a test-set oracle) stays in the rows but not in the table
    assert lines[0] == "| run | seeds | final acc | s/epoch (median) | time vs first " \
        "| last train loss |"  # fmt: skip
    assert lines[2] == "| sgd | 0, 1 | 45.00 (40.00 / 50.00) | 3.5 (4.0 / 3.0) | 1.00 " \
        "| 0.300 (0.400 / 0.200) |"  # fmt: skip
    assert lines[3] == "| sam | 0 | 70.00 | 8.0 | 2.29 | 0.300 |"


def test_noisy_rows_add_the_fitted_noise_and_clean_training_accuracy(tmp_path, capsys):
    def run(name: str, final: float, fitted: float, clean: float, epoch: float, passes: int):
        results = {"eval_accuracy": final, "best_eval_accuracy": final + 0.1,
                   "train_seconds_per_epoch": 0, "noise_fitted": fitted,
                   "clean_train_accuracy": clean, "gradient_computations": passes}  # fmt: skip
        history = [{"train_epoch_seconds": s} for s in (50.0, epoch, epoch)] + [{"loss": 0.5}]
        return write_run(tmp_path / name, results, history)

    runs = [run("sgd_seed0", 0.40, 0.90, 0.99, 2.0, 3780),
            run("sgd_seed1", 0.50, 0.70, 0.97, 2.0, 3780),
            run("sam_seed0", 0.60, 0.125, 0.8, 4.0, 7560)]  # fmt: skip
    main(["--kind", "noisy", *runs])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "| run | seeds | final acc | noise fitted | clean train acc " \
        "| s/epoch (median) | time vs first | gradient computations |"  # fmt: skip
    assert lines[2:] == [
        "| sgd | 0, 1 | 45.00 (40.00 / 50.00) | 80.0 (90.0 / 70.0) | 98.0 (99.0 / 97.0) "
        "| 2.0 | 1.00 | 3780 |",
        "| sam | 0 | 60.00 | 12.5 | 80.0 | 4.0 | 2.00 | 7560 |",
    ]


def test_translation_rows(tmp_path, capsys):
    results = {
        "eval_bleu": 20.0, "test_bleu": 21.0, "test_sacrebleu": 19.5, "eval_loss": 3.25,
        "train_steps_per_second": 4.0,
    }  # fmt: skip
    run = write_run(tmp_path / "sam_rho0.1_seed0", results, [{"loss": 5.0}, {"loss": 4.0}])
    plateau = write_run(
        tmp_path / "adam_seed0",
        results,
        [{"loss": 5.0}],
        global_step=3250,
        best_model_checkpoint=str(tmp_path / "adam_seed0" / "checkpoint-2750"),
    )
    main(["--kind", "translation", run, plateau])
    assert capsys.readouterr().out.splitlines()[2:] == [
        "| sam_rho0.1 | 0 | 20.00 | 21.00 | 19.50 | 3.250 | 0.25 | 1000 | 1000 |",
        "| adam | 0 | 20.00 | 21.00 | 19.50 | 3.250 | 0.25 | 3250 | 2750 |",
    ]


def test_group_seeds_needs_seed_folders(tmp_path):
    run = cifar_run(tmp_path / "sgd", 0.4, 0.5, [1.0, 2.0], 0.1)
    with pytest.raises(ValueError, match="NAME_seed<N>"):
        main(["--group_seeds", run])


def test_curve_table_averages_each_step_over_seeds(tmp_path, capsys):
    def run(name: str, bleus: list[float]) -> str:
        history = [{"eval_bleu": b, "step": 250 * (i + 1)} for i, b in enumerate(bleus)]
        history.append({"loss": 4.0, "step": 500})
        results = {"eval_bleu": bleus[-1], "test_bleu": 1.0, "test_sacrebleu": 1.0,
                   "eval_loss": 3.0, "train_steps_per_second": 1.0}  # fmt: skip
        return write_run(tmp_path / name, results, history)

    runs = [run("adam_seed0", [10.0, 20.0]), run("adam_seed1", [12.0, 22.0]),
            run("sam_seed0", [9.0, 21.5])]  # fmt: skip
    main(["--kind", "translation", "--curve", "eval_bleu", *runs])
    lines = capsys.readouterr().out.splitlines()
    curve = lines[lines.index("") + 1 :]
    assert curve == [
        "| eval_bleu at step | 250 | 500 |",
        "| --- | --- | --- |",
        "| adam | 11.000 | 21.000 |",
        "| sam | 9.000 | 21.500 |",
    ]


def test_curve_of_a_key_never_logged_is_an_error(tmp_path):
    run = cifar_run(tmp_path / "sgd_seed0", 0.4, 0.5, [1.0, 2.0], 0.1)
    with pytest.raises(ValueError, match="no 'eval_bleu'"):
        main(["--group_seeds", "--curve", "eval_bleu", run])


def test_labelled_runs_table_leaves_out_the_best_accuracy_but_the_rows_keep_it(tmp_path, capsys):
    def run(name: str, final: float, best: float, seconds: float) -> str:
        results = {"eval_accuracy": final, "best_eval_accuracy": best,
                   "train_seconds_per_epoch": seconds}  # fmt: skip
        return write_run(tmp_path / name, results, [])

    runs = [f"sgd={run('a', 0.4, 0.5, 2.0)}", f"sam={run('b', 0.6, 0.7, 5.0)}"]
    main([*runs, "--json", str(tmp_path / "rows.json")])
    assert capsys.readouterr().out.splitlines() == [
        "| run | final acc | s/epoch | time vs first |",
        "| --- | --- | --- | --- |",
        "| sgd | 40.00 | 2.00 | 1.00 |",
        "| sam | 60.00 | 5.00 | 2.50 |",
    ]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [row["best_eval_accuracy"] for row in rows] == [0.5, 0.7]
