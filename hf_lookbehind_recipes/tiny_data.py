"""Tiny data sets, made on the spot, for the recipes' offline runs (each README's "Tiny offline
run"): a few dozen examples in each recipe's format, laid out as the real data in
``../shared/data`` is, so that a tiny command becomes the real-data command by replacing the data
folder ``outputs/tiny_data`` with ``../shared/data``.

    python -m hf_lookbehind_recipes.tiny_data RECIPE OUTPUT_DIR

========================  =====================================================================
recipe                    what it writes under ``OUTPUT_DIR``
========================  =====================================================================
cifar, lifelong           ``cifar10/train.parquet`` (60 images, 6 per class) and
                          ``cifar10/test.parquet`` (20): 32x32 RGB, CIFAR-10's schema (``img``
                          an Image, ``label`` a ClassLabel of its ten class names)
image_classification      ``imagenet_sample/val/<wnid>/<wnid>_<i>.JPEG``: 8 classes of 4 images,
                          48x48, the image-folder layout
translation               ``iwslt14_de_en/tok/{valid,test}.{de,en}``: 64 and 16 aligned
                          sentence pairs, tokenized and lowercased as fairseq prepares IWSLT'14
sft                       ``sft/model``: a 2-layer Llama of width 16 with a character-level
                          tokenizer and a chat template; ``sft/train.jsonl`` (32 chats) and
                          ``sft/eval.jsonl`` (8), in the ``messages`` format
========================  =====================================================================

Every image class has its own colour and stripe pattern (with noise), every chat and sentence
pair follows a rule: the data can be learned, but a tiny run shows that a recipe works, not how
well a method does. The output is the same for the same arguments (fixed seeds).
"""

from __future__ import annotations

import argparse
import json
import string
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

CIFAR10_CLASSES = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def class_images(classes: int, per_class: int, size: int, seed: int) -> tuple[np.ndarray, list]:
    """``classes * per_class`` uint8 RGB images ``(N, size, size, 3)``, class by class: a base
    colour and stripes of a period and direction of the class's own, plus noise."""
    rng = np.random.default_rng(seed)
    rows, columns = np.mgrid[0:size, 0:size]
    images, labels = [], []
    for label in range(classes):
        colour = rng.integers(40, 216, 3)
        period = 3 + label % 5
        stripes = (rows if label % 2 else columns) // period % 2
        for _ in range(per_class):
            noise = rng.normal(0.0, 20.0, (size, size, 3))
            image = colour + 40.0 * (2 * stripes[..., None] - 1) + noise
            images.append(np.clip(image, 0, 255).astype(np.uint8))
            labels.append(label)
    return np.stack(images), labels


def write_cifar(output_dir: Path) -> list[Path]:
    """CIFAR-10's parquet files (the hub dataset ``uoft-cs/cifar10``'s schema)."""
    from datasets import ClassLabel, Dataset, Features, Image
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()
    features = Features({"img": Image(), "label": ClassLabel(names=list(CIFAR10_CLASSES))})
    folder = output_dir / "cifar10"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for split, per_class, seed in (("train", 6, 0), ("test", 2, 1)):
        images, labels = class_images(len(CIFAR10_CLASSES), per_class, 32, seed)
        path = folder / f"{split}.parquet"
        Dataset.from_dict({"img": list(images), "label": labels}, features=features).to_parquet(
            path
        )
        written.append(path)
    return written


def write_image_folder(output_dir: Path) -> list[Path]:
    """An image folder ``imagenet_sample/val/<wnid>/<file>.JPEG`` of 8 classes."""
    from PIL import Image

    folder = output_dir / "imagenet_sample" / "val"
    images, labels = class_images(8, 4, 48, seed=2)
    for index, (image, label) in enumerate(zip(images, labels)):
        wnid = f"n{label + 1:08d}"
        (folder / wnid).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image).save(folder / wnid / f"{wnid}_{index}.JPEG", quality=95)
    return [folder]


GERMAN = {
    "colours": ["rote", "blaue", "grüne", "kleine", "große", "alte", "neue", "schöne"],
    "nouns": ["haus", "auto", "buch", "kind", "boot", "bild", "lied", "tier"],
    "verbs": ["ist", "war", "bleibt", "scheint"],
    "places": ["hier", "dort", "draußen", "zu hause"],
}
ENGLISH = {
    "colours": ["red", "blue", "green", "small", "big", "old", "new", "beautiful"],
    "nouns": ["house", "car", "book", "child", "boat", "picture", "song", "animal"],
    "verbs": ["is", "was", "stays", "seems"],
    "places": ["here", "there", "outside", "at home"],
}


