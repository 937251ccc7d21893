"""Joint BPE subwords with one vocabulary per language, as fairseq prepares IWSLT'14 de-en.

fairseq learns one BPE segmentation on the concatenated German and English training text and
then builds a separate dictionary for each side from the subwords that side uses (8,848 German
and 6,632 English entries with 10k merges). Here the segmentation is learned with the
``tokenizers`` library (word-final subwords carry ``</w>``) and each side's vocabulary maps the
subwords of that side to the ids of its embedding table.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import chain
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

# fairseq's dictionary order: the special symbols take ids 0-3 in both vocabularies.
SPECIALS = ("<s>", "<pad>", "</s>", "<unk>")
BOS_ID, PAD_ID, EOS_ID, UNK_ID = range(len(SPECIALS))
WORD_END = "</w>"
BPE_FILE = "bpe.json"
VOCABULARIES_FILE = "vocabularies.json"


def _side_vocabulary(bpe: Tokenizer, lines: Sequence[str]) -> list[str]:
    """The special symbols, then every subword of ``lines``, most frequent first."""
    counts = Counter(token for encoding in bpe.encode_batch(lines) for token in encoding.tokens)
    for special in SPECIALS:
        counts.pop(special, None)
    return [*SPECIALS, *sorted(counts, key=lambda token: (-counts[token], token))]


class JointBpeVocabularies:
    """A BPE segmentation shared by both languages and a vocabulary for each side.

    Args:
        bpe: the joint segmentation: whitespace pre-tokenization (the text is already
            Moses-tokenized) and a BPE model whose word-final subwords end in ``</w>``.
        source_tokens, target_tokens: each side's subwords, index = id; ids 0-3 are
            ``<s> <pad> </s> <unk>``. A subword missing from a side's vocabulary maps to
            ``<unk>``.
    """

    def __init__(
        self, bpe: Tokenizer, source_tokens: Sequence[str], target_tokens: Sequence[str]
    ) -> None:
        for side, tokens in (("source", source_tokens), ("target", target_tokens)):
            if tuple(tokens[: len(SPECIALS)]) != SPECIALS:
                raise ValueError(f"the {side} vocabulary must start with {SPECIALS}")
        self.bpe = bpe
        self.source_tokens = list(source_tokens)
        self.target_tokens = list(target_tokens)
        self._source_ids = {token: index for index, token in enumerate(self.source_tokens)}
        self._target_ids = {token: index for index, token in enumerate(self.target_tokens)}

    @classmethod
    def train(
        cls, source_lines: Sequence[str], target_lines: Sequence[str], vocab_size: int
    ) -> JointBpeVocabularies:
        """Learn a joint BPE of ``vocab_size`` subwords (characters and specials included) on
        both sides' training text, then each side's vocabulary."""
        if not source_lines or len(source_lines) != len(target_lines):
            raise ValueError(
                "training a BPE needs the same positive number of source and target lines, got "
                f"{len(source_lines)} and {len(target_lines)}"
            )
        bpe = Tokenizer(models.BPE(unk_token=SPECIALS[UNK_ID], end_of_word_suffix=WORD_END))
        bpe.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        bpe.decoder = decoders.BPEDecoder(suffix=WORD_END)
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIALS),
            end_of_word_suffix=WORD_END,
            show_progress=False,
        )
        bpe.train_from_iterator(chain(source_lines, target_lines), trainer=trainer)
        return cls(bpe, _side_vocabulary(bpe, source_lines), _side_vocabulary(bpe, target_lines))

    def save(self, directory: str | Path) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.bpe.save(str(directory / BPE_FILE))
        vocabularies = {"source": self.source_tokens, "target": self.target_tokens}
        (directory / VOCABULARIES_FILE).write_text(json.dumps(vocabularies, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str | Path) -> JointBpeVocabularies:
        directory = Path(directory)
        files = (BPE_FILE, VOCABULARIES_FILE)
        missing = [name for name in files if not (directory / name).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{directory} is not a saved subword vocabulary: missing {', '.join(missing)}"
            )
        vocabularies = json.loads((directory / VOCABULARIES_FILE).read_text())
        bpe = Tokenizer.from_file(str(directory / BPE_FILE))
        return cls(bpe, vocabularies["source"], vocabularies["target"])

    def _encode(self, lines: Iterable[str], ids: dict[str, int]) -> list[list[int]]:
        return [
            [ids.get(token, UNK_ID) for token in encoding.tokens] + [EOS_ID]
            for encoding in self.bpe.encode_batch(list(lines))
        ]

    def encode_source(self, lines: Iterable[str]) -> list[list[int]]:
        """Source ids of each line, ending in ``</s>``."""
        return self._encode(lines, self._source_ids)

    def encode_target(self, lines: Iterable[str]) -> list[list[int]]:
        """Target ids of each line, ending in ``</s>``."""
        return self._encode(lines, self._target_ids)

    def decode_target(self, ids: Iterable[int]) -> str:
        """The tokenized text of target ids: BPE removed, ``<s> <pad> </s>`` dropped."""
        dropped = (BOS_ID, PAD_ID, EOS_ID)
        tokens = [self.target_tokens[index] for index in ids if index not in dropped]
        return self.bpe.decoder.decode(tokens)
