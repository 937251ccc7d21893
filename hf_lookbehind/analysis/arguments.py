"""The command lines of the analysis tools: one ``argparse`` parser per tool (``*_parser``,
gathered in :data:`PARSERS`), the options that several tools share (the models and data to
analyse, the training runs to read, where the results go) and the help formatter that shows each
option's default. :mod:`.cli` parses with these and runs the tools; this module imports only
``torch`` (for the default ``--device``) and the names of the neighbourhoods."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from .sharpness import NEIGHBOURHOODS

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``--help`` shows every option's default after its help, except where there is none to
    show (required options, and those whose help says what an unset value means)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.required or action.default is None:
            return action.help
        return super()._get_help_string(action)


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=HelpFormatter
    )


def _add_output_dir(parser: argparse.ArgumentParser) -> None:
    """The required ``--output_dir`` of the tools that write into one folder."""
    parser.add_argument(
        "--output_dir", type=Path, required=True, help="Where the JSON and PNG files go."
    )


def _add_runs(parser: argparse.ArgumentParser) -> None:
    """The positional Trainer output directories of the tools that read training logs."""
    parser.add_argument(
        "runs",
        nargs="+",
        metavar="[LABEL=]OUTPUT_DIR",
        help="Trainer output directories (or their trainer_state.json).",
    )


def _add_model_and_data_arguments(parser: argparse.ArgumentParser, split: str) -> None:
    models = parser.add_argument_group("models")
    models.add_argument(
        "--model",
        action="append",
        required=True,
        metavar="[LABEL=]NAME_OR_PATH",
        help="A model to analyse (repeat for several): a Hugging Face image classifier (hub "
        "name or local directory), or the argument of --model_factory.",
    )
    models.add_argument(
        "--model_factory",
        metavar="MODULE:FUNCTION",
        help="Builds each --model from its path: 'package.module:function' or "
        "'path/to/file.py:function' returning an nn.Module (or a tuple starting with one). "
        "Default: none, every --model is a Hugging Face image classifier.",
    )
    models.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="Where the models run (cuda when it is available).",
    )
    data = parser.add_argument_group("data")
    data.add_argument(
        "--dataset",
        required=True,
        help="Hub dataset name, local dataset folder, or one parquet/csv/json/arrow file.",
    )
    data.add_argument("--split", default=split, help="Split of a hub dataset or folder.")
    data.add_argument("--image_column", help="Image column. Default: the column of type Image.")
    data.add_argument(
        "--label_column", help="Label column. Default: the column of type ClassLabel."
    )
    statistics = {
        "--image_mean": (
            IMAGENET_MEAN,
            "Per-channel mean of the inputs of --model_factory models. The default is the "
            "ImageNet statistics of the pretrained CIFAR ResNet-20/56 checkpoints; a model "
            "trained by examples/cifar/run_cifar.py needs CIFAR-10's: 0.4914 0.4822 0.4465.",
        ),
        "--image_std": (
            IMAGENET_STD,
            "Per-channel std of the inputs of --model_factory models (CIFAR-10's: 0.2471 "
            "0.2435 0.2616).",
        ),
    }
    for flag, (default, help_text) in statistics.items():
        data.add_argument(
            flag, type=float, nargs=3, default=default, metavar=("R", "G", "B"), help=help_text
        )
    parser.add_argument("--seed", type=int, default=0, help="Seed of the minibatch draws.")
    _add_output_dir(parser)


def sharpness_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "lookbehind-sharpness",
        "m-sharpness (eq. 5, or eq. 6 for ASAM) against the radius r: the mean and std over n "
        "minibatches of m training examples, one line per model (Figure 3).",
    )
    _add_model_and_data_arguments(parser, split="train")
    parser.add_argument(
        "--radii",
        type=float,
        nargs="+",
        default=[0.01, 0.02, 0.05, 0.1, 0.2],
        metavar="R",
        help="Radii r of the neighbourhood.",
    )
    parser.add_argument(
        "--neighbourhood",
        choices=NEIGHBOURHOODS,
        default="sam",
        help="sam: the L2 ball (eq. 5); asam: the ball scaled by |w| + eta (eq. 6).",
    )
    parser.add_argument("--asam_eta", type=float, default=0.01, help="eta of the ASAM scaling.")
    parser.add_argument(
        "--asam_all_params",
        action="store_true",
        help="ASAM rescales every parameter, not only those named *weight*.",
    )
    parser.add_argument("--batch_size", type=int, default=128, help="m, examples per minibatch.")
    parser.add_argument("--num_batches", type=int, default=16, help="n, minibatches.")
    parser.add_argument(
        "--ascent_steps",
        type=int,
        default=10,
        help="Gradient evaluations of the projected ascent per minibatch and radius.",
    )
    parser.add_argument(
        "--ascent_step_size", type=float, default=1.0, help="Ascent step length, a fraction of r."
    )
    return parser


def noise_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "lookbehind-noise",
        "Accuracy with noisy weights w * N(1, sigma^2) after recomputing the BatchNorm "
        "statistics on training batches: mean and std over noise draws per sigma, one line per "
        "model (Sec. 4.4, Figure 4).",
    )
    _add_model_and_data_arguments(parser, split="test")
    parser.add_argument(
        "--calibration_dataset",
        help="Training data for the BatchNorm statistics. Default: --dataset with "
        "--calibration_split; required when --dataset is a single file.",
    )
    parser.add_argument(
        "--calibration_split", default="train", help="Split of --calibration_dataset."
    )
    parser.add_argument(
        "--max_eval_samples",
        type=int,
        help="Evaluate on a random subset (seeded) of this many examples. Default: all.",
    )
    parser.add_argument("--batch_size", type=int, default=256, help="Evaluation batch size.")
    parser.add_argument(
        "--calibration_batch_size", type=int, default=128, help="BatchNorm calibration batch size."
    )
    parser.add_argument(
        "--calibration_batches",
        type=int,
        default=50,
        help="Training batches that recompute the BatchNorm statistics.",
    )
    parser.add_argument(
        "--sigmas",
        type=float,
        nargs="+",
        default=[0.0, 0.02, 0.04, 0.06, 0.08, 0.1],
        metavar="SIGMA",
        help="Noise levels sigma (0: the clean model).",
    )
    parser.add_argument("--draws", type=int, default=5, help="Noise draws per sigma.")
    return parser


def curves_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "lookbehind-curves",
        "alpha (Figure 10), loss, accuracy, ascent gradient norm and perturbation distance over "
        "training, from the trainer_state.json of Trainer output directories.",
    )
    _add_runs(parser)
    _add_output_dir(parser)
    return parser


def tradeoff_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "lookbehind-tradeoff",
        "Loss-sharpness trade-off (Figure 1): one labelled point per run, x = its m-sharpness "
        "at --radius, y = --metric.",
    )
    parser.add_argument(
        "--sharpness_json",
        type=Path,
        nargs="+",
        required=True,
        help="sharpness.json files written by lookbehind-sharpness (their labels are the runs).",
    )
    parser.add_argument(
        "--radius",
        type=float,
        required=True,
        help="The radius r (one of those the sharpness was measured at).",
    )
    parser.add_argument(
        "--metric",
        default="base_loss",
        help="base_loss (the loss L(w) on the sharpness minibatches) or a key of each run's "
        "all_results.json (e.g. eval_accuracy, train_loss), read from --run_dir.",
    )
    parser.add_argument(
        "--run_dir",
        action="append",
        default=[],
        metavar="LABEL=OUTPUT_DIR",
        help="The output directory of each run, for metrics other than base_loss (repeat).",
    )
    _add_output_dir(parser)
    return parser


def sweep_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "lookbehind-sweep",
        "alpha x k sensitivity grid (Figure 7): launch the runs one after the other (skipping "
        "finished ones) or only collect them, then draw the heatmap of the accuracy relative to "
        "a baseline run. Arguments after '--' are appended to every command.",
    )
    parser.add_argument(
        "--output_root",
        type=Path,
        required=True,
        help="Folder of the cells' run directories (alpha_<alpha>-k_<k>).",
    )
    parser.add_argument(
        "--alphas", nargs="+", default=["0.2", "0.5", "0.8"], help="The alpha of each row."
    )
    parser.add_argument(
        "--ks", type=int, nargs="+", default=[2, 5, 10], help="The k of each column."
    )
    parser.add_argument(
        "--template",
        help="The command that trains one cell, with the fields {alpha}, {k} and {output_dir} "
        "(replaced by each cell's values); needed unless --collect_only. No default.",
    )
    parser.add_argument(
        "--collect_only", action="store_true", help="Launch nothing; read the finished cells."
    )
    parser.add_argument(
        "--baseline_dir",
        type=Path,
        help="Output directory of the baseline run. Default: none, the heatmap shows the values.",
    )
    parser.add_argument(
        "--metric", default="eval_accuracy", help="The key of all_results.json to compare."
    )
    parser.add_argument(
        "--output_dir",
        type=Path,
        help="Where the JSON and PNG files go. Default: --output_root.",
    )
    return parser


def compute_parser() -> argparse.ArgumentParser:
    parser = _parser(
        "lookbehind-compute",
        "A metric against the gradient computations (forward/backward passes) that "
        "LookbehindTrainer logs, one line per run, and the computations at which each run first "
        "reaches the reference run's best value, as a fraction of the reference's (Table 10).",
    )
    _add_runs(parser)
    parser.add_argument(
        "--metric",
        default="eval_accuracy",
        help="A key of the evaluation entries, e.g. eval_accuracy, eval_top5, eval_bleu.",
    )
    parser.add_argument(
        "--reference",
        help="Label of the reference run (Table 10: Multistep). Default: the first run.",
    )
    parser.add_argument(
        "--target",
        type=float,
        help="The value to reach (the reference must reach it). Default: the reference's best.",
    )
    parser.add_argument(
        "--lower_is_better", action="store_true", help="For losses: reach at most the target."
    )
    _add_output_dir(parser)
    return parser


PARSERS = {
    "sharpness": sharpness_parser,
    "noise": noise_parser,
    "curves": curves_parser,
    "tradeoff": tradeoff_parser,
    "sweep": sweep_parser,
    "compute": compute_parser,
}
