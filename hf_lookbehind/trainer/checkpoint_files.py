"""The files of a Trainer checkpoint as ``LookbehindTrainer`` reads them: which folder
``resume_from_checkpoint=True`` takes (the Trainer's choice), and a refusal, before any work, of
a checkpoint the Trainer would fail on or that cannot be resumed exactly: with the exception the
Trainer raises for it (type and message start), and the reason and the file added."""

from __future__ import annotations

import copy
import errno
import json
import logging
import os
import pickle
import re
import shutil
import zlib
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import PreTrainedModel, TrainerState
from transformers.trainer import FSDP_MODEL_NAME, TRAINER_STATE_NAME
from transformers.trainer_pt_utils import safe_globals
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, get_last_checkpoint
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


# Tensor names a refusal shows of a list (with the count of all).
SHOWN_NAMES = 5


def some_names(names: list[str]) -> str:
    """``names`` in a message: how many, and the first few."""
    if not names:
        return "none"
    shown = ", ".join(names[:SHOWN_NAMES])
    more = len(names) - SHOWN_NAMES
    return f"{len(names)} ({shown}{f' and {more} more' if more > 0 else ''})"


def with_message(error: BaseException, message: str) -> BaseException:
    """An exception of ``error``'s type (what the Trainer meets reading the same file) with
    ``message``."""
    try:
        rebuilt = type(error)(message)
    except Exception:  # a constructor of its own (json's JSONDecodeError)
        rebuilt = copy.copy(error)
        rebuilt.args = (message,)
    return rebuilt


def corrupt_file_error(path: str, error: BaseException) -> BaseException:
    """What the reader raised for a truncated or corrupt file (the Trainer's exception), its
    message followed by the file's name and what to do."""
    return with_message(
        error,
        f"{error} ({path} is truncated or corrupt: restore it from a copy, or resume from an "
        "earlier checkpoint)",
    )


MANIFEST = "lookbehind_manifest.json"
_CHUNK = 16 << 20


def file_digest(path: str) -> str:
    """The CRC-32 of a file's bytes, read in chunks (about 2.5 GB/s of CPU on one core)."""
    crc = 0
    with open(path, "rb") as file:
        while chunk := file.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def write_manifest(folder: str) -> None:
    """Record every file of a checkpoint with its size and CRC-32, in ``MANIFEST``, written
    last (and atomically): a resumed run checks each file against it."""
    files = {}
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, folder)
            if relative != MANIFEST:
                files[relative] = {"size": os.path.getsize(path), "crc32": file_digest(path)}
    written = os.path.join(folder, MANIFEST + ".tmp")
    with open(written, "w") as file:
        json.dump({"files": files}, file, indent=1)
    os.replace(written, os.path.join(folder, MANIFEST))


def check_manifest(folder: str) -> None:
    """Every file a checkpoint's ``MANIFEST`` lists that is still there has its saved size and
    CRC-32: a file damaged in place (flipped bytes) or copied in from another
    checkpoint is refused, named, before any work. Missing and truncated (unreadable) files are
    left to the checks that name them as such; a checkpoint without a manifest is not checked."""
    manifest = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest):
        return
    with open(manifest) as file:
        files = json.load(file)["files"]
    for relative, saved in files.items():
        path = os.path.join(folder, relative)
        if not os.path.isfile(path):
            continue
        size = os.path.getsize(path)
        if size != saved["size"] and not readable(path):
            continue  # truncated: its reader names it
        if size != saved["size"] or file_digest(path) != saved["crc32"]:
            raise ValueError(
                f"{path} differs from the file saved ({size} bytes and its CRC-32 against the "
                f"{saved['size']} bytes recorded in {manifest}): damaged, or copied in from "
                "another checkpoint; restore it, or resume from an earlier checkpoint"
            )


def readable(path: str) -> bool:
    """Whether a checkpoint file reads whole (a truncated one does not)."""
    try:
        if path.endswith(".safetensors"):
            with safe_open(path, framework="pt") as saved:
                saved.keys()
        elif path.endswith((".pt", ".pth", ".bin")):
            with safe_globals():
                torch.load(path, map_location="cpu", weights_only=True)
        elif path.endswith(".json"):
            with open(path) as file:
                json.load(file)
    except (*UNREADABLE, UnicodeDecodeError, ValueError):
        return False
    return True


