"""Fixtures and settings of the whole suite. The tests are grouped by layer: ``engine/`` (the
optimizer, its schedules, settings, faults, multi-tensor kernels, the reference, m-SAM, DDP and
FSDP2), ``trainer/`` (the Trainer layer, its mixin, TRL, callbacks, resume, faults, FSDP2),
``recipes/`` (``examples/`` and ``hf_lookbehind_recipes``), ``analysis/``, ``scripts/`` and
``docs/`` (the README's examples). What they share otherwise is the ``helpers`` package
(``tests/helpers``). Tests that take more than a few seconds are marked ``slow``
(``-m "not slow"`` leaves them out)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from helpers import SHARED_DATA

# The suite's models are tiny: one intra-op thread is fastest and keeps the two-process tests
# from oversubscribing a small CI machine.
torch.set_num_threads(1)


@pytest.fixture
def shared_data() -> Path:
    """The shared data sets (``../shared/data`` beside the checkout); the test is skipped where
    they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"shared data not found at {SHARED_DATA}")
    return SHARED_DATA
