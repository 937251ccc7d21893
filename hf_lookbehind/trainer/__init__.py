"""The Trainer layer: ``LookbehindTrainer`` (a drop-in ``transformers.Trainer``),
``LookbehindMixin`` for any Trainer subclass, and their settings (``LookbehindConfig``,
``LookbehindTrainingArguments``). Built on the engine's public surface only.

Modules, by job: ``trainer`` (the mixin and the Trainer, with the pass protocol), ``config``
(the flags), ``engine`` (the engine as the Trainer drives it), ``method_window`` (Sec. 5.4),
``passes`` (what only the first pass of a batch records), ``resume`` and ``checkpoint_files``
(saving, resuming and checking checkpoints).
"""

from .config import LookbehindConfig, LookbehindTrainingArguments
from .trainer import LookbehindMixin, LookbehindTrainer

__all__ = [
    "LookbehindConfig",
    "LookbehindMixin",
    "LookbehindTrainer",
    "LookbehindTrainingArguments",
]
