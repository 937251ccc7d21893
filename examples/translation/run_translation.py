"""IWSLT'14 German-English with a Transformer (fairseq's ``transformer_iwslt_de_en``) and Adam,
trained with Lookbehind-SAM/ASAM or one of its baselines (``--lookbehind_method``).

    accelerate launch examples/translation/run_translation.py \\
        --data_dir path/to/iwslt14.tokenized.de-en --output_dir runs/iwslt_lookbehind \\
        --do_train --do_eval --do_predict --predict_with_generate ...

See README.md for the full command of each method. Evaluation runs on the slow weights (the
model holds them between Trainer steps); metrics go to ``all_results.json`` (``eval_bleu``,
``eval_sacrebleu``, ``test_bleu``, ...).

Without the hub (``--dataset_name``) it stops at once with the flags for local files and the
tiny offline command of README.md.
"""

from __future__ import annotations

import sys

from hf_lookbehind_recipes.offline import exit_if_hub_unreachable

if __name__ == "__main__":  # without the hub, fail in a second rather than after the imports
    exit_if_hub_unreachable("translation", sys.argv[1:])

import copy
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from datasets import Dataset, DatasetDict
from torch.utils.data import DataLoader
from transformers import (
    EarlyStoppingCallback,
    HfArgumentParser,
    MarianMTModel,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    set_seed,
)
from transformers.trainer_utils import EvalLoopOutput
from translation_batching import TokenBudgetBatchSampler
from translation_bleu import TranslationMetrics
from translation_data import (
    TranslationCollator,
    encode_split,
    load_hub_translation,
    moses_tokenize_lowercase,
    read_parallel_dir,
)
from translation_model import (
    DECODER_START_ID,
    count_trainable_parameters,
    transformer_iwslt_de_en_config,
    translation_generation_config,
)
from translation_vocab import BPE_FILE, JointBpeVocabularies

from hf_lookbehind import LookbehindTrainer, LookbehindTrainingArguments
from hf_lookbehind_recipes.evaluation import check_evaluation_flags
from hf_lookbehind_recipes.logs import configure_logging
from hf_lookbehind_recipes.processes import end_process_group
from hf_lookbehind_recipes.training import record_metrics, train_and_save

logger = logging.getLogger(__name__)


@dataclass
class ModelArguments:
    """The Transformer; the defaults are fairseq's ``transformer_iwslt_de_en``."""

    model_name_or_path: str | None = field(
        default=None,
        metadata={"help": "A model saved by an earlier run, to evaluate or train further."},
    )
    d_model: int = field(default=512, metadata={"help": "Model width."})
    encoder_layers: int = field(default=6, metadata={"help": "Encoder layers."})
    decoder_layers: int = field(default=6, metadata={"help": "Decoder layers."})
    attention_heads: int = field(default=4, metadata={"help": "Attention heads per layer."})
    ffn_dim: int = field(default=1024, metadata={"help": "Feed-forward width."})
    dropout: float = field(default=0.3, metadata={"help": "Dropout after attention and FFN."})
    max_positions: int = field(default=1024, metadata={"help": "Longest sequence."})


