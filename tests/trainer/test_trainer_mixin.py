"""``LookbehindMixin`` on ``Trainer`` subclasses with the settings given apart
(``lookbehind=LookbehindConfig(...)``): the plain Trainer and ``Seq2SeqTrainer`` against the
engine in a plain loop, a frozen teacher model run once per step, schedule-free base optimizers
refused before training, and settings given twice or not at all."""

from __future__ import annotations

import dataclasses

import pytest
import schedulefree
import torch
from helpers.models import max_param_difference
from helpers.trainer_harness import (
    InOrderTrainer,
    TinyClassifier,
    ToyDataset,
    make_args,
    make_model,
    plain_loop,
    sequential_closures,
)
from torch import nn
from torch.utils.data import Dataset, SequentialSampler
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    HfArgumentParser,
    Seq2SeqTrainer,
    Seq2SeqTrainingArguments,
    Trainer,
    TrainingArguments,
)

from hf_lookbehind import (
    FisherSAM,
    Lookbehind,
    LookbehindConfig,
    LookbehindMixin,
    LookbehindTrainer,
    LookbehindTrainingArguments,
)

STEPS = 4


# The Trainer flags of trainer_harness.make_args, which the plain-loop expectations assume.
HARNESS_FLAGS = (
    "per_device_train_batch_size", "learning_rate", "lr_scheduler_type", "logging_steps",
    "save_strategy", "report_to", "use_cpu", "seed", "max_grad_norm", "dataloader_drop_last",
    "disable_tqdm",
)  # fmt: skip


def plain_args(output_dir, args_class=TrainingArguments, **overrides):
    """``trainer_harness.make_args``'s Trainer settings in ``args_class``, without the
    Lookbehind flags."""
    harness = make_args(output_dir)
    settings = {name: getattr(harness, name) for name in HARNESS_FLAGS}
    settings.update(output_dir=str(output_dir), max_steps=STEPS, **overrides)
    return args_class(**settings)


def sgd(model: nn.Module) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)


# ------------------------------------------------------------------------ the plain Trainer
def test_settings_given_apart_train_like_the_engine_in_a_plain_loop(tmp_path):
    """``max_grad_norm`` comes from the Trainer's arguments, everything else from the
    ``LookbehindConfig``."""
    lookbehind = LookbehindConfig(lookbehind_k=3, rho=0.1, lookbehind_adaptive_alpha=True)
    model = make_model()
    trainer = InOrderTrainer(
        model=model,
        args=plain_args(tmp_path, max_grad_norm=0.3),
        lookbehind=lookbehind,
        train_dataset=ToyDataset(),
        optimizers=(sgd(model), None),
    )
    trainer.train()
    expected = plain_loop(make_model(), 16, STEPS, **lookbehind.lookbehind_kwargs(0.3))
    assert max_param_difference(trainer.model, expected) < 1e-10
    assert max_param_difference(trainer.model, make_model()) > 1e-3
    assert trainer.lookbehind.stats().gradient_computations == 4 * STEPS


def test_lookbehind_training_arguments_are_one_lookbehind_config(tmp_path):
    """``LookbehindTrainingArguments`` is ``TrainingArguments`` plus the fields of
    ``LookbehindConfig``, with its defaults."""
    lookbehind_fields = {f.name: f.default for f in dataclasses.fields(LookbehindConfig)}
    args_fields = {f.name: f.default for f in dataclasses.fields(LookbehindTrainingArguments)}
    assert lookbehind_fields.items() <= args_fields.items()
    assert isinstance(make_args(tmp_path), LookbehindConfig)
    assert dataclasses.fields(LookbehindTrainingArguments)[0].name == "output_dir"


def test_settings_given_twice_or_not_at_all_are_refused(tmp_path):
    with pytest.raises(ValueError, match="given twice"):
        LookbehindTrainer(
            model=make_model(),
            args=make_args(tmp_path),
            lookbehind=LookbehindConfig(),
            train_dataset=ToyDataset(),
        )
    with pytest.raises(TypeError, match=r"lookbehind=LookbehindConfig\(\.\.\.\)"):
        LookbehindTrainer(model=make_model(), args=plain_args(tmp_path), train_dataset=ToyDataset())