def writing_failed(error: BaseException, folder: str) -> str:
    """Why writing a checkpoint into ``folder`` failed, in words: the file being written (the
    newest in the folder), the error, and the space left on the folder's disk."""
    written = [os.path.join(folder, name) for name in os.listdir(folder)]
    newest = max(written, key=os.path.getmtime, default=folder)
    free = shutil.disk_usage(folder).free
    cause = "the disk is full" if free < 1 << 20 else "see the error"
    return (
        f"writing {newest} failed ({error}); {free} bytes are left on the disk of {folder}, so "
        f"{cause}: free space or save elsewhere (--output_dir), then resume from the last "
        "complete checkpoint"
    )


def load_checkpoint_file(path: str, map_location: str | torch.device | None = None) -> Any:
    """``torch.load`` of a checkpoint file; a truncated or corrupt file is named as such."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except UNREADABLE as error:
        raise corrupt_file_error(path, error) from error


def checkpoint_step(folder: str) -> int | None:
    match = CHECKPOINT_FOLDER.match(os.path.basename(os.path.normpath(folder)))
    return int(match.group(1)) if match else None


def earlier_complete_checkpoint(folder: str) -> str | None:
    """The newest ``checkpoint-N`` beside ``folder``, older than it, whose saving finished."""
    step = checkpoint_step(folder)
    parent = os.path.dirname(os.path.normpath(folder))
    if step is None or not os.path.isdir(parent):
        return None
    older = {
        name: int(m.group(1))
        for name in os.listdir(parent)
        if (m := CHECKPOINT_FOLDER.match(name)) and int(m.group(1)) < step
    }
    for name in sorted(older, key=older.get, reverse=True):
        try:
            TrainerState.load_from_json(os.path.join(parent, name, TRAINER_STATE_NAME))
        except (OSError, ValueError, TypeError):
            continue
        return os.path.join(parent, name)
    return None


def unfinished_save(folder: str) -> str:
    earlier = earlier_complete_checkpoint(folder)
    if earlier is None:
        then = "resume from an earlier checkpoint"
    else:
        then = f"resume from {earlier}, the newest complete checkpoint before it"
    return f"the Trainer writes it last, so the saving of this checkpoint did not finish; {then}"


def read_trainer_state(folder: str) -> TrainerState:
    """The checkpoint's ``trainer_state.json``, which the Trainer writes last: without it (or
    with a truncated one) the saving of the checkpoint did not finish. Refused with the
    Trainer's exception (``FileNotFoundError``, or the JSON reader's)."""
    path = os.path.join(folder, TRAINER_STATE_NAME)
    if not os.path.isfile(path):
        reason = (
            "the checkpoint folder does not exist"
            if not os.path.isdir(folder)
            else unfinished_save(folder)
        )
        raise FileNotFoundError(errno.ENOENT, f"{os.strerror(errno.ENOENT)}: {path!r} ({reason})")
    try:
        return TrainerState.load_from_json(path)
    except (ValueError, TypeError) as error:
        raise with_message(
            error, f"{error} ({path} is truncated or corrupt: {unfinished_save(folder)})"
        ) from error


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


def other_model_files(folder: str) -> bool:
    """Weights the Trainer also resumes from: adapters in subfolders (several adapters), or an
    FSDP checkpoint (which it refuses itself without FSDP)."""
    for name in os.listdir(folder):
        sub = os.path.join(folder, name)
        if FSDP_MODEL_NAME in name and os.path.isdir(sub):
            return True
        if os.path.isdir(sub) and any(
            os.path.isfile(os.path.join(sub, adapter))
            for adapter in (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME)
        ):
            return True
    return os.path.isfile(os.path.join(folder, f"{FSDP_MODEL_NAME}.bin"))


def saved_names(path: str, model: nn.Module) -> tuple[set[str], set[str]] | None:
    """The tensor names a model file of ``model`` must hold, and those it may hold; None where
    the loading alone checks them (a transformers model may save fewer names: tied weights)."""
    if isinstance(model, PreTrainedModel):
        return None
    if os.path.basename(path) not in (ADAPTER_SAFE_WEIGHTS_NAME, ADAPTER_WEIGHTS_NAME):
        names = set(model.state_dict())
        return names, names
    try:
        from peft import PeftModel, get_peft_model_state_dict
    except ImportError:
        return None
    if not isinstance(model, PeftModel) or list(model.peft_config) != ["default"]:
        return None  # several adapters, or one of another name: in subfolders, PEFT loads them
    # PEFT's saving: the adapter's tensors, under names without the adapter's name; it may add
    # layers of the model under their own names (resized embeddings).
    required = set(get_peft_model_state_dict(model, save_embedding_layers=False))
    return required, required | set(model.state_dict())


def check_model_file(folder: str, model: nn.Module) -> None:
    """The checkpoint has a model file, as the Trainer asks (else its ``ValueError``); for a
    plain ``nn.Module`` (whose whole ``state_dict`` the Trainer saves) it holds exactly the
    model's tensors, for a PEFT model the active adapter's tensors as PEFT saves them."""
    found = [os.path.join(folder, name) for name in MODEL_FILES]
    found = [path for path in found if os.path.isfile(path)]
    if not found:
        if os.path.isdir(folder) and other_model_files(folder):
            return  # the Trainer's own loading
        reason = (
            "the folder does not exist"
            if not os.path.isdir(folder)
            else f"it holds no model file ({', '.join(MODEL_FILES)}); resume from an earlier "
            "checkpoint"
        )
        raise ValueError(f"Can't find a valid checkpoint at {folder}: {reason}")
    path = found[0]
    names = read_model_file(path)
    expected = None if names is None else saved_names(path, model)
    if expected is None:
        return
    required, allowed = expected
    missing, unexpected = sorted(required - names), sorted(names - allowed)
    if missing or unexpected:
        raise ValueError(
            f"{path} was written for another model (missing: {some_names(missing)}; not in "
            f"this model: {some_names(unexpected)}); resume with the model it was written for, "
            "or start a new run"
        )


def check_checkpoint(folder: str, model: nn.Module | None) -> None:
    """Refuse, before any work, a checkpoint the Trainer cannot resume, in the Trainer's order
    and with its exceptions: (``model``: outside FSDP) no model file that fits ``model``, no
    readable ``trainer_state.json``."""
    if model is not None:
        check_model_file(folder, model)
    read_trainer_state(folder)


def check_rng_state(folder: str, process_index: int, world_size: int, engine: bool) -> None:
    """The checkpoint's random state for this process (``rng_state.pth``, or
    ``rng_state_{i}.pth`` under several processes) reads, or a truncated one is named before any
    work. ``engine``: its absence is said in a warning (dropout masks and sampling start anew,
    so the run does not continue exactly), where the Trainer logs it at the info level."""
    name = f"rng_state_{process_index}.pth" if world_size > 1 else "rng_state.pth"
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        if engine:
            logger.warning(
                "%s is missing: the resumed run draws other dropout masks and samples than the "
                "uninterrupted one, so it does not continue exactly",
                path,
            )
        return
    try:
        with safe_globals():
            torch.load(path, weights_only=True)
    except (*UNREADABLE, UnicodeDecodeError, ValueError) as error:
        raise ValueError(
            f"{path} is truncated or corrupt ({type(error).__name__}: {error}); restore it from "
            "a copy, or resume from an earlier checkpoint"
        ) from error


def last_checkpoint(output_dir: str) -> str:
    """The folder ``resume_from_checkpoint=True`` resumes from: the Trainer's choice, the newest
    ``checkpoint-N`` (``transformers.trainer_utils.get_last_checkpoint``)."""
    folder = get_last_checkpoint(output_dir)
    if folder is None:
        raise ValueError(f"No valid checkpoint found in output directory ({output_dir})")
    return folder


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