@dataclass
class DataArguments:
    """The parallel text, its subword vocabulary and the batching."""

    data_dir: str | None = field(
        default=None,
        metadata={
            "help": "Folder of aligned files SPLIT.SRC / SPLIT.TGT, e.g. fairseq's "
            "prepare-iwslt14.sh output (Moses-tokenized, lowercased): train, valid, test."
        },
    )
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset with a 'translation' column (instead)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Its config."})
    moses_tokenize: bool = field(
        default=False,
        metadata={
            "help": "Moses-tokenize and lowercase the text on load, as prepare-iwslt14.sh does "
            "(for raw text such as hub datasets)."
        },
    )
    source_lang: str = field(default="de", metadata={"help": "Source language code."})
    target_lang: str = field(default="en", metadata={"help": "Target language code."})
    train_split: str = field(default="train", metadata={"help": "Split to train on."})
    validation_split: str = field(default="valid", metadata={"help": "Split for --do_eval."})
    test_split: str = field(default="test", metadata={"help": "Split for --do_predict."})
    subword_dir: str | None = field(
        default=None,
        metadata={
            "help": "Where the subword vocabulary is kept (default OUTPUT_DIR/subwords): one "
            "saved there is reused, else one is learned on the training split and saved there."
        },
    )
    bpe_vocab_size: int = field(
        default=10000, metadata={"help": "Joint BPE vocabulary size (both languages)."}
    )
    max_tokens: int = field(
        default=4096, metadata={"help": "Token budget of a training batch on each device."}
    )
    max_source_length: int = field(default=1024, metadata={"help": "Truncate longer sources."})
    max_target_length: int = field(default=1024, metadata={"help": "Truncate longer targets."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use the first N."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use the first N."})
    max_predict_samples: int | None = field(default=None, metadata={"help": "Use the first N."})

    def __post_init__(self) -> None:
        if (self.data_dir is None) == (self.dataset_name is None):
            raise ValueError("give exactly one of --data_dir and --dataset_name")
        if self.bpe_vocab_size < 1 or self.max_tokens < 1:
            raise ValueError(
                f"bpe_vocab_size and max_tokens must be positive, got {self.bpe_vocab_size} "
                f"and {self.max_tokens}"
            )


