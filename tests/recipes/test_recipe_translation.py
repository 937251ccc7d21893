"""The IWSLT'14 de-en translation recipe: model size, subwords, token batching, BLEU and a short
end-to-end run of ``run_translation.main`` on real IWSLT'14 sentences."""

from __future__ import annotations

import itertools
import json
import math
import random
from pathlib import Path

import prepare_parallel_text
import pytest
import sacrebleu
from helpers import ROOT
from helpers.translation import smoke_argv
from helpers.two_processes import run_two_processes
from run_translation import main
from transformers import MarianMTModel
from translation_batching import TokenBudgetBatchSampler
from translation_bleu import bleu_scores
from translation_data import (
    load_hub_translation,
    moses_tokenize_lowercase,
    read_parallel_dir,
)
from translation_model import (
    count_trainable_parameters,
    transformer_iwslt_de_en_config,
)
from translation_vocab import UNK_ID, JointBpeVocabularies

# fairseq's transformer_iwslt_de_en with its IWSLT'14 dictionaries, counted by hand:
# encoder layer 4 * (512 * 512 + 512) + (512 * 1024 + 1024 + 1024 * 512 + 512) + 2 * 1024,
# decoder layer that plus cross-attention and a third LayerNorm, embeddings 8848 and 6632 rows.
ENCODER_LAYER = 4 * (512 * 512 + 512) + (512 * 1024 + 1024 + 1024 * 512 + 512) + 2 * 1024
DECODER_LAYER = ENCODER_LAYER + 4 * (512 * 512 + 512) + 1024
FAIRSEQ_IWSLT_PARAMETERS = 6 * ENCODER_LAYER + 6 * DECODER_LAYER + (8848 + 6632) * 512


def iwslt_lines(shared_data: Path, split: str, lang: str, count: int) -> list[str]:
    path = shared_data / "iwslt14_de_en" / "tok" / f"{split}.{lang}"
    return path.read_text(encoding="utf-8").splitlines()[:count]


def test_transformer_iwslt_de_en_has_fairseqs_parameter_count():
    model = MarianMTModel(transformer_iwslt_de_en_config(8848, 6632))
    count = count_trainable_parameters(model)
    assert count == FAIRSEQ_IWSLT_PARAMETERS
    assert round(count / 1e6, 2) == 39.47
    decoder_embeddings = model.get_decoder().embed_tokens.weight
    assert model.lm_head.weight.data_ptr() == decoder_embeddings.data_ptr()
    assert model.get_encoder().embed_tokens.weight.shape == (8848, 512)


def test_joint_bpe_gives_separate_vocabularies_that_round_trip(shared_data, tmp_path):
    german = iwslt_lines(shared_data, "valid", "de", 1500)
    english = iwslt_lines(shared_data, "valid", "en", 1500)
    vocabularies = JointBpeVocabularies.train(german, english, vocab_size=1200)
    joint = vocabularies.bpe.get_vocab_size()
    assert len(vocabularies.source_tokens) < joint and len(vocabularies.target_tokens) < joint

    # A subword that only the English side uses is unknown to the German vocabulary.
    english_only = next(
        token
        for token in vocabularies.target_tokens[4:]
        if token not in vocabularies.source_tokens and token.endswith("</w>")
    )
    word = english_only.removesuffix("</w>")
    if vocabularies.bpe.encode(word).tokens == [english_only]:
        assert vocabularies.encode_source([word])[0][0] == UNK_ID

    held_out = iwslt_lines(shared_data, "test", "en", 300)
    encoded = vocabularies.encode_target(held_out)
    known = [(line, ids) for line, ids in zip(held_out, encoded) if UNK_ID not in ids]
    assert len(known) > 200
    assert all(vocabularies.decode_target(ids) == line for line, ids in known)

    vocabularies.save(tmp_path)
    reloaded = JointBpeVocabularies.load(tmp_path)
    assert reloaded.encode_source(german[:50]) == vocabularies.encode_source(german[:50])
    assert reloaded.encode_target(held_out) == encoded
    with pytest.raises(FileNotFoundError, match="not a saved subword vocabulary"):
        JointBpeVocabularies.load(tmp_path / "missing")


def test_token_budget_batches_cover_every_example_within_the_budget():
    rng = random.Random(0)
    lengths = [rng.randint(1, 60) for _ in range(700)]
    sampler = TokenBudgetBatchSampler(lengths, max_tokens=256, seed=3)
    epoch0 = list(sampler)
    assert sorted(i for batch in epoch0 for i in batch) == list(range(len(lengths)))
    assert all(len(batch) * max(lengths[i] for i in batch) <= 256 for batch in epoch0)
    # Greedy grouping by length: in length order, each batch's examples are no longer than the
    # next batch's, and adding the next batch's shortest example would break the budget.
    for batch, following in itertools.pairwise(sampler.batches):
        shortest_next = min(lengths[i] for i in following)
        assert max(lengths[i] for i in batch) <= shortest_next
        assert (len(batch) + 1) * shortest_next > 256
    padded = sum(len(batch) * max(lengths[i] for i in batch) for batch in epoch0)
    assert padded < 1.1 * sum(lengths)  # grouping by length leaves little padding

    assert list(sampler) == epoch0  # same epoch, same order
    sampler.set_epoch(1)
    epoch1 = list(sampler)
    assert epoch1 != epoch0 and sorted(epoch1) == sorted(epoch0)  # same batches, new order
    assert len(sampler) == len(epoch0)

    with pytest.raises(ValueError, match="longer than max_tokens=50"):
        TokenBudgetBatchSampler(lengths, max_tokens=50)
    with pytest.raises(ValueError, match="positive integer"):
        TokenBudgetBatchSampler(lengths, max_tokens=0)


