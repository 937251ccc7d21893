"""Supervised fine-tuning (instruction tuning) of a causal language model with LoRA adapters and
TRL's ``SFTTrainer``, trained with AdamW, SAM or Lookbehind-SAM (``--lookbehind_method``).

    accelerate launch examples/sft/run_sft.py \\
        --model_name_or_path Qwen/Qwen2.5-0.5B --dataset_name trl-lib/Capybara \\
        --output_dir runs/sft_lookbehind --lookbehind_method lookbehind --minibatch_switching

The flags are those of ``ModelArguments`` and ``DataArguments`` below, TRL's ``SFTConfig``
(with its own defaults) and ``hf_lookbehind.LookbehindConfig``. See README.md for the command of
each method. Evaluation runs on the slow weights; the adapter is saved to ``--output_dir`` and
the metrics to ``all_results.json`` (``train_loss``, ``eval_loss``, ``eval_perplexity``,
``eval_mean_token_accuracy``, ``gradient_computations``, ...).

TRL trains in bfloat16 by default, which needs a GPU or ``--use_cpu`` (bfloat16 on the CPU);
on a machine without a GPU and without ``--use_cpu`` the recipe's default is float32 instead of
TRL's error. Without the hub it stops at once with the flags for local files and the tiny
offline command of README.md.
"""

from __future__ import annotations

import sys

from hf_lookbehind_recipes.offline import exit_if_hub_unreachable

if __name__ == "__main__":  # without the hub, fail in a second rather than after the imports
    exit_if_hub_unreachable("sft", sys.argv[1:])

import argparse
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import datasets
import torch
import transformers
from datasets import DatasetDict, load_dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, HfArgumentParser, set_seed
from transformers.hf_argparser import string_to_bool
from transformers.utils import is_torch_bf16_gpu_available
from trl import SFTConfig, SFTTrainer

from hf_lookbehind import LookbehindConfig, LookbehindMixin
from hf_lookbehind_recipes.processes import end_process_group

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class LookbehindSFTTrainer(LookbehindMixin, SFTTrainer):
    """TRL's ``SFTTrainer`` with Lookbehind-SAM and its baselines."""


@dataclass
class ModelArguments:
    """The model to fine-tune and its LoRA adapters."""

    model_name_or_path: str = field(
        metadata={"help": "A causal language model: hub id (e.g. Qwen/Qwen2.5-0.5B) or folder."}
    )
    dtype: str = field(
        default="float32",
        metadata={
            "help": "dtype of the model's weights (the adapters stay float32).",
            "choices": list(DTYPES),
        },
    )
    use_peft: bool = field(
        default=True,
        metadata={"help": "Train LoRA adapters (the model's weights stay frozen); False: all."},
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scaling numerator."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: list[str] = field(
        default_factory=lambda: ["all-linear"],
        metadata={"help": "Modules that get adapters: names, or all-linear (PEFT's shorthand)."},
    )

    def lora_config(self) -> LoraConfig | None:
        if not self.use_peft:
            return None
        targets = self.lora_target_modules
        return LoraConfig(
            r=self.lora_r,
            lora_alpha=self.lora_alpha,
            lora_dropout=self.lora_dropout,
            target_modules=targets[0] if targets == ["all-linear"] else targets,
            task_type="CAUSAL_LM",
        )


