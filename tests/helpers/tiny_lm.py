"""A character-level tokenizer with a chat template, tiny Llama models built from configs and a
few instruction, preference and conversation examples: what the TRL and SFT recipe tests train
on without downloads."""

from __future__ import annotations

import string
from pathlib import Path

import torch
from datasets import Dataset
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import (
    LlamaConfig,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    PreTrainedTokenizerFast,
)

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per printable character, with pad/bos/eos/unk and a chat template."""
    vocab = {token: i for i, token in enumerate((*SPECIAL_TOKENS, *string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
        unk_token="<unk>",
    )  # fmt: skip
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def tiny_config(tokenizer: PreTrainedTokenizerFast, **overrides) -> LlamaConfig:
    settings = dict(
        vocab_size=len(tokenizer),
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    settings.update(overrides)
    return LlamaConfig(**settings)


def causal_lm(tokenizer: PreTrainedTokenizerFast, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_config(tokenizer))


def reward_model(tokenizer: PreTrainedTokenizerFast, seed: int = 0):
    torch.manual_seed(seed)
    return LlamaForSequenceClassification(tiny_config(tokenizer, num_labels=1))


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
