"""What the recipes' evaluations report, and the evaluation flags refused before training
because they would fail only at the first evaluation or after training."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
from sklearn.metrics import top_k_accuracy_score
from transformers import EvalPrediction, TrainingArguments


def check_evaluation_flags(
    training_args: TrainingArguments,
    metrics: Sequence[str],
    scored_from_predictions: str | None,
    missing_metric_hint: str = "",
) -> None:
    """Refuse ``--prediction_loss_only`` when the evaluation computes ``scored_from_predictions``
    (e.g. ``"the accuracy"``; ``None``: nothing) from the predictions it would skip, and a
    ``--metric_for_best_model`` that is not among ``metrics`` (the evaluation's metrics without
    the ``eval_`` prefix); ``missing_metric_hint`` ends the second message."""
    if scored_from_predictions is not None and training_args.prediction_loss_only:
        raise ValueError(
            f"--prediction_loss_only skips the predictions that {scored_from_predictions} is "
            "computed from: drop --prediction_loss_only"
        )
    chosen = training_args.metric_for_best_model
    if chosen is not None and chosen.removeprefix("eval_") not in metrics:
        raise ValueError(
            f"--metric_for_best_model {chosen} is not among the evaluation's metrics "
            f"({', '.join(metrics)}): pick one of them{missing_metric_hint}"
        )


def top_k_accuracy(top_k: Sequence[int] = (1,)) -> Callable[[EvalPrediction], dict[str, float]]:
    """``compute_metrics`` for the Trainer: ``accuracy`` (top-1) and ``top{k}`` for each k > 1
    (with ``top1`` as well when any is asked for), as fractions in [0, 1]."""

    def compute_metrics(prediction: EvalPrediction) -> dict[str, float]:
        logits = np.asarray(prediction.predictions)
        labels = np.asarray(prediction.label_ids)
        classes = np.arange(logits.shape[-1])
        scores = {
            k: float(top_k_accuracy_score(labels, logits, k=k, labels=classes))
            for k in sorted({1, *top_k})
        }
        metrics = {"accuracy": scores[1]}
        if len(scores) > 1:
            metrics.update({f"top{k}": score for k, score in scores.items()})
        return metrics

    return compute_metrics


def track_best_accuracy(training_args: TrainingArguments, top_k: Sequence[int] = (1,)) -> None:
    """Let the Trainer keep the best evaluation accuracy in ``state.best_metric`` (it does so
    for ``metric_for_best_model`` at every evaluation), unless another metric was chosen.

    The evaluation flags are checked first (:func:`check_evaluation_flags`) against what the
    evaluation reports: the loss and ``top_k_accuracy(top_k)``."""
    one_prediction = EvalPrediction(np.eye(max(top_k) + 2)[:1], np.zeros(1, dtype=int))
    reported = ("loss", *top_k_accuracy(top_k)(one_prediction))
    check_evaluation_flags(training_args, reported, "the accuracy")
    if training_args.metric_for_best_model is None:
        training_args.metric_for_best_model = "accuracy"
        training_args.greater_is_better = True