def sentence_pairs(count: int, seed: int) -> list[tuple[str, str]]:
    """``das <adj> <noun> <verb> <place> .`` and its English, word for word."""
    rng = np.random.default_rng(seed)
    pairs = []
    for _ in range(count):
        choice = {part: int(rng.integers(len(words))) for part, words in GERMAN.items()}
        de = [GERMAN[part][choice[part]] for part in ("colours", "nouns", "verbs", "places")]
        en = [ENGLISH[part][choice[part]] for part in ("colours", "nouns", "verbs", "places")]
        pairs.append((f"das {' '.join(de)} .", f"the {' '.join(en)} ."))
    return pairs


def write_parallel_text(output_dir: Path) -> list[Path]:
    """fairseq's layout ``{valid,test}.{de,en}`` (the shared IWSLT'14 copy has no train split:
    the recipe's tiny and smoke runs train on ``valid``)."""
    folder = output_dir / "iwslt14_de_en" / "tok"
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for split, count, seed in (("valid", 64, 3), ("test", 16, 4)):
        pairs = sentence_pairs(count, seed)
        for language, side in (("de", 0), ("en", 1)):
            path = folder / f"{split}.{language}"
            path.write_text("".join(pair[side] + "\n" for pair in pairs), encoding="utf-8")
            written.append(path)
    return written


CHAT_TEMPLATE = (
    "{% for message in messages %}<{{ message['role'] }}>{{ message['content'] }}</s>"
    "{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
)


SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")


def char_tokenizer():
    """One token per printable character, with pad/bos/eos/unk and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

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


def tiny_llama_config(tokenizer, **overrides):
    """A 2-layer Llama of width 16 for ``tokenizer``; ``overrides`` change any field."""
    from transformers import LlamaConfig

    settings = dict(
        vocab_size=len(tokenizer), hidden_size=16, intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )  # fmt: skip
    settings.update(overrides)
    return LlamaConfig(**settings)


def write_causal_lm(folder: Path) -> Path:
    """A tiny Llama (random weights) and its character-level tokenizer with a chat template,
    saved as a hub model is."""
    import torch
    from transformers import LlamaForCausalLM
    from transformers.utils.logging import disable_progress_bar

    disable_progress_bar()
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    LlamaForCausalLM(tiny_llama_config(tokenizer)).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def chats(count: int, offset: int) -> list[dict]:
    return [
        {
            "messages": [
                {"role": "user", "content": f"What is {i} plus {i + 1}?"},
                {"role": "assistant", "content": f"It is {2 * i + 1}."},
            ]
        }
        for i in range(offset, offset + count)
    ]


def write_sft(output_dir: Path) -> list[Path]:
    folder = output_dir / "sft"
    folder.mkdir(parents=True, exist_ok=True)
    written = [write_causal_lm(folder / "model")]
    for split, examples in (("train", chats(32, 0)), ("eval", chats(8, 100))):
        path = folder / f"{split}.jsonl"
        path.write_text("".join(json.dumps(example) + "\n" for example in examples))
        written.append(path)
    return written


WRITERS: dict[str, Callable[[Path], list[Path]]] = {
    "cifar": write_cifar,
    "lifelong": write_cifar,
    "image_classification": write_image_folder,
    "translation": write_parallel_text,
    "sft": write_sft,
}


def main(argv: Sequence[str] | None = None) -> list[Path]:
    parser = argparse.ArgumentParser(
        prog="python -m hf_lookbehind_recipes.tiny_data",
        description="Write a recipe's tiny offline data set (a few dozen examples).",
    )
    parser.add_argument("recipe", choices=list(WRITERS), help="The recipe the data is for.")
    parser.add_argument(
        "output_dir", type=Path, help="Where to write it (its real-data twin: ../shared/data)."
    )
    args = parser.parse_args(argv)
    written = WRITERS[args.recipe](args.output_dir)
    print(f"{args.recipe}: wrote {', '.join(str(path) for path in written)}")
    return written


if __name__ == "__main__":
    main()