def test_bleu_scores_tokenized_and_detokenized():
    references = ["it &apos;s that pyramid .", "in mother &apos;s milk ."]
    hypotheses = ["it &apos;s a pyramid .", "in mother &apos;s milk ."]
    perfect, signature = bleu_scores(references, references, "en")
    assert perfect == pytest.approx({"bleu": 100.0, "sacrebleu": 100.0})
    assert signature.startswith("nrefs:1|case:mixed|eff:no|tok:13a")

    scores, _ = bleu_scores(hypotheses, references, "en")
    expected_tokenized = sacrebleu.corpus_bleu(hypotheses, [references], tokenize="none").score
    expected_detokenized = sacrebleu.corpus_bleu(
        ["it's a pyramid.", "in mother's milk."], [["it's that pyramid.", "in mother's milk."]]
    ).score
    assert scores["bleu"] == pytest.approx(expected_tokenized)
    assert scores["sacrebleu"] == pytest.approx(expected_detokenized)
    assert 0 < scores["sacrebleu"] < 100
    with pytest.raises(ValueError, match="1 hypotheses for 2 references"):
        bleu_scores(hypotheses[:1], references, "en")


def test_hub_layout_and_moses_preparation_on_local_multi30k(shared_data, tmp_path):
    """The hub loader on a local dataset folder of raw Multi30k pairs, then fairseq's
    Moses tokenization and lowercasing."""
    multi30k = shared_data / "multi30k_de_en"
    german = (multi30k / "val.de").read_text(encoding="utf-8").splitlines()[:3]
    english = (multi30k / "val.en").read_text(encoding="utf-8").splitlines()[:3]
    rows = [{"translation": {"de": d, "en": e}} for d, e in zip(german, english)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))

    raw = load_hub_translation(str(tmp_path), None, "de", "en")
    prepared = moses_tokenize_lowercase(raw, "de", "en")["train"]["translation"]
    assert german[1] == "Ein Mann schläft in einem grünen Raum auf einem Sofa."
    assert prepared[1]["de"] == "ein mann schläft in einem grünen raum auf einem sofa ."
    assert english[2] == "A boy wearing headphones sits on a woman's shoulders."
    assert prepared[2]["en"] == "a boy wearing headphones sits on a woman &apos;s shoulders ."
    with pytest.raises(ValueError, match="no language fr"):
        load_hub_translation(str(tmp_path), None, "de", "fr")


def test_prepared_parallel_text_is_the_moses_tokenized_lowercased_text(shared_data, tmp_path):
    """``prepare_parallel_text.py`` writes every split of a folder of raw Multi30k pairs, Moses-
    tokenized and lowercased, in the same layout, one line per pair."""
    raw = tmp_path / "raw"
    raw.mkdir()
    for split in ("train", "val"):
        for lang in ("de", "en"):
            lines = (shared_data / "multi30k_de_en" / f"val.{lang}").read_text(encoding="utf-8")
            (raw / f"{split}.{lang}").write_text("\n".join(lines.splitlines()[:4]) + "\n")
    prepare_parallel_text.main([str(raw), str(tmp_path / "prepared")])
    prepared = read_parallel_dir(tmp_path / "prepared", "de", "en")
    assert sorted(prepared) == ["train", "val"]
    pairs = prepared["val"]["translation"]
    assert len(pairs) == 4
    assert pairs[1]["de"] == "ein mann schläft in einem grünen raum auf einem sofa ."
    assert pairs[2]["en"] == "a boy wearing headphones sits on a woman &apos;s shoulders ."


def test_parallel_dir_errors_name_the_problem(tmp_path):
    with pytest.raises(FileNotFoundError, match="no parallel files"):
        read_parallel_dir(tmp_path, "de", "en")
    (tmp_path / "train.de").write_text("a\nb\n")
    (tmp_path / "train.en").write_text("a\n")
    with pytest.raises(ValueError, match="has 2 lines but"):
        read_parallel_dir(tmp_path, "de", "en")


