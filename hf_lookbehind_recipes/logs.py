"""The recipes' logging, set up as in the transformers examples."""

from __future__ import annotations

import logging
import sys

import datasets
import transformers
from transformers import TrainingArguments


def configure_logging(training_args: TrainingArguments) -> None:
    """Log to stdout at the process's level (``--log_level``, ``--log_level_replica``): the
    recipe's loggers, ``datasets`` and ``transformers``."""
    level = training_args.get_process_log_level()
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        handlers=[logging.StreamHandler(sys.stdout)],
        level=level,
    )
    datasets.utils.logging.set_verbosity(level)
    transformers.utils.logging.set_verbosity(level)
