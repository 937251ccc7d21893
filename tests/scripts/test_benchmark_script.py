"""Smoke test of scripts/benchmark_step.py: its main function at tiny sizes produces the table
with the expected rows and columns, and values that agree with their definitions. It asserts
no speed: times are only checked to be positive and finite."""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import math
from dataclasses import asdict

import pytest
import torch

K = 2
METHODS = ("sam", "lookbehind", "lookbehind_adaptive", "lookbehind_switching", "reference")
# The Trainer row comes after the engine rows of each model, one per k.
ROW_METHODS = (*METHODS, "trainer")
# Persistent extra buffers, in parameter copies, that the algorithms need: SAM keeps the
# unperturbed weights; Lookbehind the fast weights F and the slow/perturbed weights, plus F_1
# for the adaptive alpha of eq. 7-8. The reference allocates per step and keeps nothing.
EXPECTED_BUFFERS = {
    "sam": 1.0,
    "lookbehind": 2.0,
    "lookbehind_adaptive": 3.0,
    "lookbehind_switching": 2.0,
    "reference": None,
    "trainer": 2.0,
}
EXPECTED_K = {"sam": 1}
# Forward/backward passes of one outer step: SAM 2; Lookbehind in same-batch mode k + 1 (the
# gradient at P_i serves descent step i and ascent step i + 1); minibatch switching and the
# public code's transcription 2k.
EXPECTED_PASSES = {
    "sam": 2,
    "lookbehind": K + 1,
    "lookbehind_adaptive": K + 1,
    "lookbehind_switching": 2 * K,
    "reference": 2 * K,
    "trainer": K + 1,
}
# The passes and base-optimizer updates of an outer step that a method cannot avoid, at K = 2;
# its floor is passes x U + updates x O: SAM 2U + O, Lookbehind in same-batch mode
# (k + 1)U + kO (the reference is compared with the same), minibatch switching 2kU + kO.
FLOOR_PASSES_AND_UPDATES = {
    "sam": (2, 1),
    "lookbehind": (3, 2),
    "lookbehind_adaptive": (3, 2),
    "lookbehind_switching": (4, 2),
    "reference": (3, 2),
}
COLUMNS = (
    "model",
    "method",
    "passes",
    "ms/step",
    "floor ms",
    "/floor",
    "vs ref",
    "buffers",
    "peak MiB",
)


@pytest.fixture(scope="module")
def bench_script():
    """The script as a module (``scripts/`` is on ``sys.path``)."""
    return importlib.import_module("benchmark_step")


@pytest.fixture(scope="module")
def tiny_run(bench_script, tmp_path_factory):
    """Both models, every method, batch 2, two rounds: (rows, printed text, JSON report)."""
    json_path = tmp_path_factory.mktemp("benchmark") / "table.json"
    argv = ["--models", "resnet,vit", "--methods", ",".join(ROW_METHODS), "--ks", str(K)]
    argv += ["--batch_size", "2", "--repeats", "2", "--warmup", "1", "--json", str(json_path)]
    argv += ["--threads", "1"]  # robust to a loaded machine; the process setting is restored
    printed = io.StringIO()
    threads = torch.get_num_threads()
    try:
        with contextlib.redirect_stdout(printed):
            rows = bench_script.main(argv)
    finally:
        torch.set_num_threads(threads)
    return rows, printed.getvalue(), json.loads(json_path.read_text())


@pytest.mark.slow
def test_rows_cover_both_models_and_every_method(tiny_run):
    rows, _, _ = tiny_run
    models = list(dict.fromkeys(row.model for row in rows))
    assert len(models) == 2
    assert models[0].startswith("ResNet") and models[1].startswith("ViT")
    for model in models:
        model_rows = [row for row in rows if row.model == model]
        assert [row.method for row in model_rows[2:]] == list(ROW_METHODS)
        assert model_rows[0].method.startswith("U:") and model_rows[1].method.startswith("O:")
        assert [row.k for row in model_rows] == [None, None] + [
            EXPECTED_K.get(method, K) for method in ROW_METHODS
        ]
        assert [row.passes for row in model_rows] == [1, 0] + [
            EXPECTED_PASSES[method] for method in ROW_METHODS
        ]


