"""Lookbehind-SAM (Mordido et al., ICML 2024) for PyTorch and the Hugging Face Trainer.

The core (:class:`Lookbehind`) needs only torch. The Trainer layer (``LookbehindTrainer``,
``LookbehindTrainingArguments``) is imported lazily and needs ``transformers``.
"""

from .alpha import adaptive_alpha
from .optimizer import METHODS, Lookbehind
from .param_groups import asam_param_groups

__all__ = ["METHODS", "Lookbehind", "adaptive_alpha", "asam_param_groups"]
__version__ = "0.1.0"
