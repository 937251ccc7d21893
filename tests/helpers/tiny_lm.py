"""A character-level tokenizer with a chat template, tiny Llama models built from configs and a
few instruction, preference and conversation examples: what the TRL and SFT recipe tests train
on without downloads."""

from __future__ import annotations

from pathlib import Path

import torch
from datasets import Dataset
from transformers import (
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

from hf_lookbehind_recipes.tiny_data import char_tokenizer, tiny_llama_config


def causal_lm(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(tokenizer))


def reward_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0):
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(tiny_llama_config(tokenizer, num_labels=1))


def save_causal_lm(folder: Path) -> Path:
    """A tiny causal LM and its tokenizer saved as a hub model would be."""
    tokenizer = char_tokenizer()
    causal_lm(tokenizer).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def question(i: int) -> str:
    return f"What is {i} plus {i + 1}?"


def instructions(n: int = 16) -> Dataset:
    """Prompt-completion pairs."""
    return Dataset.from_list(
        [{"prompt": question(i), "completion": f" {2 * i + 1}."} for i in range(n)]
    )


def conversations(n: int = 16, offset: int = 0) -> list[dict]:
    """Chats in the ``messages`` format."""
    return [
        {
            "messages": [
                {"role": "user", "content": question(i)},
                {"role": "assistant", "content": f"It is {2 * i + 1}."},
            ]
        }
        for i in range(offset, offset + n)
    ]


def preferences(n: int = 16) -> Dataset:
    """Prompts with a chosen (right) and a rejected (wrong) completion."""
    return Dataset.from_list(
        [
            {"prompt": question(i), "chosen": f" {2 * i + 1}.", "rejected": f" {2 * i}."}
            for i in range(n)
        ]
    )
