"""The engine's state dict: the base optimizer's, with the run state and, in the middle of a
cycle, the buffers the cycle carries; and the checks a checkpoint passes before it is loaded.

The run state (cycle position, counters, the setup's record) is ``state["lookbehind_run"]`` of
the base optimizer, so it travels wherever the base optimizer's state does (a Trainer
checkpoint keeps only ``state`` and ``param_groups``). Mid-cycle buffers (switching and
lookahead) travel inside the per-parameter entries; between outer steps the buffers hold
nothing the next step reads, so they are left out.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from .schedules import CYCLE_BUFFERS
from .settings import LookbehindSettings
from .step import FAST, FIRST_FAST, PERTURBED

logger = logging.getLogger("hf_lookbehind")

RUN_STATE = "lookbehind_run"


def fresh_run_state(run: dict[str, Any], settings: LookbehindSettings) -> dict[str, Any]:
    """``run`` with every entry a step reads (kept where present), recording ``settings``."""
    run.setdefault("cycle_position", 0)
    run.setdefault("cycle_adaptive", False)
    run.setdefault("cycle_nonfinite", None)
    run.setdefault("skipped_steps", None)
    run.setdefault("last_alpha", None)
    run.setdefault("gradient_computations", 0)
    run["settings"] = settings.record()
    return run


def saved_record(state_dict: dict[str, Any]) -> dict[str, Any] | None:
    """The setup record a state dict was written with, or None for a base optimizer's own."""
    run = state_dict["state"].get(RUN_STATE)
    return None if run is None else run.get("settings")


def pack(
    state_dict: dict[str, Any], buffers: dict[str, list[torch.Tensor]], position: int
) -> dict[str, Any]:
    """``state_dict`` with the open cycle's buffers in the per-parameter entries."""
    if position == 0:
        return state_dict
    packed = dict(state_dict["state"])
    for key in CYCLE_BUFFERS:
        for index, tensor in enumerate(buffers.get(key) or []):
            packed[index] = {**packed.get(index, {}), key: tensor}
    return {**state_dict, "state": packed}


def unpack(
    state_dict: dict[str, Any],
) -> tuple[dict[str, Any], dict[str, dict[int, torch.Tensor]], dict[str, Any] | None]:
    """The base optimizer's own state dict, the cycle's buffers by key and parameter index, and
    the run state (None in a base optimizer's own state dict)."""
    entries, buffers = {}, {}
    for index, entry in state_dict["state"].items():
        if index == RUN_STATE:
            continue
        entries[index] = {k: v for k, v in entry.items() if k not in CYCLE_BUFFERS}
        for key in CYCLE_BUFFERS:
            if key in entry:
                buffers.setdefault(key, {})[index] = entry[key]
    run = state_dict["state"].get(RUN_STATE)
    return {**state_dict, "state": entries}, buffers, None if run is None else dict(run)


def check_resumable(
    settings: LookbehindSettings, state_dict: dict[str, Any], parameters: int
) -> list[str]:
    """Refuse a checkpoint whose setup cannot be resumed with ``settings``; return the settings
    that changed where a change is allowed (each logged): between outer steps ``rho``,
    ``alpha``, ``adaptive_alpha``, ``max_grad_norm`` and ``batchnorm_update``; in the middle of
    a cycle none, and the cycle's buffers must be there for every parameter."""
    saved = saved_record(state_dict)
    if saved is None:
        return []
    run = state_dict["state"][RUN_STATE]
    position = run.get("cycle_position", 0)
    refused = settings.refused_changes(saved, mid_cycle=bool(position))
    if refused:
        details = ", ".join(f"{key}={old!r} (now {new!r})" for key, (old, new) in refused.items())
        where = (
            f"in the middle of a cycle ({position} of {saved.get('k')} inner steps done), where "
            "every setting must match"
            if position
            else "between outer steps, where only rho, alpha, adaptive_alpha, max_grad_norm and "
            "batchnorm_update may change"
        )
        raise ValueError(
            f"checkpoint was written with a different Lookbehind setup: {details}; it was saved "
            f"{where}"
        )
    changed = settings.changes_from(saved)
    for key, (old, new) in changed.items():
        logger.warning("resuming with %s=%r (the checkpoint was written with %r)", key, new, old)
    if position:
        needed = [FAST] if settings.method == "lookahead" else [FAST, PERTURBED]
        if run.get("cycle_adaptive"):
            needed.append(FIRST_FAST)
        entries = state_dict["state"]
        missing = [
            index
            for index in range(parameters)
            if any(key not in entries.get(index, {}) for key in needed)
        ]
        if missing:
            shown = ", ".join(map(str, missing[:5])) + (" ..." if len(missing) > 5 else "")
            raise ValueError(
                f"checkpoint was saved in the middle of a cycle ({position} of {settings.k} "
                f"inner steps done) but lacks the cycle's buffers {needed} for {len(missing)} "
                f"parameters ({shown}): it cannot be resumed exactly; resume from a checkpoint "
                "saved between outer steps"
            )
    return list(changed)
