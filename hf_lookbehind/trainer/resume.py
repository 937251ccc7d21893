"""How ``LookbehindTrainer`` saves and resumes: :class:`CheckpointResume`, the overrides of the
Trainer's checkpoint methods that the Trainer layer mixes in.

``resume_from_checkpoint`` takes the checkpoint the Trainer takes, and a checkpoint the Trainer
would fail on is refused with the Trainer's exception, before any work
(:mod:`~hf_lookbehind.trainer.checkpoint_files`). With ``--lookbehind_method none`` the files
are read as the Trainer reads them (an optimizer state the engine wrote loses its entries).
With the engine a resumed run is bit-identical or refused: a missing optimizer file is refused
where the checkpoint cut a Lookbehind cycle (whose fast and perturbed weights were in it), and
otherwise resumed with what starts anew said; a missing scheduler file is rebuilt from the step
count. Under FSDP2 every process saves and loads its own shard of the engine's state.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from typing import Any

import torch
from transformers.trainer import OPTIMIZER_NAME, SCHEDULER_NAME, TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, TrainOutput

from ..engine import saved_record
from .checkpoint_files import (
    check_checkpoint,
    check_manifest,
    check_rng_state,
    last_checkpoint,
    load_checkpoint_file,
    with_message,
    without_lookbehind_entries,
    write_manifest,
    writing_failed,
)

OPTIMIZER_SHARD = "lookbehind_optimizer_rank{rank}.pt"
# The engine's cycle position, beside the optimizer file: what a checkpoint that lost that file
# still tells of the open cycle.
CYCLE_RECORD = "lookbehind_cycle.json"

logger = logging.getLogger(__name__)


class CheckpointResume:
    """The checkpoint overrides of :class:`~hf_lookbehind.LookbehindMixin` (it provides
    ``lookbehind``, the engine once the optimizer exists)."""

    @property
    def saves_optimizer_shards(self) -> bool:
        """Under FSDP2 every process saves and loads its own shard of the engine's state (base
        optimizer state, mid-cycle buffers, run state) in ``OPTIMIZER_SHARD``. The Trainer's
        own FSDP path loads through ``torch.distributed.checkpoint``'s
        ``set_optimizer_state_dict``, whose template comes from a ``step(closure=None)`` that
        the engine does not run, so it cannot load the base optimizer's state or the buffers."""
        return self.is_fsdp_enabled and self.lookbehind is not None

    def train(
        self,
        resume_from_checkpoint: str | bool | None = None,
        trial: Any = None,
        ignore_keys_for_eval: list[str] | None = None,
    ) -> TrainOutput:
        """The Trainer's ``train()``. ``resume_from_checkpoint=True`` takes the newest
        checkpoint, as the Trainer does; a checkpoint is checked before any work (see
        :func:`check_checkpoint`)."""
        if resume_from_checkpoint is True:
            resume_from_checkpoint = last_checkpoint(self.args.output_dir)
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):
            model = None if self.is_fsdp_enabled else self.model
            check_checkpoint(str(resume_from_checkpoint), model)
            check_manifest(str(resume_from_checkpoint))
            check_rng_state(
                str(resume_from_checkpoint),
                self.args.process_index,
                self.args.world_size,
                engine=self.uses_lookbehind,
            )
        output = super().train(resume_from_checkpoint, trial, ignore_keys_for_eval)
        self._report_an_open_last_cycle()
        return output

    def _announce_an_open_last_cycle(self, max_steps: int) -> None:
        """Before training: in switching and lookahead mode, the inner steps after the last
        complete cycle never reach the slow weights that the final model holds."""
        engine = self.lookbehind
        if engine is None or engine.method_window is not None or not engine.settings.cycles:
            return
        left = (engine.cycle_position + max_steps - self.state.global_step) % engine.settings.k
        if left:
            folded = max_steps - left
            logger.warning(
                "with max_steps=%d, the cycles of k=%d inner steps end at step %d: the last %d "
                "inner steps will not reach the slow weights, so the final model will hold the "
                "slow weights of step %d; set max_steps to %d or %d to fold every step in",
                max_steps,
                engine.settings.k,
                folded,
                left,
                folded,
                folded,
                folded + engine.settings.k,
            )

    def _report_an_open_last_cycle(self) -> None:
        engine = self.lookbehind
        if engine is None or engine.cycle_position == 0:
            return
        logger.warning(
            "the final model holds the slow weights of the last complete cycle of k=%d inner "
            "steps; the last %d inner steps were not folded in (they stay in the optimizer "
            "state, so a run resumed from a checkpoint of this step completes the cycle)",
            engine.settings.k,
            engine.cycle_position,
        )

    def _optimizer_file(self, checkpoint: str) -> str:
        if self.saves_optimizer_shards:
            return os.path.join(checkpoint, OPTIMIZER_SHARD.format(rank=self.args.process_index))
        return os.path.join(checkpoint, OPTIMIZER_NAME)

    def _read_optimizer_state(self, path: str) -> dict[str, Any] | None:
        """The optimizer state in ``path``; None if the file is missing and nothing but the base
        optimizer's state is lost without it (no Lookbehind cycle was open)."""
        if os.path.isfile(path):
            if self.saves_optimizer_shards:
                return load_checkpoint_file(path)
            on_device = self.args.world_size > 1 and self.args.device.type != "cpu"
            return load_checkpoint_file(path, self.args.device if on_device else "cpu")
        if self.saves_optimizer_shards:
            raise FileNotFoundError(
                f"{path} not found: a FSDP2 checkpoint of LookbehindTrainer resumes with the "
                "number of processes that wrote it (one optimizer shard per process)"
            )
        self._refuse_an_open_cycle(path)
        logger.warning(
            "%s is missing: resuming with a new base optimizer, whose state (momentum, Adam's "
            "moments) starts anew, as do the engine's counters (gradient_computations, "
            "skipped_steps)",
            path,
        )
        return None

    def _refuse_an_open_cycle(self, optimizer_file: str) -> None:
        """Without the optimizer file, the cycle position recorded beside it
        (``CYCLE_RECORD``) tells whether the checkpoint cut a Lookbehind cycle, whose fast and
        perturbed weights were in that file; a checkpoint without the record is refused
        wherever the setup could have cut one."""
        engine = self.lookbehind
        if engine is None:
            return
        record = os.path.join(os.path.dirname(optimizer_file), CYCLE_RECORD)
        if os.path.isfile(record):
            with open(record) as file:
                position = json.load(file)["cycle_position"]
        elif engine.settings.cycles or engine.method_window is not None:
            raise ValueError(
                f"{optimizer_file} and {record} are missing, so nothing tells whether the "
                "checkpoint cut a Lookbehind cycle; restore the optimizer file, or resume from "
                "an earlier checkpoint"
            )
        else:
            position = 0
        if position:
            raise ValueError(
                f"{optimizer_file} is missing, but the checkpoint is {position} of "
                f"{engine.settings.k} inner steps into a Lookbehind cycle (recorded in {record}), "
                "whose fast and perturbed weights were in that file; restore it, or resume from "
                "a checkpoint between cycles"
            )

    def _load_scheduler(self, path: str) -> None:
        """The schedule of ``path``; without the file, the new schedule stepped once per step
        of ``trainer_state.json``'s ``global_step`` (as the Trainer steps it)."""
        if os.path.isfile(path):
            self.lr_scheduler.load_state_dict(load_checkpoint_file(path))
            return
        if isinstance(self.lr_scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise FileNotFoundError(
                f"{path} is missing, and a reduce-on-plateau schedule cannot be rebuilt from the "
                "step count; restore the file, or resume from an earlier checkpoint"
            )
        steps = self.state.global_step
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # "lr_scheduler.step() before optimizer.step()"
            for _ in range(steps):
                self.lr_scheduler.step()
        logger.warning(
            "%s is missing: the learning-rate schedule was rebuilt by stepping it %d times "
            "(global_step in %s)",
            path,
            steps,
            TRAINER_STATE_NAME,
        )

    def _follow_scheduler(self) -> None:
        """A new base optimizer starts at the learning rates of the resumed schedule."""
        for group, lr in zip(self.optimizer.param_groups, self.lr_scheduler.get_last_lr()):
            group["lr"] = lr

    def _load_optimizer_state(self, path: str, state_dict: dict[str, Any]) -> None:
        """Load ``state_dict`` (read from ``path``); ``--lookbehind_method none`` drops the
        entries of a Lookbehind checkpoint (the model file holds the slow weights)."""
        if self.lookbehind is None:
            state_dict, dropped = without_lookbehind_entries(state_dict)
            if dropped:
                logger.warning(
                    "%s was written by the Lookbehind engine; --lookbehind_method none drops "
                    "its entries %s and keeps the base optimizer's state (the model file holds "
                    "the slow weights)",
                    path,
                    ", ".join(dropped),
                )
        elif saved_record(state_dict) is None:
            logger.warning(
                "%s was written without the Lookbehind engine: the engine starts its first "
                "cycle here, with the base optimizer's state",
                path,
            )
        try:
            self.optimizer.load_state_dict(state_dict)
        except ValueError as error:
            raise ValueError(
                f"{path} does not fit this run: {error}; resume with the settings it was "
                "written with, or start a new run"
            ) from error

    # ------------------------------------- overrides of private Trainer methods (transformers 5.x)
    def _prepare_for_training(self, max_steps: int, train_dataloader, resume_from_checkpoint):
        prepared = super()._prepare_for_training(
            max_steps, train_dataloader, resume_from_checkpoint
        )
        self._announce_an_open_last_cycle(max_steps)  # the checkpoint's cycle is loaded now
        return prepared

    def _save_checkpoint(self, model: Any, trial: Any) -> None:
        """The Trainer's checkpoint, and with the engine its manifest, written last: every
        file's size and CRC-32, checked before a run resumes from it."""
        super()._save_checkpoint(model, trial)
        if self.lookbehind is None:
            return
        self.accelerator.wait_for_everyone()  # every process's files are written
        if self.args.should_save:
            name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
            write_manifest(os.path.join(self._get_output_dir(trial=trial), name))

    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The Trainer's save, with the engine's cycle record; a write that fails (a full disk)
        is named: the file, the folder and the space left on its disk."""
        try:
            self._write_optimizer_and_scheduler(output_dir)
        except (OSError, RuntimeError) as error:
            raise with_message(error, writing_failed(error, output_dir)) from error

    def _write_optimizer_and_scheduler(self, output_dir: str) -> None:
        engine = self.lookbehind
        if engine is not None and self.args.should_save:
            with open(os.path.join(output_dir, CYCLE_RECORD), "w") as file:
                json.dump({"cycle_position": engine.cycle_position}, file)
        if not self.saves_optimizer_shards:
            super()._save_optimizer_and_scheduler(output_dir)
            return
        # The Trainer's FSDP save goes through torch.distributed.checkpoint, which takes only
        # per-parameter entries; the engine's own shard file holds everything.
        with self.lookbehind.per_parameter_state_dict():
            super()._save_optimizer_and_scheduler(output_dir)
        torch.save(self.lookbehind.state_dict(), self._optimizer_file(output_dir))

    def _load_optimizer_and_scheduler(self, checkpoint: str | None) -> None:
        """``--lookbehind_method none``: as the Trainer, which loads neither file where one is
        missing. With the engine, where the Trainer would skip a missing optimizer or scheduler
        file (and with it the other one): refuse if the checkpoint cut a Lookbehind cycle, else
        load what is there and say what starts anew. A truncated file is named."""
        if checkpoint is None or (self.is_fsdp_enabled and not self.saves_optimizer_shards):
            return super()._load_optimizer_and_scheduler(checkpoint)
        optimizer_file = self._optimizer_file(checkpoint)
        scheduler_file = os.path.join(checkpoint, SCHEDULER_NAME)
        if self.lookbehind is None and not (
            os.path.isfile(optimizer_file) and os.path.isfile(scheduler_file)
        ):
            logger.warning(
                "%s lacks %s: the optimizer and the learning-rate schedule start anew, as "
                "transformers.Trainer starts them",
                checkpoint,
                " and ".join(
                    os.path.basename(path)
                    for path in (optimizer_file, scheduler_file)
                    if not os.path.isfile(path)
                ),
            )
            return super()._load_optimizer_and_scheduler(checkpoint)
        state_dict = self._read_optimizer_state(optimizer_file)
        self._load_scheduler(scheduler_file)
        if state_dict is None:
            self._follow_scheduler()
        else:
            self._load_optimizer_state(optimizer_file, state_dict)
