"""BLEU of the recipe, both ways it is reported for IWSLT'14 de-en.

- ``bleu``: tokenized BLEU as ``fairseq-generate --remove-bpe`` reports it, on the Moses-tokenized,
  lowercased text (sacreBLEU with ``tokenize="none"``); the number papers quote for IWSLT'14.
- ``sacrebleu``: detokenized sacreBLEU (``13a`` tokenization) after Moses detokenization of
  hypotheses and references; comparable across preprocessing, reported with its signature.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sacrebleu.metrics import BLEU
from sacremoses import MosesDetokenizer
from transformers import EvalPrediction
from translation_vocab import JointBpeVocabularies


def bleu_scores(
    hypotheses: Sequence[str], references: Sequence[str], target_lang: str
) -> tuple[dict[str, float], str]:
    """Tokenized BLEU and detokenized sacreBLEU of Moses-tokenized ``hypotheses`` against
    ``references`` (one each), and the sacreBLEU signature."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses for {len(references)} references")
    tokenized = BLEU(tokenize="none").corpus_score(list(hypotheses), [list(references)])
    detokenizer = MosesDetokenizer(lang=target_lang)
    sacrebleu = BLEU()
    detokenized = sacrebleu.corpus_score(
        [detokenizer.detokenize(line.split()) for line in hypotheses],
        [[detokenizer.detokenize(line.split()) for line in references]],
    )
    return {"bleu": tokenized.score, "sacrebleu": detokenized.score}, str(sacrebleu.get_signature())


class TranslationMetrics:
    """``compute_metrics`` for ``Seq2SeqTrainer`` with ``predict_with_generate`` on a dataset
    whose target texts are ``references``, in order: ``bleu``, ``sacrebleu`` and ``gen_len`` (mean
    hypothesis length in Moses tokens). After a call, ``hypotheses`` holds the decoded
    translations and ``signature`` the sacreBLEU signature."""

    def __init__(
        self, vocabularies: JointBpeVocabularies, references: Sequence[str], target_lang: str
    ) -> None:
        self.vocabularies = vocabularies
        self.references = list(references)
        self.target_lang = target_lang
        self.hypotheses: list[str] = []
        self.signature: str | None = None

    def __call__(self, prediction: EvalPrediction) -> dict[str, float]:
        generated = np.asarray(prediction.predictions)
        # The Trainer pads the batches' outputs to one width with -100.
        self.hypotheses = [
            self.vocabularies.decode_target(row[row >= 0].tolist()) for row in generated
        ]
        scores, self.signature = bleu_scores(self.hypotheses, self.references, self.target_lang)
        scores["gen_len"] = float(np.mean([len(line.split()) for line in self.hypotheses]))
        return scores
