"""The recipes' train/save/log routine: train with the epoch timer, save the model, the
trainer state and the metrics (``train_results.json``, ``eval_results.json`` and
``all_results.json`` in the output directory), and log them."""

from __future__ import annotations

import math

from transformers import Trainer

from hf_lookbehind_recipes.epoch_timer import EpochTimer


def train_timed(trainer: Trainer) -> dict[str, float]:
    """Train (resuming from ``--resume_from_checkpoint``) with an :class:`EpochTimer`:
    the Trainer's train metrics with ``train_seconds_per_epoch`` (mean over the epochs after the
    first) and ``train_seconds`` (all epochs; evaluations and saves excluded)."""
    timer = EpochTimer()
    trainer.add_callback(timer)
    result = trainer.train(resume_from_checkpoint=trainer.args.resume_from_checkpoint)
    return {
        **result.metrics,
        "train_seconds_per_epoch": timer.seconds_per_epoch(),
        "train_seconds": sum(timer.epoch_seconds),
    }


def record_metrics(trainer: Trainer, split: str, metrics: dict[str, float]) -> None:
    """Log ``metrics`` and write them to ``<split>_results.json`` and ``all_results.json``."""
    trainer.log_metrics(split, metrics)
    trainer.save_metrics(split, metrics)


def train_and_save(trainer: Trainer, **extra_metrics: float) -> dict[str, float]:
    """Train (:func:`train_timed`), save the model and the trainer state, and record the train
    metrics with ``extra_metrics``."""
    metrics = {**train_timed(trainer), **extra_metrics}
    trainer.save_model()
    record_metrics(trainer, "train", metrics)
    trainer.save_state()
    return metrics


def train_and_evaluate(trainer: Trainer) -> dict[str, float]:
    """The image recipes' run: train (``--do_train``, :func:`train_and_save`), evaluate the final
    (slow) weights (``--do_eval``) and record the metrics: ``all_results.json`` holds
    ``eval_accuracy`` (final), ``best_eval_accuracy`` (best over the evaluations during training
    and the final one) and ``train_seconds_per_epoch``."""
    args = trainer.args
    metrics: dict[str, float] = {}
    if args.do_train:
        metrics.update(train_and_save(trainer))
    if args.do_eval:
        eval_metrics = trainer.evaluate()
        best_during_training = trainer.state.best_metric
        if args.metric_for_best_model != "accuracy" or best_during_training is None:
            best_during_training = -math.inf
        eval_metrics["best_eval_accuracy"] = max(
            best_during_training, eval_metrics["eval_accuracy"]
        )
        record_metrics(trainer, "eval", eval_metrics)
        metrics.update(eval_metrics)
    return metrics
