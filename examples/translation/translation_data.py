"""Parallel text for the translation recipe: fairseq-prepared files or a hub dataset, encoded
with the joint-BPE vocabularies, and the collator that pads a batch.

Every split is a ``datasets.Dataset`` with a ``translation`` column of ``{lang: text}`` pairs, the
layout of the hub's translation datasets.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from datasets import Dataset, DatasetDict, load_dataset
from sacremoses import MosesTokenizer
from torch.nn.utils.rnn import pad_sequence
from transformers.models.marian.modeling_marian import shift_tokens_right
from translation_vocab import EOS_ID, PAD_ID, JointBpeVocabularies

IGNORE_INDEX = -100  # label id that the loss skips


def read_parallel_dir(data_dir: str | Path, source_lang: str, target_lang: str) -> DatasetDict:
    """Every split ``{name}.{source_lang}`` / ``{name}.{target_lang}`` of ``data_dir``: one
    sentence per line, aligned (fairseq's layout, e.g. ``train``, ``valid``, ``test``)."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir {data_dir} is not a directory")
    splits = {}
    for source_file in sorted(data_dir.glob(f"*.{source_lang}")):
        target_file = source_file.with_suffix(f".{target_lang}")
        if not target_file.is_file():
            continue
        sources = source_file.read_text(encoding="utf-8").splitlines()
        targets = target_file.read_text(encoding="utf-8").splitlines()
        if len(sources) != len(targets):
            raise ValueError(
                f"{source_file} has {len(sources)} lines but {target_file} has {len(targets)}"
            )
        pairs = [{source_lang: s, target_lang: t} for s, t in zip(sources, targets)]
        splits[source_file.stem] = Dataset.from_dict({"translation": pairs})
    if not splits:
        raise FileNotFoundError(
            f"no parallel files NAME.{source_lang} + NAME.{target_lang} in {data_dir}"
        )
    return DatasetDict(splits)


def load_hub_translation(
    name: str, config_name: str | None, source_lang: str, target_lang: str
) -> DatasetDict:
    """A hub dataset with a ``translation`` column holding both languages."""
    dataset = load_dataset(name, config_name)
    for split, data in dataset.items():
        if "translation" not in data.column_names:
            raise ValueError(
                f"{name} split {split!r} has no 'translation' column (columns: "
                f"{', '.join(data.column_names)})"
            )
        missing = {source_lang, target_lang} - set(data[0]["translation"])
        if missing:
            raise ValueError(f"{name} split {split!r} has no language {', '.join(sorted(missing))}")
    return dataset


def moses_tokenize_lowercase(
    dataset: DatasetDict, source_lang: str, target_lang: str
) -> DatasetDict:
    """Raw text to fairseq's IWSLT'14 form: Moses tokenization (with its ``&apos;``-style
    escapes) and lowercasing, as ``prepare-iwslt14.sh`` does."""
    tokenizers = {lang: MosesTokenizer(lang=lang) for lang in (source_lang, target_lang)}

    def prepare_line(text: str, lang: str) -> str:
        return tokenizers[lang].tokenize(text, return_str=True, escape=True).lower()

    def prepare(batch: dict[str, list]) -> dict[str, list]:
        return {
            "translation": [
                {lang: prepare_line(pair[lang], lang) for lang in tokenizers}
                for pair in batch["translation"]
            ]
        }

    return dataset.map(prepare, batched=True, desc="Moses tokenization")


def _truncate(ids: list[int], max_length: int) -> list[int]:
    return ids if len(ids) <= max_length else [*ids[: max_length - 1], EOS_ID]


def encode_split(
    dataset: Dataset,
    vocabularies: JointBpeVocabularies,
    source_lang: str,
    target_lang: str,
    max_source_length: int,
    max_target_length: int,
) -> Dataset:
    """Columns ``input_ids`` and ``labels`` (ids ending in ``</s>``, truncated to the maximum
    lengths), ``length`` (the longer side, for batching) and ``reference`` (the target text)."""

    def encode(batch: dict[str, list]) -> dict[str, list]:
        sources = [pair[source_lang] for pair in batch["translation"]]
        targets = [pair[target_lang] for pair in batch["translation"]]
        input_ids = [_truncate(s, max_source_length) for s in vocabularies.encode_source(sources)]
        labels = [_truncate(t, max_target_length) for t in vocabularies.encode_target(targets)]
        return {
            "input_ids": input_ids,
            "labels": labels,
            "length": [max(len(s), len(t)) for s, t in zip(input_ids, labels)],
            "reference": targets,
        }

    return dataset.map(encode, batched=True, remove_columns=dataset.column_names, desc="BPE")


@dataclass
class TranslationCollator:
    """Pads a batch: ``input_ids`` with ``<pad>`` (the attention mask marks real tokens),
    ``labels`` with -100 (skipped by the loss), and builds ``decoder_input_ids`` (the labels
    shifted right behind ``decoder_start_token_id``), which the model needs when the Trainer's
    label smoothing takes the labels out of its inputs."""

    decoder_start_token_id: int

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        input_ids = pad_sequence(
            [torch.tensor(f["input_ids"]) for f in features], batch_first=True, padding_value=PAD_ID
        )
        labels = pad_sequence(
            [torch.tensor(f["labels"]) for f in features],
            batch_first=True,
            padding_value=IGNORE_INDEX,
        )
        return {
            "input_ids": input_ids,
            "attention_mask": (input_ids != PAD_ID).long(),
            "labels": labels,
            "decoder_input_ids": shift_tokens_right(labels, PAD_ID, self.decoder_start_token_id),
        }
