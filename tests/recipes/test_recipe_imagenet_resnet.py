"""The ImageNet ResNet-18 from-scratch recipe (``run_image_classification.py --recipe
resnet18_scratch``, the paper's Table 1 ImageNet column): its model, preprocessing, learning-rate
scaling and step schedule against independent expectations, and a short run on the shared
one-image-per-class ImageNet sample at a small resolution."""

from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest
import torch
from helpers import ROOT
from run_image_classification import RECIPES, create_model, main, parse_arguments
from torchvision.transforms import v2

from hf_lookbehind import Lookbehind
from hf_lookbehind_recipes.image_data import DataArguments, load_image_splits
from hf_lookbehind_recipes.learning_rate import LearningRateArguments, MultiStepLRTrainer

RECIPE = ("--recipe", "resnet18_scratch")
README = ROOT / "examples" / "image_classification" / "README.md"
# Table 1's rows, in order, the method each names (engine method, perturbation, rho) and the
# paper's number in its ImageNet ResNet-18 column (validation top-1 %, mean ± std of 3 seeds).
TABLE_1 = [
    ("SGD", "none", "sam", None, "69.91 ± .04"),
    ("Lookahead-SGD", "lookahead", "none", None, "69.63 ± .12"),
    ("SAM", "sam", "sam", 0.05, "70.01 ± .06"),
    ("Multistep-SAM", "multistep", "sam", 0.05, "69.92 ± .07"),
    ("+ average grads", "multistep_avg", "sam", 0.05, "70.01 ± .07"),
    ("Lookahead-SAM", "lookahead", "sam", 0.05, "69.99 ± .07"),
    ("Lookbehind-SAM", "lookbehind", "sam", 0.05, "70.16 ± .08"),
    ("ASAM", "sam", "asam", 0.5, "70.15 ± .06"),
    ("Multistep-ASAM", "multistep", "asam", 0.5, "70.06 ± .01"),
    ("+ average grads", "multistep_avg", "asam", 0.5, "70.11 ± .03"),
    ("Lookahead-ASAM", "lookahead", "asam", 0.5, "70.00 ± .11"),
    ("Lookbehind-ASAM", "lookbehind", "asam", 0.5, "70.23 ± .22"),
]
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def sample_folder(shared_data: Path) -> str:
    return str(shared_data / "imagenet_sample" / "val")


def test_recipe_is_the_90_epoch_sgd_recipe_with_linear_lr_scaling(tmp_path):
    model_args, _, lr_args, args = parse_arguments([*RECIPE, "--output_dir", str(tmp_path)])
    assert (model_args.model_name_or_path, model_args.pretrained) == ("resnet18", False)
    assert args.num_train_epochs == 90 and args.per_device_train_batch_size == 256
    assert (args.optim, args.optim_args, args.weight_decay) == ("sgd", "momentum=0.9", 1e-4)
    assert args.decay_all_parameters  # plain SGD weight decay, BatchNorm and biases included
    assert (lr_args.lr_schedule, lr_args.lr_decay_epochs, lr_args.lr_decay_factor) == (
        "multistep",
        [30, 60],
        0.1,
    )
    assert args.learning_rate == pytest.approx(0.1)  # batch 256 on one process: 0.1 x 256/256
    # Table 1 is same-batch Lookbehind-SAM (the ViT recipe switches minibatches); k is the
    # method's default (2, and 1 for --lookbehind_method sam, which the ViT recipe's k = 2 refuses).
    assert (args.lookbehind_method, args.minibatch_switching) == ("lookbehind", False)
    assert args.lookbehind_k is None and args.max_grad_norm == 0.0  # plain SGD: no clipping
    sam = parse_arguments([*RECIPE, "--lookbehind_method", "sam", "--output_dir", str(tmp_path)])
    assert sam[3].lookbehind_method == "sam"

    # lr 0.1 x global batch / 256; the global batch counts accumulated micro-batches.
    for flags, global_batch in ((["--per_device_train_batch_size", "64"], 64),
                                (["--per_device_train_batch_size", "32",
                                  "--gradient_accumulation_steps", "4"], 128)):  # fmt: skip
        args = parse_arguments([*RECIPE, *flags, "--output_dir", str(tmp_path)])[3]
        assert args.learning_rate == pytest.approx(0.1 * global_batch / 256)
    # An explicit --learning_rate is the rate at batch 256.
    args = parse_arguments(
        [*RECIPE, "--learning_rate", "0.2", "--per_device_train_batch_size", "512",
         "--output_dir", str(tmp_path)]
    )[3]  # fmt: skip
    assert args.learning_rate == pytest.approx(0.4)
    # The ViT recipe does not scale.
    args = parse_arguments(["--learning_rate", "0.03", "--output_dir", str(tmp_path)])[3]
    assert args.learning_rate == pytest.approx(0.03)


