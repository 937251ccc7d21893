"""The alpha flags of the Trainer layer (a float ``--lookbehind_alpha`` and the
``--lookbehind_adaptive_alpha`` switch; the older spelling ``--lookbehind_alpha adaptive``
still works and warns), and a callback that schedules rho through the parameter groups: its
run equals the plain loop that sets the same values before every step."""

from __future__ import annotations

import pytest
import torch
from helpers.trainer_harness import make_model, make_trainer, sequential_closures
from transformers import HfArgumentParser, TrainerCallback

from hf_lookbehind import Lookbehind, LookbehindTrainingArguments


def parse(tmp_path, *flags: str) -> LookbehindTrainingArguments:
    parser = HfArgumentParser(LookbehindTrainingArguments)
    argv = ["--output_dir", str(tmp_path), "--use_cpu", "true", *flags]
    (args,) = parser.parse_args_into_dataclasses(args=argv)
    return args


def test_the_adaptive_switch_is_a_flag_of_its_own(tmp_path):
    switch = parse(tmp_path, "--lookbehind_adaptive_alpha")
    assert switch.lookbehind_kwargs()["adaptive_alpha"] is True
    with pytest.raises(SystemExit):  # argparse: alpha is a number
        parse(tmp_path, "--lookbehind_alpha", "adaptive")


def test_alpha_is_a_number_on_the_command_line(tmp_path):
    args = parse(tmp_path, "--lookbehind_alpha", "0.8")
    assert type(args.lookbehind_alpha) is float and args.lookbehind_alpha == 0.8
    assert args.lookbehind_kwargs()["alpha"] == 0.8
    with pytest.raises(SystemExit):  # argparse: invalid value
        parse(tmp_path, "--lookbehind_alpha", "fast")
    with pytest.raises(ValueError, match=r"must be a number in \(0, 1\]"):
        parse(tmp_path, "--lookbehind_alpha", "1.5")


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (
            ("--lookbehind_method", "sam", "--lookbehind_adaptive_alpha"),
            "--lookbehind_adaptive_alpha True is defined for --lookbehind_method lookbehind",
        ),
        (("--lookbehind_method", "none", "--lookbehind_adaptive_alpha"), "no effect"),
        (("--lookbehind_adaptive_alpha", "--lookbehind_alpha", "0.8"), "has no effect"),
    ],
)
def test_the_adaptive_switch_where_it_is_not_read_is_refused(tmp_path, flags, message):
    with pytest.raises(ValueError, match=message):
        parse(tmp_path, *flags)


class RhoSchedule(TrainerCallback):
    """Sets every group's rho before each step, as a scheduler would."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def on_step_begin(self, args, state, control, optimizer=None, **kwargs):
        for group in optimizer.param_groups:
            group["lookbehind_rho"] = self.values[state.global_step]


def test_a_callback_schedules_rho_through_the_groups(tmp_path):
    values = [0.3, 0.0, 0.1, 0.05, 0.2, 0.0]
    trainer = make_trainer(tmp_path, lookbehind_k=2, max_steps=len(values))
    trainer.add_callback(RhoSchedule(values))
    trainer.train()

    model = make_model()
    engine = Lookbehind(torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), k=2, rho=0.1)
    for rho, closure in zip(values, sequential_closures(model, 16, len(values))):
        for group in engine.param_groups:
            group["lookbehind_rho"] = rho
        engine.step(closure)
    for trained, expected in zip(trainer.model.parameters(), model.parameters()):
        assert torch.equal(trained, expected)
    unscheduled = make_model()
    plain = Lookbehind(
        torch.optim.SGD(unscheduled.parameters(), lr=0.1, momentum=0.9), k=2, rho=0.1
    )
    for closure in sequential_closures(unscheduled, 16, len(values)):
        plain.step(closure)
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), unscheduled.parameters()))