@pytest.mark.slow
def test_values_agree_with_their_definitions(tiny_run):
    rows, _, _ = tiny_run
    for model in dict.fromkeys(row.model for row in rows):
        pass_row, update_row, *method_rows = [row for row in rows if row.model == model]
        for row in rows:
            assert math.isfinite(row.ms) and row.ms > 0, row
            assert row.peak_mib is None or math.isfinite(row.peak_mib), row
        by_method = {row.method: row for row in method_rows}
        trainer = by_method.pop("trainer")
        method_rows.remove(trainer)
        assert trainer.floor_ms > 0  # the engine's step in a plain loop, timed in turn
        assert trainer.ratio_to_floor == pytest.approx(trainer.ms / trainer.floor_ms)
        assert trainer.buffers == EXPECTED_BUFFERS["trainer"]
        for row in method_rows:
            passes, updates = FLOOR_PASSES_AND_UPDATES[row.method]
            expected_floor = passes * pass_row.ms + updates * update_row.ms
            assert row.floor_ms == pytest.approx(expected_floor)
            assert row.ratio_to_floor == pytest.approx(row.ms / expected_floor)
            assert row.buffers == EXPECTED_BUFFERS[row.method], row
        assert by_method["lookbehind"].speedup_vs_reference == pytest.approx(
            by_method["reference"].ms / by_method["lookbehind"].ms
        )
        others = [row for row in [*method_rows, trainer] if row.method != "lookbehind"]
        assert all(row.speedup_vs_reference is None for row in [pass_row, update_row, *others])


@pytest.mark.slow
def test_printed_table_and_json(tiny_run):
    rows, printed, report = tiny_run
    header, table = printed.split("\nmodel", 1)
    assert f"torch {torch.__version__}" in header and "device: CPU" in header
    *table_lines, footer = ("model" + table).strip().splitlines()
    assert footer.startswith("wall time")
    column_starts = [table_lines[0].index(column) for column in COLUMNS]
    assert column_starts == sorted(column_starts)
    assert len(table_lines) == 1 + len(rows)
    for line, row in zip(table_lines[1:], rows, strict=True):
        assert line.startswith(row.model) and f" {row.method} " in line
        assert f"{row.ms:.2f}" in line
    assert report["torch"] == torch.__version__
    assert report["settings"]["ks"] == [K] and report["settings"]["repeats"] == 2
    assert report["rows"] == [asdict(row) for row in rows]


@pytest.mark.parametrize(
    ("method", "k", "floor"),
    [
        ("sam", 1, 21.0),
        ("lookbehind", 3, 43.0),
        ("lookbehind_adaptive", 3, 43.0),
        ("lookbehind_switching", 3, 63.0),
        ("reference", 3, 43.0),
    ],
)
def test_floor_of_a_method_at_k_3(bench_script, method, k, floor):
    """With a pass of 10 ms and an update of 1 ms: SAM 2 passes and 1 update, same-batch
    Lookbehind 4 passes and 3 updates, minibatch switching 6 passes and 3 updates."""
    assert bench_script.Case(method, k).floor_ms(10.0, 1.0) == floor


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--methods", "sam,lookbehind_fast"], "lookbehind_fast"),
        (["--models", "mlp"], "resnet, vit"),
        (["--ks", "0"], "integers >= 1"),
        (["--repeats", "0"], "integer >= 1"),
        (["--warmup", "0"], "integer >= 1"),
        (["--device", "tpu"], "cpu or cuda"),
        (["--methods", "sam,trainer"], "list lookbehind too"),
    ],
)
def test_bad_arguments_are_rejected_with_the_allowed_values(bench_script, argv, message, capsys):
    with pytest.raises(SystemExit) as raised:
        bench_script.main(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_without_a_gpu_is_rejected(bench_script, capsys):
    with pytest.raises(SystemExit):
        bench_script.main(["--device", "cuda"])
    assert "no CUDA device" in capsys.readouterr().err