METHOD_FLAGS = {
    "lookbehind_sam_switching_adaptive": (
        "--lookbehind_method=lookbehind",
        "--minibatch_switching",
        "--lookbehind_k=2",
        "--lookbehind_adaptive_alpha",
        "--rho=0.05",
    ),
    "asam": ("--lookbehind_method=sam", "--perturbation=asam", "--rho=0.5"),
}


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHOD_FLAGS))
def test_smoke_run_trains_and_reports_bleu(shared_data, tmp_path, method):
    results = main(smoke_argv(shared_data, tmp_path, *METHOD_FLAGS[method]))

    written = json.loads((tmp_path / "all_results.json").read_text())
    assert written == pytest.approx(results)
    for key in ("eval_bleu", "eval_sacrebleu", "test_bleu", "test_sacrebleu"):
        assert isinstance(written[key], float) and 0.0 <= written[key] <= 100.0
    assert written["eval_sacrebleu_signature"].startswith("nrefs:1|")
    assert math.isfinite(written["eval_loss"])
    assert written["eval_samples"] == 12 and written["test_samples"] == 6
    assert written["train_seconds_per_epoch"] > 0
    generations = (tmp_path / "eval_generations.txt").read_text().splitlines()
    assert len(generations) == 12

    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]
    losses = [entry["loss"] for entry in history if "loss" in entry]
    assert len(losses) >= 12
    assert sum(losses[-4:]) / 4 < sum(losses[:4]) / 4 - 0.4
    steps = [entry for entry in history if "loss" in entry]
    assert all(entry["ascent_grad_norm"] > 0 for entry in steps)  # every step ascended
    assert steps[-1]["skipped_steps"] == 0
    assert JointBpeVocabularies.load(tmp_path / "subwords").target_tokens[:4] == [
        "<s>",
        "<pad>",
        "</s>",
        "<unk>",
    ]


def test_early_stopping_ends_training_at_the_plateau(shared_data, tmp_path):
    """With lr 0 the validation loss never improves: patience 1 stops training at the second
    evaluation (step 4 of the 40 allowed), and the best checkpoint (step 2) is scored."""
    results = main(
        smoke_argv(
            shared_data,
            tmp_path,
            "--learning_rate=0",
            "--max_steps=40",
            "--generation_num_beams=1",
            "--eval_strategy=steps",
            "--eval_steps=2",
            "--save_strategy=steps",
            "--save_steps=2",
            "--load_best_model_at_end",
            "--early_stopping_patience=1",
        )
    )
    state = json.loads((tmp_path / "trainer_state.json").read_text())
    assert state["global_step"] == 4
    assert state["best_model_checkpoint"].endswith("checkpoint-2")
    evaluations = [entry["eval_loss"] for entry in state["log_history"] if "eval_loss" in entry]
    assert len(evaluations) == 2 and results["eval_loss"] == pytest.approx(evaluations[0])
    assert evaluations[1] == evaluations[0]
    assert math.isfinite(results["test_bleu"])


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--early_stopping_patience=2"], "needs --load_best_model_at_end"),
        (["--early_stopping_patience=-1"], "must be 0 \\(off\\) or positive"),
    ],
)
def test_early_stopping_flags_are_checked_before_training(shared_data, tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        main(smoke_argv(shared_data, tmp_path, *flags))
    assert not (tmp_path / "subwords").exists()  # refused before any work


def test_run_rejects_unknown_split_and_ambiguous_data(shared_data, tmp_path):
    data_dir, output_dir = smoke_argv(shared_data, tmp_path)[0], f"--output_dir={tmp_path}"
    with pytest.raises(ValueError, match="no split 'train' in the data; splits: test, valid"):
        main([data_dir, output_dir, "--do_train"])
    with pytest.raises(ValueError, match="exactly one of --data_dir and --dataset_name"):
        main([data_dir, output_dir, "--dataset_name=x"])


@pytest.mark.slow
def test_two_process_evaluation_scores_each_sentence_once(shared_data, tmp_path):
    """Trained in two gloo processes (``accelerate launch`` with the repository's multi-GPU
    config), with evaluation batches that leave the second process a padded shard: the recipe
    translates each evaluation and test sentence once, exactly as one process evaluating the
    saved model does."""
    two, one = tmp_path / "two", tmp_path / "one"
    batches = "--per_device_eval_batch_size=4"  # 12 sentences: 3 batches for 2 processes
    run_two_processes(
        ROOT / "examples" / "translation" / "run_translation.py",
        smoke_argv(shared_data, two, "--lookbehind_method=lookbehind", batches),
    )
    distributed = json.loads((two / "all_results.json").read_text())

    single = main(
        smoke_argv(
            shared_data,
            one,
            batches,
            "--do_train=False",
            f"--model_name_or_path={two}",
            f"--subword_dir={two / 'subwords'}",
        )
    )
    for split, count in (("eval", 12), ("test", 6)):
        lines = (two / f"{split}_generations.txt").read_text().splitlines()
        assert len(lines) == count == distributed[f"{split}_samples"]
        assert lines == (one / f"{split}_generations.txt").read_text().splitlines()
        for key in ("bleu", "sacrebleu", "gen_len"):
            assert distributed[f"{split}_{key}"] == single[f"{split}_{key}"]
    assert distributed["eval_loss"] == pytest.approx(single["eval_loss"], rel=1e-6)