def test_a_bad_lookbehind_config_is_refused_when_it_is_built():
    with pytest.raises(ValueError, match="unknown lookbehind_method"):
        LookbehindConfig(lookbehind_method="lookbehindd")
    with pytest.raises(ValueError, match="alpha"):
        LookbehindConfig(lookbehind_method="sam", lookbehind_alpha=0.8)


def test_the_command_line_parses_trainer_arguments_and_lookbehind_settings(tmp_path):
    parser = HfArgumentParser((TrainingArguments, LookbehindConfig))
    args, lookbehind = parser.parse_args_into_dataclasses(
        args=["--output_dir", str(tmp_path), "--lookbehind_method", "sam", "--rho", "0.2"]
    )
    assert (lookbehind.lookbehind_method, lookbehind.rho) == ("sam", 0.2)
    assert args.learning_rate == TrainingArguments(output_dir=str(tmp_path)).learning_rate


# -------------------------------------------------------------------------- Seq2SeqTrainer
VOCAB, LENGTH = 20, 6


def tiny_bart() -> BartForConditionalGeneration:
    torch.manual_seed(0)
    config = BartConfig(
        vocab_size=VOCAB,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
    )
    return BartForConditionalGeneration(config).double()


class CopyTask(Dataset):
    """Random token sequences to copy."""

    def __init__(self, n: int = 64, seed: int = 5) -> None:
        generator = torch.Generator().manual_seed(seed)
        self.tokens = torch.randint(3, VOCAB, (n, LENGTH), generator=generator)

    def __len__(self) -> int:
        return len(self.tokens)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        tokens = self.tokens[index]
        return {"input_ids": tokens, "attention_mask": torch.ones_like(tokens), "labels": tokens}


class LookbehindSeq2SeqTrainer(LookbehindMixin, Seq2SeqTrainer):
    """What a user writes; the tests' data order is sequential."""

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


def seq2seq_plain_loop(lookbehind: LookbehindConfig) -> tuple[nn.Module, list[float]]:
    model = tiny_bart()
    engine = Lookbehind(sgd(model), model=model, **lookbehind.lookbehind_kwargs())
    data, losses = CopyTask(), []
    for step in range(STEPS):
        batch = {key: torch.stack([data[i][key] for i in range(step * 16, step * 16 + 16)])
                 for key in ("input_ids", "attention_mask", "labels")}  # fmt: skip

        def closure(batch=batch):
            loss = model(**batch).loss
            loss.backward()
            return loss

        losses.append(engine.step(closure).item())
    return model, losses


def test_seq2seq_trainer_trains_evaluates_and_saves_the_slow_weights(tmp_path):
    lookbehind = LookbehindConfig(lookbehind_k=2, rho=0.1, minibatch_switching=True)
    model = tiny_bart()
    args = plain_args(
        tmp_path,
        Seq2SeqTrainingArguments,
        predict_with_generate=True,
        per_device_eval_batch_size=16,
    )
    trainer = LookbehindSeq2SeqTrainer(
        model=model,
        args=args,
        lookbehind=lookbehind,
        train_dataset=CopyTask(),
        optimizers=(sgd(model), None),
    )
    assert trainer.args is args
    trainer.train()
    expected, losses = seq2seq_plain_loop(lookbehind)
    assert max_param_difference(trainer.model, expected) < 1e-10
    assert max_param_difference(trainer.model, tiny_bart()) > 1e-3
    logged = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert logged == pytest.approx(losses, rel=1e-6)  # the Trainer sums losses in float32
    assert trainer.lookbehind.stats().gradient_computations == 2 * STEPS

    evaluation = CopyTask(16, seed=6)
    ours = trainer.predict(evaluation)
    plain = Seq2SeqTrainer(model=expected, args=args).predict(evaluation)
    assert len(ours.predictions) == len(evaluation)
    assert (ours.predictions == plain.predictions).all()
    assert ours.metrics["test_loss"] == pytest.approx(plain.metrics["test_loss"], rel=1e-10)

    trainer.save_model(tmp_path / "saved")
    reloaded = BartForConditionalGeneration.from_pretrained(tmp_path / "saved")
    assert max_param_difference(reloaded, trainer.model) == 0.0