def test_resnet18_from_random_initialisation_and_its_preprocessing(shared_data, tmp_path):
    model_args, data_args, _, _ = parse_arguments([*RECIPE, "--output_dir", str(tmp_path)])
    model, train_transform, eval_transform, processor = create_model(model_args, 1000, data_args)
    assert processor is None
    backbone = model.backbone
    assert sum(p.numel() for p in backbone.parameters()) == 11_689_512  # torchvision's ResNet-18
    # Random initialisation as torchvision's: every BatchNorm starts at gamma = 1, including the
    # last of each residual branch (timm would zero it); He-normal convolutions (not weights
    # loaded from anywhere: their std is sqrt(2 / fan_out)).
    for module in backbone.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))
    conv = backbone.layer3[0].conv1.weight  # 256 x 128 x 3 x 3
    assert conv.std().item() == pytest.approx((2 / (256 * 9)) ** 0.5, rel=0.02)

    folder = sample_folder(shared_data)
    image = load_image_splits(DataArguments(train_path=folder, validation_path=folder), 0)[0][0]
    image = image["image"].convert("RGB")
    # Evaluation: resize the shorter side to 256, center crop 224 (bilinear), normalise.
    reference = v2.Compose(
        [
            v2.PILToTensor(),
            v2.Resize(256, interpolation=v2.InterpolationMode.BILINEAR, antialias=True),
            v2.CenterCrop(224),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(IMAGENET_MEAN, IMAGENET_STD),
        ]
    )
    assert torch.allclose(eval_transform(image), reference(image), atol=0.02)
    # Training: random resized crops of 224 with flips, no colour jitter (as torchvision's
    # reference recipe): the same seed with the crop's own draws reproduces it exactly.
    names = [type(t).__name__ for t in train_transform.transforms]
    assert names == [
        "RandomResizedCropAndInterpolation",
        "RandomHorizontalFlip",
        "MaybeToTensor",
        "Normalize",
    ]
    crop = train_transform.transforms[0]
    assert (crop.size, crop.scale) == ((224, 224), (0.08, 1.0))
    assert train_transform(image).shape == (3, 224, 224)


def test_schedule_decays_at_epochs_30_and_60_of_90(tmp_path):
    _, _, lr_args, args = parse_arguments(
        [*RECIPE, "--per_device_train_batch_size", "32", "--eval_strategy", "no",
         "--output_dir", str(tmp_path)]
    )  # fmt: skip
    trainer = MultiStepLRTrainer(
        model=torch.nn.Linear(2, 2),
        args=args,
        decay_epochs=lr_args.lr_decay_epochs,
        decay_factor=lr_args.lr_decay_factor,
    )
    steps_per_epoch = 32  # e.g. 1,000 images in batches of 32, the last one partial
    total = 90 * steps_per_epoch
    trainer.create_optimizer_and_scheduler(num_training_steps=total)
    base = 0.1 * 32 / 256
    rates = []
    for _ in range(total):
        rates.append(trainer.lr_scheduler.get_last_lr()[0])
        trainer.optimizer.step()
        trainer.lr_scheduler.step()
    for step, rate in enumerate(rates):
        epoch = step // steps_per_epoch
        expected = base * 0.1 ** ((epoch >= 30) + (epoch >= 60))
        assert rate == pytest.approx(expected, rel=1e-12), (step, epoch)


