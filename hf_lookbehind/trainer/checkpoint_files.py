"""The files of a Trainer checkpoint as ``LookbehindTrainer`` reads them: which folder
``resume_from_checkpoint=True`` takes, and a refusal, naming the file, of a checkpoint that is
incomplete, truncated or written for another model, before any work."""

from __future__ import annotations

import logging
import os
import pickle
import re
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PreTrainedModel, TrainerState
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import (
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    SAFE_WEIGHTS_NAME,
    WEIGHTS_INDEX_NAME,
    WEIGHTS_NAME,
)

logger = logging.getLogger(__name__)

CHECKPOINT_FOLDER = re.compile(rf"^{PREFIX_CHECKPOINT_DIR}-(\d+)$")
# The model files the Trainer resumes from, in the order it looks for them.
MODEL_FILES = (
    SAFE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    SAFE_WEIGHTS_INDEX_NAME,
    WEIGHTS_INDEX_NAME,
    ADAPTER_SAFE_WEIGHTS_NAME,
    ADAPTER_WEIGHTS_NAME,
)
# What torch.load and safetensors raise for a truncated or corrupt file.
UNREADABLE = (OSError, EOFError, RuntimeError, pickle.UnpicklingError, SafetensorError)
LOOKBEHIND_PREFIX = "lookbehind_"
ASAM_SCALE = "asam_scale"


def corrupt_file_error(path: str, error: BaseException) -> ValueError:
    return ValueError(
        f"{path} is truncated or corrupt ({type(error).__name__}: {error}); restore it from a "
        "copy, or resume from an earlier checkpoint"
    )


def load_checkpoint_file(path: str, map_location: str | torch.device | None = None) -> Any:
    """``torch.load`` of a checkpoint file; a truncated or corrupt file is named as such."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except UNREADABLE as error:
        raise corrupt_file_error(path, error) from error


def read_trainer_state(folder: str) -> TrainerState:
    """The checkpoint's ``trainer_state.json``, which the Trainer writes last: without it (or
    with a truncated one) the saving of the checkpoint did not finish."""
    path = os.path.join(folder, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"{path} is missing: the Trainer writes it last, so the saving of this checkpoint "
            "did not finish; resume from an earlier checkpoint (resume_from_checkpoint=True "
            "takes the newest complete one)"
        )
    try:
        return TrainerState.load_from_json(path)
    except (ValueError, TypeError) as error:
        raise corrupt_file_error(path, error) from error


def read_model_file(path: str) -> set[str] | None:
    """The tensor names of a single-file model (None for an index), read so that a truncated
    or corrupt file is named as such before any work."""
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as saved:
                return set(saved.keys())
        if path.endswith(".bin"):
            return set(torch.load(path, map_location="cpu", mmap=True, weights_only=True))
    except UNREADABLE as error:
        raise corrupt_file_error(path, error) from error
    return None


def check_model_file(folder: str, model: nn.Module) -> None:
    """The checkpoint has a complete model file; for a plain ``nn.Module`` (whose whole
    ``state_dict`` the Trainer saves) it holds exactly the model's tensors. A transformers
    model may save fewer (tied weights), so only its loading checks it."""
    found = [os.path.join(folder, name) for name in MODEL_FILES]
    found = [path for path in found if os.path.isfile(path)]
    if not found:
        raise FileNotFoundError(
            f"{os.path.join(folder, SAFE_WEIGHTS_NAME)} is missing (nor is there any other model "
            f"file: {', '.join(MODEL_FILES[1:])}): the checkpoint holds no weights; resume from "
            "an earlier checkpoint"
        )
    path = found[0]
    names = read_model_file(path)
    if names is None or isinstance(model, PreTrainedModel):
        return
    expected = set(model.state_dict())
    missing, unexpected = sorted(expected - names), sorted(names - expected)
    if missing or unexpected:
        raise ValueError(
            f"{path} was written for another model (missing: {', '.join(missing) or 'none'}; "
            f"not in this model: {', '.join(unexpected) or 'none'}); resume with the model it "
            "was written for, or start a new run"
        )


def check_checkpoint(folder: str, model: nn.Module | None) -> None:
    """Refuse, before any work, a checkpoint the Trainer cannot resume: no folder, no readable
    ``trainer_state.json``, or (``model``: outside FSDP) no model file that fits ``model``."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"checkpoint folder {folder} not found")
    read_trainer_state(folder)
    if model is not None:
        check_model_file(folder, model)


def newest_complete_checkpoint(output_dir: str) -> str:
    """The folder ``resume_from_checkpoint=True`` resumes from: the newest ``checkpoint-N`` (as
    ``transformers.trainer_utils.get_last_checkpoint`` picks it) whose saving finished; each
    newer folder whose saving was interrupted is skipped with a warning."""
    names = os.listdir(output_dir) if os.path.isdir(output_dir) else []
    steps = {name: int(m.group(1)) for name in names if (m := CHECKPOINT_FOLDER.match(name))}
    for name in sorted(steps, key=steps.get, reverse=True):
        folder = os.path.join(output_dir, name)
        if not os.path.isdir(folder):
            continue
        try:
            read_trainer_state(folder)
        except (OSError, ValueError):
            logger.warning(
                "skipping %s: its saving was interrupted (%s is missing or unreadable); resuming "
                "from the newest complete checkpoint before it",
                folder,
                TRAINER_STATE_NAME,
            )
            continue
        return folder
    raise ValueError(f"No valid checkpoint found in output directory ({output_dir})")


def without_lookbehind_entries(state_dict: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """A Lookbehind state dict as the base optimizer alone would have written it: without the
    engine's buffers, run state and hyper-parameters (``lookbehind_*``: entries of the
    per-parameter state, the ``state["lookbehind_run"]`` entry and the groups' entries) and the
    groups' ``asam_scale``. Returns it and the names of the dropped entries."""
    dropped: set[str] = set()

    def keep(entries: dict[str, Any]) -> dict[str, Any]:
        ours = {key for key in entries if key.startswith(LOOKBEHIND_PREFIX) or key == ASAM_SCALE}
        dropped.update(ours)
        return {key: value for key, value in entries.items() if key not in ours}

    state: dict[Any, Any] = {}
    for index, entry in state_dict["state"].items():
        if isinstance(index, str) and index.startswith(LOOKBEHIND_PREFIX):
            dropped.add(index)  # the run state, not a parameter's entry
        else:
            state[index] = keep(entry)
    stripped = {
        **state_dict,
        "state": state,
        "param_groups": [keep(group) for group in state_dict["param_groups"]],
    }
    return stripped, sorted(dropped)