# ------------------------------------------------------------------------ a frozen teacher
class DistillationTrainer(LookbehindMixin, Trainer):
    """Trains the model towards a frozen teacher's predictions (a user's Trainer subclass);
    ``teacher_input`` chooses what the teacher sees."""

    def __init__(self, *args, teacher: nn.Module, teacher_input, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.teacher = teacher
        self.teacher_input = teacher_input

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        return distillation_loss(model, self.teacher, self.teacher_input, inputs["x"])

    def _get_train_sampler(self, train_dataset=None):
        return SequentialSampler(train_dataset or self.train_dataset)


def distillation_loss(model, teacher, teacher_input, x: torch.Tensor) -> torch.Tensor:
    logits = model(x)["logits"]
    with torch.no_grad():
        target = teacher(teacher_input(x, logits))["logits"].softmax(-1)
    return nn.functional.cross_entropy(logits, target)


def the_batch(x, logits):
    return x


def moved_by_the_student(x, logits):
    return x + logits.detach().mean(-1, keepdim=True)


def frozen_teacher() -> TinyClassifier:
    torch.manual_seed(7)
    return TinyClassifier().double()


@pytest.mark.parametrize(
    "teacher_input, forwards_per_step", [(the_batch, 1), (moved_by_the_student, 3)]
)
def test_a_frozen_teacher_runs_once_per_step_on_the_same_inputs(
    tmp_path, teacher_input, forwards_per_step
):
    """The teacher (no parameter in the optimizer) runs in the first pass of a step and is
    replayed in the two others when it gets the same batch; fed from the student's output, it
    runs in every pass. Either way the training is the plain loop's, which calls the teacher in
    every pass."""
    lookbehind = LookbehindConfig(lookbehind_k=2, rho=0.1)
    model, teacher = make_model(), frozen_teacher()
    forwards = []
    teacher.fc1.register_forward_hook(lambda *args: forwards.append(1))
    trainer = DistillationTrainer(
        model=model,
        args=plain_args(tmp_path),
        lookbehind=lookbehind,
        train_dataset=ToyDataset(),
        optimizers=(sgd(model), None),
        teacher=teacher,
        teacher_input=teacher_input,
    )
    trainer.train()
    assert len(forwards) == forwards_per_step * STEPS

    expected, loop_teacher = make_model(), frozen_teacher()
    engine = Lookbehind(sgd(expected), **lookbehind.lookbehind_kwargs())
    data = ToyDataset()
    for step in range(STEPS):
        x = data.x[(step % 4) * 16 :][:16]

        def distill(x=x):
            loss = distillation_loss(expected, loop_teacher, teacher_input, x)
            loss.backward()
            return loss

        engine.step(distill)
    assert max_param_difference(trainer.model, expected) < 1e-10
    assert max_param_difference(trainer.teacher, frozen_teacher()) == 0.0


# ------------------------------------------------------------- an engine built by the user
@pytest.mark.parametrize("args_class", [TrainingArguments, LookbehindTrainingArguments])
def test_an_engine_built_by_the_user_trains_as_in_a_plain_loop(tmp_path, args_class):
    """Per-group rho and a perturbation of its own: the engine passed in ``optimizers=`` is
    the one that trains, exactly as the same engine in a plain loop."""
    settings = dict(k=2, alpha=0.8, rho=0.1, perturbation=FisherSAM(0.5))

    def engine_for(model: nn.Module) -> Lookbehind:
        head = list(model.fc2.parameters())
        body = [p for p in model.parameters() if all(p is not q for q in head)]
        groups = [{"params": body}, {"params": head, "lookbehind_rho": 0.0}]
        return Lookbehind(torch.optim.SGD(groups, lr=0.1, momentum=0.9), **settings)

    model = make_model()
    trainer = InOrderTrainer(
        model=model,
        args=plain_args(tmp_path, args_class=args_class),
        train_dataset=ToyDataset(),
        optimizers=(engine_for(model), None),
    )
    trainer.train()
    expected = make_model()
    engine = engine_for(expected)
    for closure in sequential_closures(expected, 16, STEPS):
        engine.step(closure)
    assert max_param_difference(trainer.model, expected) < 1e-12
    assert max_param_difference(expected, make_model()) > 1e-3
    assert trainer.lookbehind.stats().gradient_computations == STEPS * 3


def test_an_engine_built_by_the_user_and_lookbehind_flags_are_refused(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match=r"--rho 0.2, .*: the engine passed in optimizers="):
        InOrderTrainer(
            model=model,
            args=make_args(tmp_path, rho=0.2),
            train_dataset=ToyDataset(),
            optimizers=(Lookbehind(sgd(model), k=2), None),
        ).train()


# ---------------------------------------------------------------- schedule-free optimizers
def test_a_schedule_free_optimizer_name_is_refused_when_the_arguments_are_built(tmp_path):
    with pytest.raises(ValueError, match="schedule-free"):
        make_args(tmp_path, optim="schedule_free_adamw")
    with pytest.raises(ValueError, match="schedule-free"):
        LookbehindTrainer(
            model=make_model(),
            args=plain_args(tmp_path, optim="schedule_free_sgd"),
            lookbehind=LookbehindConfig(),
            train_dataset=ToyDataset(),
        )


@pytest.mark.parametrize(
    "optim", ["galore_adamw_layerwise", "apollo_adamw_layerwise", "lomo", "adalomo"]
)
def test_an_optimizer_that_updates_inside_backward_is_refused_before_any_weight_moves(
    tmp_path, optim
):
    """Layer-wise GaLore/APOLLO and LOMO step inside the backward hooks: each pass would move
    the weights. They are refused when the arguments are built, or, given apart from the
    arguments, when the trainer is built."""
    with pytest.raises(ValueError, match=f"--optim {optim} updates the weights inside"):
        make_args(tmp_path, optim=optim, optim_target_modules=["fc1"])
    model = make_model()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError, match="updates the weights inside the backward pass"):
        LookbehindTrainer(
            model=model,
            args=plain_args(tmp_path, optim=optim, optim_target_modules=["fc1"]),
            lookbehind=LookbehindConfig(),
            train_dataset=ToyDataset(),
        )
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_a_schedule_free_optimizer_is_refused_before_training(tmp_path):
    model = make_model()
    with pytest.raises(ValueError, match="schedule-free"):
        InOrderTrainer(
            model=model,
            args=make_args(tmp_path),
            train_dataset=ToyDataset(),
            optimizers=(schedulefree.AdamWScheduleFree(model.parameters(), lr=0.01), None),
        )
    trainer = InOrderTrainer(
        model=model,
        args=make_args(tmp_path),
        train_dataset=ToyDataset(),
        optimizer_cls_and_kwargs=(schedulefree.SGDScheduleFree, {"lr": 0.1}),
    )
    with pytest.raises(ValueError, match="schedule-free"):
        trainer.train()
    assert max_param_difference(trainer.model, make_model()) == 0.0
    assert trainer.state.global_step == 0


def test_a_schedule_free_optimizer_trains_alone_with_lookbehind_method_none(tmp_path):
    """The base optimizer alone: the Trainer switches it between train() and eval()."""
    args = make_args(tmp_path, optim="schedule_free_adamw", lookbehind_method="none",
                     learning_rate=0.01, max_steps=STEPS)  # fmt: skip
    trainer = InOrderTrainer(model=make_model(), args=args, train_dataset=ToyDataset())
    trainer.train()
    assert trainer.lookbehind is None
    assert max_param_difference(trainer.model, make_model()) > 1e-4
