"""What the tests share, imported by name (``from helpers.models import make_model``): pytest puts
``tests/`` on ``sys.path`` (``pythonpath`` in ``pyproject.toml``), and
:func:`helpers.two_processes.run_two_processes` puts it on the ``PYTHONPATH`` of the scripts it
launches, so that the harness scripts here import it too.

* :mod:`helpers.models`: a tiny float64 model, its minibatches and base optimizers;
* :mod:`helpers.reference`: the engine and the 2k-pass reference on twin models;
* :mod:`helpers.trainer_harness`: a tiny Trainer problem and its plain-loop expectation (also a
  two-process script);
* :mod:`helpers.fsdp2_harness`, :mod:`helpers.fsdp2_trainer_harness`,
  :mod:`helpers.ddp_engine_harness`: scripts run in two processes, with what their tests read;
* :mod:`helpers.two_processes`: the launcher of those scripts;
* :mod:`helpers.tiny_lm`: tiny causal and reward language models and their data (TRL, SFT);
* :mod:`helpers.translation`: the smoke-run arguments of the translation recipe.

The recipes' modules are the installed ``hf_lookbehind_recipes`` package; the recipe scripts
(``examples/<recipe>/run_*.py`` and the modules beside them) and ``scripts/`` import their
neighbours by name, and pytest's ``pythonpath`` puts their folders on ``sys.path`` too, so that
the tests import them the same way (``from run_lifelong import main``).
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTS = ROOT / "tests"
HELPERS = TESTS / "helpers"
SHARED_DATA = ROOT.parent / "shared" / "data"