def readme_table_1() -> list[tuple[str, str, int, str]]:
    """(method, method flags, passes per step, quoted paper number) of the README's table."""
    section = README.read_text().split("### Commands and the paper's numbers")[1]
    rows = re.findall(r"^\| ([^|`]+?) \| `([^`]+)` \| (\d+) \| ([^|]+?) \|$", section, re.M)
    return [(name, flags, int(passes), paper) for name, flags, passes, paper in rows]


def passes_per_step(args) -> int:
    """Forward/backward passes of one optimizer step of the engine that ``args`` configure, on
    a small model (the base optimizer alone for ``--lookbehind_method none``)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    if args.lookbehind_method != "none":
        optimizer = Lookbehind(optimizer, model=model, **args.lookbehind_kwargs())
    inputs, labels = torch.randn(8, 4), torch.randint(0, 3, (8,))
    passes = []

    def closure() -> torch.Tensor:
        passes.append(1)
        loss = torch.nn.functional.cross_entropy(model(inputs), labels)
        loss.backward()
        return loss

    optimizer.step(closure)
    return len(passes)


def test_every_table_1_command_of_the_readme_builds_its_method(tmp_path):
    """Each README command parses with the recipe into the method its row names, and one step
    runs the passes the README states (Lookahead: one inner step per Trainer step)."""
    rows = readme_table_1()
    assert [name for name, *_ in rows] == [name for name, *_ in TABLE_1]
    for (name, flags, passes, _), (_, method, perturbation, rho, _) in zip(rows, TABLE_1):
        args = parse_arguments([*RECIPE, *shlex.split(flags), "--output_dir", str(tmp_path)])[3]
        assert (args.lookbehind_method, args.perturbation) == (method, perturbation), name
        if rho is not None:
            assert args.rho == rho, name
        assert passes_per_step(args) == passes, name


def test_sam_baseline_in_both_recipes(tmp_path):
    """k defaults to the method's (2; 1 for SAM) in both recipes, so the SAM baseline needs no
    --lookbehind_k."""
    flags = ["--lookbehind_method", "sam", "--minibatch_switching", "False"]
    for recipe in ("vit_finetune", "resnet18_scratch"):
        args = parse_arguments(["--recipe", recipe, *flags, "--output_dir", str(tmp_path)])[3]
        assert passes_per_step(args) == 2, recipe
    args = parse_arguments(["--output_dir", str(tmp_path)])[3]  # the ViT default: Lookbehind
    assert (args.lookbehind_method, args.minibatch_switching) == ("lookbehind", True)
    assert passes_per_step(args) == 2  # one inner step of k = 2 with switching


@pytest.mark.parametrize("recipe", ["vit_finetune", "resnet18_scratch"])
@pytest.mark.parametrize("method", ["none", "sam", "multistep", "lookahead", "lookbehind"])
def test_every_method_runs_with_the_recipe_defaults(tmp_path, recipe, method):
    """A recipe's defaults that ``--lookbehind_method`` does not read are left unset (the
    Trainer would refuse them), those it reads are kept."""
    argv = ["--recipe", recipe, "--lookbehind_method", method, "--output_dir", str(tmp_path)]
    args = parse_arguments(argv)[3]
    assert args.lookbehind_method == method
    assert args.rho == (None if method == "none" else RECIPES[recipe]["rho"])
    kept_alpha = method in ("lookahead", "lookbehind")
    assert args.lookbehind_alpha == (RECIPES[recipe]["lookbehind_alpha"] if kept_alpha else None)
    switching = RECIPES[recipe]["minibatch_switching"] and method == "lookbehind"
    assert args.minibatch_switching == switching


def test_readme_quotes_table_1_of_the_paper():
    """The README's last column is the paper's Table 1, ImageNet ResNet-18 column."""
    quoted = [(name, paper) for name, _, _, paper in readme_table_1()]
    assert quoted == [(name, paper) for name, *_, paper in TABLE_1]


def test_bad_recipe_and_schedule_flags_fail_when_parsed(tmp_path):
    out = ["--output_dir", str(tmp_path)]
    with pytest.raises(SystemExit):  # argparse: invalid choice
        parse_arguments(["--recipe", "resnet50_scratch", *out])
    with pytest.raises(ValueError, match="strictly increasing, got \\[60, 30\\]"):
        LearningRateArguments(lr_decay_epochs=[60, 30])
    with pytest.raises(ValueError, match="--lr_reference_batch_size must be a positive"):
        LearningRateArguments(lr_reference_batch_size=0)
    with pytest.raises(ValueError, match="--crop_pct must be in \\(0, 1\\]"):
        parse_arguments([*RECIPE, "--crop_pct", "1.5", *out])
    with pytest.raises(ValueError, match="--image_size set the preprocessing of timm models"):
        parse_arguments(["--model_library", "transformers", "--image_size", "64", *out])
    # A ViT's input size is fixed by its architecture: the flag alone cannot change it.
    model_args, data_args, _, _ = parse_arguments(
        ["--model_config", '{"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 1, '
         '"num_heads": 2}', "--image_size", "64", *out]
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"takes inputs of \(32, 32\) pixels only"):
        create_model(model_args, 10, data_args)


@pytest.mark.slow
def test_short_resnet18_run_learns_and_reports_top1_top5(shared_data, tmp_path):
    """4 epochs of Lookbehind-SAM (the recipe's default method) on 48 images (48 classes of the
    1,000) at 48 px, the lr decayed after epoch 3."""
    folder = sample_folder(shared_data)
    main(
        [*RECIPE,
         "--train_path", folder, "--validation_path", folder,
         "--max_train_samples", "48", "--max_eval_samples", "48",
         "--image_size", "48",
         "--num_train_epochs", "4", "--lr_decay_epochs", "3",
         "--per_device_train_batch_size", "16", "--per_device_eval_batch_size", "48",
         "--learning_rate", "0.32",  # 0.02 at batch 16
         "--logging_steps", "1", "--save_strategy", "no",
         "--dataloader_num_workers", "0", "--report_to", "none", "--seed", "0",
         "--output_dir", str(tmp_path)]
    )  # fmt: skip
    results = json.loads((tmp_path / "all_results.json").read_text())
    history = json.loads((tmp_path / "trainer_state.json").read_text())["log_history"]

    train_logs = [entry for entry in history if "loss" in entry]
    assert len(train_logs) == 12  # 3 steps per epoch
    # From ln(1000) = 6.9 towards the 48 classes it sees (ln 48 = 3.9) and below.
    first, last = (sum(e["loss"] for e in logs) / 3 for logs in (train_logs[:3], train_logs[-3:]))
    assert last < first - 1.0, [entry["loss"] for entry in train_logs]
    # lr 0.32 x 16/256 = 0.02 for the first 3 epochs (9 steps), then x0.1.
    rates = [entry["learning_rate"] for entry in train_logs]
    assert rates == pytest.approx([0.02] * 9 + [0.002] * 3, rel=1e-9)
    assert all(0.0 < entry["lookbehind_alpha"] <= 1.0 for entry in train_logs)

    evaluations = [entry for entry in history if "eval_top1" in entry]
    assert len(evaluations) == 4
    assert 0.0 <= results["eval_top1"] <= results["eval_top5"] <= 1.0
    assert results["eval_accuracy"] == results["eval_top1"]
