"""Train a CIFAR-10/100 classifier with Lookbehind-SAM/ASAM or any baseline of the paper.

Defaults are the paper's setup (Mordido et al., ICML 2024, Sec. 4.2): 200 epochs, batch 128,
SGD (lr 0.1, momentum 0.9, weight decay 5e-4) with the learning rate multiplied by 0.1 at epochs
50/100/150, random crop (padding 4) and horizontal flip, per-dataset normalisation, and an
evaluation of the slow weights after every epoch. ``--lr_schedule trainer
--lr_scheduler_type cosine --label_smoothing_factor 0.1`` gives the ASAM-style setup of Table 8.
``--label_noise 0.4`` trains on symmetric noisy labels and logs how much of the noise the model
fits at every evaluation (``hf_lookbehind_recipes.label_noise``). The flags, data and training
run are in ``hf_lookbehind_recipes.cifar``.

    accelerate launch examples/cifar/run_cifar.py --model_name resnet34 \\
        --dataset_name uoft-cs/cifar10 --lookbehind_method lookbehind --rho 0.05 \\
        --lookbehind_k 2 --lookbehind_alpha 0.5 --output_dir out/c10_r34_lb --do_train --do_eval

Without the hub it stops at once with the flags for local files and the tiny offline command of
README.md.
"""

from __future__ import annotations

import sys

from hf_lookbehind_recipes.offline import exit_if_hub_unreachable

if __name__ == "__main__":  # without the hub, fail in a second rather than after the imports
    exit_if_hub_unreachable("cifar", sys.argv[1:])

from collections.abc import Sequence

from hf_lookbehind_recipes.cifar import load_cifar_data, parse_arguments, train_cifar
from hf_lookbehind_recipes.processes import end_process_group


def main(argv: Sequence[str] | None = None) -> dict[str, float]:
    """Train and evaluate one model; the metrics of ``all_results.json``."""
    model_args, data_args, lr_args, training_args = parse_arguments(argv)
    exit_if_hub_unreachable("cifar", sys.argv[1:] if argv is None else argv)
    data = load_cifar_data(data_args, seed=training_args.seed)
    return train_cifar((model_args, data_args, lr_args, training_args), data)


if __name__ == "__main__":
    main()
    end_process_group()