@dataclass
class DataArguments:
    """The instruction data: a hub dataset or local JSON lines files, in any format SFTTrainer
    reads (``messages``, ``prompt``/``completion``, or ``text``)."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset, e.g. trl-lib/Capybara."}
    )
    dataset_config_name: str | None = field(
        default=None, metadata={"help": "Configuration of --dataset_name."}
    )
    train_file: str | None = field(
        default=None, metadata={"help": "Local JSON lines file of training examples."}
    )
    validation_file: str | None = field(
        default=None, metadata={"help": "Local JSON lines file of evaluation examples."}
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str | None = field(
        default="test", metadata={"help": "Evaluation split (none: no evaluation)."}
    )
    max_train_samples: int | None = field(
        default=None, metadata={"help": "Train on the first N examples."}
    )
    max_eval_samples: int | None = field(
        default=None, metadata={"help": "Evaluate on the first N examples."}
    )

    def __post_init__(self) -> None:
        if (self.dataset_name is None) == (self.train_file is None):
            raise ValueError("give exactly one of --dataset_name and --train_file")
        if self.validation_file is not None and self.train_file is None:
            raise ValueError("--validation_file goes with --train_file")


def asks_for_cpu(argv: Sequence[str] | None) -> bool:
    """Whether the command line has ``--use_cpu`` (``--use_cpu true``)."""
    reader = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    reader.add_argument("--use_cpu", nargs="?", const=True, default=False, type=string_to_bool)
    return reader.parse_known_args(sys.argv[1:] if argv is None else list(argv))[0].use_cpu


def argument_parser(argv: Sequence[str] | None = None) -> HfArgumentParser:
    """The recipe's flags for the command line ``argv``. TRL's default, bfloat16, needs an
    accelerator or ``--use_cpu``: without either the default is float32 instead of an error."""
    parser = HfArgumentParser((ModelArguments, DataArguments, SFTConfig, LookbehindConfig))
    if not is_torch_bf16_gpu_available() and not asks_for_cpu(argv):
        parser.set_defaults(bf16=False)
    return parser


def parse_arguments(
    argv: Sequence[str] | None = None,
) -> tuple[ModelArguments, DataArguments, SFTConfig, LookbehindConfig]:
    return argument_parser(argv).parse_args_into_dataclasses(args=argv)


def load_splits(args: DataArguments) -> DatasetDict:
    """``train`` and, where there is one, ``eval``, each cut to its ``max_*_samples``."""
    if args.train_file is not None:
        files = {"train": args.train_file}
        if args.validation_file is not None:
            files["eval"] = args.validation_file
        raw = load_dataset("json", data_files=files)
    else:
        loaded = load_dataset(args.dataset_name, args.dataset_config_name)
        raw = DatasetDict({"train": loaded[args.dataset_train_split]})
        if args.dataset_test_split is not None:
            raw["eval"] = loaded[args.dataset_test_split]
    for split, limit in (("train", args.max_train_samples), ("eval", args.max_eval_samples)):
        if split in raw and limit is not None:
            raw[split] = raw[split].select(range(min(limit, len(raw[split]))))
    return raw


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Fine-tune and evaluate; returns every metric written to ``all_results.json``."""
    model_args, data_args, training_args, lookbehind_args = parse_arguments(argv)
    exit_if_hub_unreachable("sft", sys.argv[1:] if argv is None else argv)
    logging.basicConfig(
        format="%(asctime)s - %(levelname)s - %(name)s - %(message)s",
        handlers=[logging.StreamHandler(sys.stdout)],
        level=training_args.get_process_log_level(),
    )
    datasets.utils.logging.set_verbosity(training_args.get_process_log_level())
    transformers.utils.logging.set_verbosity(training_args.get_process_log_level())
    set_seed(training_args.seed)

    splits = load_splits(data_args)
    tokenizer = AutoTokenizer.from_pretrained(model_args.model_name_or_path)
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path, dtype=DTYPES[model_args.dtype]
    )
    trainer = LookbehindSFTTrainer(
        model=model,
        args=training_args,
        lookbehind=lookbehind_args,
        train_dataset=splits["train"],
        eval_dataset=splits.get("eval"),
        processing_class=tokenizer,
        peft_config=model_args.lora_config(),
    )

    results: dict[str, float] = {}
    train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model()
    metrics = {**train_result.metrics, "train_samples": len(splits["train"])}
    trainer.log_metrics("train", metrics)
    trainer.save_metrics("train", metrics)
    trainer.save_state()
    results.update(metrics)
    if "eval" in splits:
        metrics = trainer.evaluate()
        metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 50.0))
        metrics["eval_samples"] = len(splits["eval"])
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
        results.update(metrics)
    return results


if __name__ == "__main__":
    main()
    end_process_group()