@dataclass
class TranslationTrainingArguments(LookbehindTrainingArguments, Seq2SeqTrainingArguments):
    """The Lookbehind flags and ``Seq2SeqTrainingArguments``' generation settings."""

    early_stopping_patience: int = field(
        default=0,
        metadata={
            "help": "Stop once --metric_for_best_model (default: the validation loss) has not "
            "improved for this many evaluations, then score the best checkpoint (training to "
            "the plateau; needs --load_best_model_at_end). 0: train for the whole budget."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.early_stopping_patience < 0:
            raise ValueError(
                f"--early_stopping_patience must be 0 (off) or positive, got "
                f"{self.early_stopping_patience}"
            )
        if self.early_stopping_patience and not self.load_best_model_at_end:
            raise ValueError(
                "--early_stopping_patience needs --load_best_model_at_end (with --eval_strategy "
                "and --save_strategy steps at the same --eval_steps and --save_steps), so that "
                "the plateau's best checkpoint is the model that is scored"
            )


class TranslationTrainer(LookbehindTrainer, Seq2SeqTrainer):
    """``LookbehindTrainer`` with generation for evaluation and fairseq-style training batches
    of ``max_tokens`` tokens (:class:`TokenBudgetBatchSampler`)."""

    def __init__(self, *args: Any, max_tokens: int, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_tokens = max_tokens

    def get_train_dataloader(self) -> DataLoader:
        if self.train_dataset is None:
            raise ValueError("TranslationTrainer: training requires a train_dataset.")
        sampler = TokenBudgetBatchSampler(
            self.train_dataset[self.args.length_column_name], self.max_tokens, seed=self.args.seed
        )
        dataset = self._remove_unused_columns(self.train_dataset, description="Training")
        loader = DataLoader(
            dataset,
            batch_sampler=sampler,
            collate_fn=self.data_collator,
            num_workers=self.args.dataloader_num_workers,
            pin_memory=self.args.dataloader_pin_memory,
        )
        return self.accelerator.prepare(loader)

    def evaluation_loop(self, *args: Any, **kwargs: Any) -> EvalLoopOutput:
        # Seq2SeqTrainer.evaluate/predict gather with accelerate's plain ``gather``, which under
        # DDP keeps the examples that pad the last batches to equal shards, so the metrics would
        # see more translations than references. Drop them, as the base Trainer does.
        self.gather_function = self.accelerator.gather_for_metrics
        return super().evaluation_loop(*args, **kwargs)


def load_parallel_text(data_args: DataArguments) -> DatasetDict:
    if data_args.data_dir is not None:
        raw = read_parallel_dir(data_args.data_dir, data_args.source_lang, data_args.target_lang)
    else:
        raw = load_hub_translation(
            data_args.dataset_name,
            data_args.dataset_config_name,
            data_args.source_lang,
            data_args.target_lang,
        )
    if data_args.moses_tokenize:
        raw = moses_tokenize_lowercase(raw, data_args.source_lang, data_args.target_lang)
    return raw


def select_split(raw: DatasetDict, name: str, max_samples: int | None) -> Dataset:
    if name not in raw:
        raise ValueError(f"no split {name!r} in the data; splits: {', '.join(raw)}")
    split = raw[name]
    return split.select(range(min(max_samples, len(split)))) if max_samples else split


def subword_vocabularies(
    data_args: DataArguments, train_split: Dataset | None, output_dir: str
) -> JointBpeVocabularies:
    """The saved vocabulary of ``--subword_dir``, or one learned on ``train_split`` and saved."""
    directory = Path(data_args.subword_dir or Path(output_dir) / "subwords")
    if (directory / BPE_FILE).is_file():
        logger.info("Using the subword vocabulary saved in %s", directory)
        return JointBpeVocabularies.load(directory)
    if train_split is None:
        raise ValueError(
            f"no subword vocabulary in {directory}: pass --subword_dir of a trained run, or "
            "--do_train to learn one"
        )
    pairs = train_split["translation"]
    vocabularies = JointBpeVocabularies.train(
        [pair[data_args.source_lang] for pair in pairs],
        [pair[data_args.target_lang] for pair in pairs],
        data_args.bpe_vocab_size,
    )
    vocabularies.save(directory)
    return vocabularies


def build_model(
    model_args: ModelArguments,
    vocabularies: JointBpeVocabularies,
    training_args: TranslationTrainingArguments,
) -> MarianMTModel:
    """A new Transformer, or the one of ``--model_name_or_path``, with the generation settings
    of ``--generation_num_beams`` / ``--generation_max_length`` (default beam 5, 200 tokens)."""
    sizes = (len(vocabularies.source_tokens), len(vocabularies.target_tokens))
    if model_args.model_name_or_path is not None:
        model = MarianMTModel.from_pretrained(model_args.model_name_or_path)
        # Loading leaves the sinusoidal position tables trainable; they are fixed by definition.
        for stack in (model.get_encoder(), model.get_decoder()):
            stack.embed_positions.weight.requires_grad_(False)
        if (model.config.vocab_size, model.config.decoder_vocab_size) != sizes:
            raise ValueError(
                f"{model_args.model_name_or_path} has vocabularies of "
                f"{model.config.vocab_size}/{model.config.decoder_vocab_size} tokens, the subword "
                f"vocabulary {sizes[0]}/{sizes[1]}: pass the --subword_dir of its run"
            )
    else:
        config = transformer_iwslt_de_en_config(
            *sizes,
            d_model=model_args.d_model,
            encoder_layers=model_args.encoder_layers,
            decoder_layers=model_args.decoder_layers,
            attention_heads=model_args.attention_heads,
            ffn_dim=model_args.ffn_dim,
            dropout=model_args.dropout,
            max_positions=model_args.max_positions,
        )
        model = MarianMTModel(config)
    num_beams, max_length = training_args.generation_num_beams, training_args.generation_max_length
    model.generation_config = translation_generation_config(
        num_beams=5 if num_beams is None else num_beams,
        max_length=200 if max_length is None else max_length,
    )
    return model


def evaluation_metric_names(training_args: TranslationTrainingArguments) -> tuple[str, ...]:
    """The metrics an evaluation returns: the loss, and the BLEU scores and generation length
    with ``--predict_with_generate``."""
    generated = ("bleu", "sacrebleu", "gen_len") if training_args.predict_with_generate else ()
    return ("loss", *generated)


def check_settings_before_training(
    trainer: Seq2SeqTrainer, data_args: DataArguments, training_args: TranslationTrainingArguments
) -> None:
    """Reject the settings that would fail only after (part of) the training: when a checkpoint
    or the final model is saved, at an evaluation, or on a long sentence. Each message says
    what to change."""
    model = trainer.model
    positions = model.config.max_position_embeddings
    generation = copy.deepcopy(model.generation_config)  # --generation_config may have replaced it
    if training_args.generation_num_beams is not None:
        generation.num_beams = training_args.generation_num_beams
    if training_args.generation_max_length is not None:
        generation.max_length = training_args.generation_max_length
    for flag, length in (
        ("--max_source_length", data_args.max_source_length),
        ("--max_target_length", data_args.max_target_length),
        ("--generation_max_length", generation.max_length),
    ):
        if length > positions:
            raise ValueError(
                f"{flag} {length} is longer than the model's {positions} positions: lower it, or "
                "raise --max_positions (new models)"
            )
    for name, config in (("the model's", model.generation_config), ("evaluation's", generation)):
        try:
            config.validate(strict=True)
        except ValueError as error:
            raise ValueError(
                f"{name} generation settings could not be used or saved after training: {error}\n"
                "Change --generation_num_beams, --generation_max_length or --generation_config."
            ) from None
    generate = training_args.predict_with_generate
    check_evaluation_flags(
        training_args,
        evaluation_metric_names(training_args),
        "the BLEU score of --predict_with_generate" if generate else None,
        "" if generate else " or add --predict_with_generate",
    )


def main(argv: list[str] | None = None) -> dict[str, Any]:
    """Train and evaluate; returns every metric written to ``all_results.json``."""
    parser = HfArgumentParser((ModelArguments, DataArguments, TranslationTrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    exit_if_hub_unreachable("translation", sys.argv[1:] if argv is None else argv)
    configure_logging(training_args)
    set_seed(training_args.seed)

    raw = load_parallel_text(data_args)
    train_split = eval_split = test_split = None
    if training_args.do_train:
        train_split = select_split(raw, data_args.train_split, data_args.max_train_samples)
    if training_args.do_eval:
        eval_split = select_split(raw, data_args.validation_split, data_args.max_eval_samples)
    if training_args.do_predict:
        test_split = select_split(raw, data_args.test_split, data_args.max_predict_samples)
    with training_args.main_process_first(desc="subword vocabulary"):
        vocabularies = subword_vocabularies(data_args, train_split, training_args.output_dir)

    def encode(split: Dataset | None) -> Dataset | None:
        if split is None:
            return None
        return encode_split(
            split,
            vocabularies,
            data_args.source_lang,
            data_args.target_lang,
            data_args.max_source_length,
            data_args.max_target_length,
        )

    with training_args.main_process_first(desc="encoding"):
        train_dataset, eval_dataset, test_dataset = (
            encode(split) for split in (train_split, eval_split, test_split)
        )

    model = build_model(model_args, vocabularies, training_args)
    if training_args.should_log:
        print(
            f"Transformer: {count_trainable_parameters(model) / 1e6:.2f}M trainable parameters "
            f"(source vocabulary {len(vocabularies.source_tokens)}, target vocabulary "
            f"{len(vocabularies.target_tokens)})"
        )

    generate = training_args.predict_with_generate
    eval_metrics = (
        TranslationMetrics(vocabularies, eval_dataset["reference"], data_args.target_lang)
        if generate and eval_dataset is not None
        else None
    )
    trainer = TranslationTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        eval_dataset=eval_dataset,
        data_collator=TranslationCollator(decoder_start_token_id=DECODER_START_ID),
        compute_metrics=eval_metrics,
        max_tokens=data_args.max_tokens,
        callbacks=(
            [EarlyStoppingCallback(training_args.early_stopping_patience)]
            if training_args.early_stopping_patience
            else None
        ),
    )
    check_settings_before_training(trainer, data_args, training_args)

    results: dict[str, Any] = {}
    if training_args.do_train:
        results.update(train_and_save(trainer, train_samples=len(train_dataset)))

    for prefix, dataset, metrics_fn in (
        ("eval", eval_dataset, eval_metrics),
        ("test", test_dataset, None),
    ):
        if dataset is None:
            continue
        if generate:
            metrics_fn = metrics_fn or TranslationMetrics(
                vocabularies, dataset["reference"], data_args.target_lang
            )
            trainer.compute_metrics = metrics_fn
        metrics = trainer.predict(dataset, metric_key_prefix=prefix).metrics
        metrics[f"{prefix}_samples"] = len(dataset)
        if generate:
            metrics[f"{prefix}_sacrebleu_signature"] = metrics_fn.signature
            if trainer.is_world_process_zero():
                generations = Path(training_args.output_dir) / f"{prefix}_generations.txt"
                generations.write_text("".join(f"{line}\n" for line in metrics_fn.hypotheses))
        record_metrics(trainer, prefix, metrics)
        results.update(metrics)
    return results


if __name__ == "__main__":
    main()
    end_process_group()
