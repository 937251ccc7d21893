"""Lookbehind-SAM (Mordido et al., ICML 2024) for PyTorch and the Hugging Face Trainer.

Two layers: the engine (:mod:`hf_lookbehind.engine`: :class:`Lookbehind`, needs only torch) and
the Trainer layer (:mod:`hf_lookbehind.trainer`: ``LookbehindTrainer``,
``LookbehindTrainingArguments``, and ``LookbehindMixin`` with ``LookbehindConfig`` for any
Trainer subclass), imported on first use and needing ``transformers``.
"""

from typing import Any

from .engine import (
    ASAM,
    METHODS,
    NORM_EPS,
    SAM,
    BufferFootprint,
    FisherSAM,
    Lookbehind,
    LookbehindSettings,
    LookbehindStats,
    Perturbation,
    adaptive_alpha,
    asam_param_groups,
)

__all__ = [
    "ASAM",
    "METHODS",
    "NORM_EPS",
    "SAM",
    "BufferFootprint",
    "FisherSAM",
    "Lookbehind",
    "LookbehindConfig",
    "LookbehindMixin",
    "LookbehindSettings",
    "LookbehindStats",
    "LookbehindTrainer",
    "LookbehindTrainingArguments",
    "Perturbation",
    "adaptive_alpha",
    "asam_param_groups",
]
__version__ = "0.1.0"

_TRAINER_LAYER = (
    "LookbehindConfig",
    "LookbehindMixin",
    "LookbehindTrainer",
    "LookbehindTrainingArguments",
)


def __getattr__(name: str) -> Any:
    if name in _TRAINER_LAYER:
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
