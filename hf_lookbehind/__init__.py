"""Lookbehind-SAM (Mordido et al., ICML 2024) for PyTorch and the Hugging Face Trainer.

The core (:class:`Lookbehind`) needs only torch. The Trainer layer (``LookbehindTrainer``,
``LookbehindTrainingArguments``, and ``LookbehindMixin`` with ``LookbehindConfig`` for any
Trainer subclass) is imported on first use and needs ``transformers``.
"""

from typing import Any

from .alpha import adaptive_alpha
from .optimizer import Lookbehind
from .param_groups import asam_param_groups
from .perturbation import ASAM, SAM, FisherSAM, Perturbation
from .settings import METHODS

__all__ = [
    "ASAM",
    "METHODS",
    "SAM",
    "EpochTimer",
    "FisherSAM",
    "Lookbehind",
    "LookbehindConfig",
    "LookbehindMixin",
    "LookbehindTrainer",
    "LookbehindTrainingArguments",
    "Perturbation",
    "adaptive_alpha",
    "asam_param_groups",
]
__version__ = "0.1.0"

_TRAINER_LAYER = {
    "EpochTimer": ".callbacks",
    "LookbehindConfig": ".training_args",
    "LookbehindMixin": ".trainer",
    "LookbehindTrainer": ".trainer",
    "LookbehindTrainingArguments": ".training_args",
}


def __getattr__(name: str) -> Any:
    if name in _TRAINER_LAYER:
        import importlib

        return getattr(importlib.import_module(_TRAINER_LAYER[name], __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
