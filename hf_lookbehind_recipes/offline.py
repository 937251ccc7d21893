"""Without the Hugging Face Hub, a recipe fails in a second with one message instead of retrying
for a minute and ending in a ``ConnectionError``: the message names the recipe's flags for local
data and its tiny offline command (data made by :mod:`hf_lookbehind_recipes.tiny_data`).

Each recipe script calls :func:`exit_if_hub_unreachable` before its heavy imports (and again in
``main``): the flags are read with a small ``argparse`` reader (:class:`HubNeeds`), so that the
check costs no import of ``torch``, ``datasets`` or ``transformers``. Only when the command line
needs the hub (a hub dataset or model, not a local path) is the hub probed, once, with a short
timeout; when it does not answer, offline mode is switched on (``HF_HUB_OFFLINE=1``, so that the
libraries use their caches and never retry), and the recipe stops with :class:`HubUnavailable`
unless every hub dataset and model it needs is in the local cache.

This module imports the standard library only.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

PROBE_TIMEOUT = 3.0  # seconds the hub has to answer
TRUE = {"1", "ON", "YES", "TRUE"}  # huggingface_hub's true values of its variables

# (kind, repo id): what a command line downloads; kind "dataset" or "model".
HubResource = tuple[str, str]


class HubUnavailable(SystemExit):
    """The hub cannot be reached and the recipe needs something from it that is not cached.
    A ``SystemExit``: a script ends with the message alone (no traceback), status 1."""


@dataclass(frozen=True)
class RecipeHelp:
    """What the message of a recipe names: its flags for local data and its tiny command."""

    script: str
    readme: str
    local_data: str
    tiny_command: str


def offline_declared() -> bool:
    """Offline mode set by the user (``HF_HUB_OFFLINE``, ``TRANSFORMERS_OFFLINE`` or
    ``HF_DATASETS_OFFLINE``)."""
    names = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")
    return any(os.environ.get(name, "").upper() in TRUE for name in names)


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


_probed: dict[str, bool] = {}


def hub_reachable(timeout: float = PROBE_TIMEOUT) -> bool:
    """Whether the hub's endpoint answers an HTTP request within ``timeout`` seconds (any
    answer, an error status included; the proxy variables apply). The name lookup and the
    connection run in a thread, so that a lookup that hangs costs ``timeout`` at most. Probed
    once per endpoint and process."""
    endpoint = hub_endpoint()
    if endpoint not in _probed:
        answered: list[bool] = []

        def probe() -> None:
            request = urllib.request.Request(endpoint, method="HEAD")
            try:
                urllib.request.urlopen(request, timeout=timeout).close()
                answered.append(True)
            except urllib.error.HTTPError:
                answered.append(True)  # an error status is an answer
            except (OSError, ValueError):
                answered.append(False)

        thread = threading.Thread(target=probe, daemon=True)
        thread.start()
        thread.join(timeout)
        _probed[endpoint] = bool(answered and answered[0])
    return _probed[endpoint]


def _hf_home() -> Path:
    return Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")).expanduser()


def cached(kind: str, repo_id: str) -> bool:
    """Whether the hub cache (``HF_HUB_CACHE``) holds a snapshot of ``repo_id``, or, for a
    dataset, the ``datasets`` cache (``HF_DATASETS_CACHE``) holds it prepared."""
    hub_cache = Path(os.environ.get("HF_HUB_CACHE", _hf_home() / "hub")).expanduser()
    snapshots = hub_cache / f"{kind}s--{repo_id.replace('/', '--')}" / "snapshots"
    if snapshots.is_dir() and any(snapshots.iterdir()):
        return True
    if kind == "dataset":
        datasets_cache = Path(os.environ.get("HF_DATASETS_CACHE", _hf_home() / "datasets"))
        prepared = datasets_cache.expanduser() / repo_id.replace("/", "___")
        return prepared.is_dir() and any(prepared.iterdir())
    return False


def use_offline_mode() -> None:
    """Offline mode for the hub libraries: the variable for those not imported yet, their
    settings for those that are (they read it once, at import)."""
    os.environ["HF_HUB_OFFLINE"] = "1"
    constants = sys.modules.get("huggingface_hub.constants")
    if constants is not None:
        constants.HF_HUB_OFFLINE = True
    config = sys.modules.get("datasets.config")
    if config is not None:
        config.HF_HUB_OFFLINE = True


def message(recipe: RecipeHelp, missing: Sequence[HubResource], declared: bool) -> str:
    why = (
        "offline mode is set (HF_HUB_OFFLINE)"
        if declared
        else f"the Hugging Face Hub ({hub_endpoint()}) does not answer"
    )
    wanted = " and ".join(f"the {kind} {repo_id!r}" for kind, repo_id in missing)
    command = "\n".join(f"    {line}" for line in recipe.tiny_command.splitlines())
    return (
        f"{recipe.script}: {why}, and {wanted} {'is' if len(missing) == 1 else 'are'} not in "
        "the local cache.\n"
        f"Use local data instead: {recipe.local_data}.\n"
        f"Or try the recipe offline on tiny data that the repository makes (under a minute on a "
        f"CPU; 'Tiny offline run' in {recipe.readme}):\n{command}"
    )


def check_hub(
    needs: Sequence[HubResource], recipe: RecipeHelp, probe: Callable[[], bool] = hub_reachable
) -> None:
    """Return if nothing in ``needs`` comes from the hub, or the hub answers. Otherwise switch
    on offline mode, and raise :class:`HubUnavailable` unless all of ``needs`` is cached."""
    if not needs:
        return
    declared = offline_declared()
    if not declared and probe():
        return
    use_offline_mode()
    missing = [(kind, repo_id) for kind, repo_id in needs if not cached(kind, repo_id)]
    if missing:
        raise HubUnavailable(message(recipe, missing, declared))


# --- What each recipe's command line downloads, read without the recipe's own parser ----------


def _reader(*flags: str, booleans: Sequence[str] = ()) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    for flag in flags:
        parser.add_argument(flag)
    for flag in booleans:  # HfArgumentParser's booleans: --flag, --flag true, --flag false
        parser.add_argument(flag, nargs="?", const="true")
    return parser


def _is_true(value: str | None, default: bool) -> bool:
    return default if value is None else value.strip().lower() in {"true", "1", "yes", "y"}


def _hub_dataset(name: str | None) -> list[HubResource]:
    """A dataset name that is not a local path comes from the hub."""
    return [] if name is None or Path(name).exists() else [("dataset", name)]


def _hub_model(name: str | None) -> list[HubResource]:
    return [] if name is None or Path(name).exists() else [("model", name)]


@dataclass(frozen=True)
class HubNeeds:
    """What a recipe's command line downloads, read from the flags that name it: the dataset of
    ``--dataset_name`` (or ``default_dataset``, a name or a rule on the flags read), unless the
    flag ``local_data`` gives local data or the name is a local path; then the models that
    ``models`` finds in the flags. ``flags`` are all the flags read, in the order of the
    reader's usage line, ``booleans`` those read as ``HfArgumentParser`` booleans. Called with
    a command line, it returns the list of its :data:`HubResource`."""

    flags: tuple[str, ...]
    local_data: str = "--train_path"
    booleans: tuple[str, ...] = ()
    default_dataset: str | Callable[[argparse.Namespace], str | None] | None = None
    models: Callable[[argparse.Namespace], list[HubResource]] | None = None

    def __call__(self, argv: Sequence[str]) -> list[HubResource]:
        args = _reader(*self.flags, booleans=self.booleans).parse_known_args(list(argv))[0]
        needs = []
        if getattr(args, self.local_data.lstrip("-")) is None:
            default = self.default_dataset
            needs += _hub_dataset(
                args.dataset_name or (default(args) if callable(default) else default)
            )
        return needs + (self.models(args) if self.models is not None else [])


CIFAR_DATASET = "uoft-cs/cifar10"
IMAGENET_DATASET = "ILSVRC/imagenet-1k"
VIT_MODEL = "vit_base_patch16_224.orig_in21k_ft_in1k"
LIFELONG_DATASETS = {
    "split_cifar100": "uoft-cs/cifar100",
    "split_tinyimagenet": "zh-plus/tiny-imagenet",
    "split_cifar10": "uoft-cs/cifar10",
}


def _lifelong_dataset(args: argparse.Namespace) -> str | None:
    """The dataset of ``--benchmark`` (split CIFAR-100 by default)."""
    return LIFELONG_DATASETS.get(args.benchmark or "split_cifar100")


def _named_model(args: argparse.Namespace) -> list[HubResource]:
    """The model that ``--model_name_or_path`` names, unless it is a local path."""
    return _hub_model(args.model_name_or_path)


def _image_classification_models(args: argparse.Namespace) -> list[HubResource]:
    """A transformers ViT by its name, or the pretrained weights of a timm network."""
    if (args.model_library or "timm") == "transformers":
        return _hub_model(args.model_name_or_path or VIT_MODEL)
    # timm downloads the pretrained weights unless the network is built locally: with a
    # --model_config or --model_checkpoint, or by the resnet18_scratch recipe (its own config)
    scratch = args.recipe == "resnet18_scratch"
    local = scratch or args.model_config is not None or args.model_checkpoint is not None
    if _is_true(args.pretrained, default=True) and not local:
        return [("model", f"timm/{args.model_name_or_path or VIT_MODEL}")]
    return []


cifar_needs = HubNeeds(("--train_path", "--dataset_name"), default_dataset=CIFAR_DATASET)
image_classification_needs = HubNeeds(
    (
        "--train_path",
        "--dataset_name",
        "--recipe",
        "--model_library",
        "--model_name_or_path",
        "--model_config",
        "--model_checkpoint",
    ),
    booleans=("--pretrained",),
    default_dataset=IMAGENET_DATASET,
    models=_image_classification_models,
)
lifelong_needs = HubNeeds(
    ("--train_path", "--dataset_name", "--benchmark"), default_dataset=_lifelong_dataset
)
sft_needs = HubNeeds(
    ("--model_name_or_path", "--dataset_name", "--train_file"),
    local_data="--train_file",
    models=_named_model,
)
translation_needs = HubNeeds(
    ("--data_dir", "--dataset_name", "--model_name_or_path"),
    local_data="--data_dir",
    models=_named_model,
)


TINY_DATA = "python -m hf_lookbehind_recipes.tiny_data"

LOCAL_IMAGES = (
    "--train_path PATH --validation_path PATH (parquet/arrow/csv/json files in the hub schema, "
    "or image folders <class>/<image>)"
)

RECIPES: dict[str, tuple[Callable[[Sequence[str]], list[HubResource]], RecipeHelp]] = {
    "cifar": (
        cifar_needs,
        RecipeHelp(
            script="run_cifar.py",
            readme="examples/cifar/README.md",
            local_data=f"{LOCAL_IMAGES}, e.g. --train_path ../shared/data/cifar10/train.parquet "
            "--validation_path ../shared/data/cifar10/test.parquet",
            tiny_command=f"""{TINY_DATA} cifar outputs/tiny_data
python examples/cifar/run_cifar.py --model_name resnet8 \\
    --train_path outputs/tiny_data/cifar10/train.parquet \\
    --validation_path outputs/tiny_data/cifar10/test.parquet \\
    --num_train_epochs 2 --per_device_train_batch_size 25 --dataloader_num_workers 0 \\
    --save_strategy no --report_to none --use_cpu --output_dir outputs/tiny/cifar""",
        ),
    ),
    "image_classification": (
        image_classification_needs,
        RecipeHelp(
            script="run_image_classification.py",
            readme="examples/image_classification/README.md",
            local_data=f"{LOCAL_IMAGES}, e.g. --train_path ../shared/data/imagenet_sample/val "
            "--validation_path ../shared/data/imagenet_sample/val; and a network built without "
            "downloads: --model_config JSON (random initialisation), --model_checkpoint FILE, or "
            "--model_library transformers --model_name_or_path LOCAL_DIR",
            tiny_command=f"""{TINY_DATA} image_classification outputs/tiny_data
python examples/image_classification/run_image_classification.py \\
    --train_path outputs/tiny_data/imagenet_sample/val \\
    --validation_path outputs/tiny_data/imagenet_sample/val \\
    --model_config '{{"img_size":32,"patch_size":8,"embed_dim":32,"depth":2,"num_heads":2}}' \\
    --num_train_epochs 2 --per_device_train_batch_size 16 --learning_rate 0.1 --warmup_steps 0 \\
    --dataloader_num_workers 0 --save_strategy no --report_to none --use_cpu \\
    --output_dir outputs/tiny/image_classification""",
        ),
    ),
    "lifelong": (
        lifelong_needs,
        RecipeHelp(
            script="run_lifelong.py",
            readme="examples/lifelong/README.md",
            local_data=f"{LOCAL_IMAGES}, e.g. --benchmark split_cifar10 --train_path "
            "../shared/data/cifar10/train.parquet --validation_path "
            "../shared/data/cifar10/test.parquet",
            tiny_command=f"""{TINY_DATA} lifelong outputs/tiny_data
python examples/lifelong/run_lifelong.py --benchmark split_cifar10 \\
    --train_path outputs/tiny_data/cifar10/train.parquet \\
    --validation_path outputs/tiny_data/cifar10/test.parquet \\
    --train_samples_per_task 12 --test_samples_per_task 4 --epochs_per_task 1 \\
    --cnn_channels 8 --k 2 --device cpu --output_dir outputs/tiny/lifelong""",
        ),
    ),
    "sft": (
        sft_needs,
        RecipeHelp(
            script="run_sft.py",
            readme="examples/sft/README.md",
            local_data="--train_file FILE.jsonl --validation_file FILE.jsonl (messages, "
            "prompt/completion or text) and --model_name_or_path LOCAL_DIR (a saved causal "
            "language model and its tokenizer)",
            tiny_command=f"""{TINY_DATA} sft outputs/tiny_data
python examples/sft/run_sft.py --model_name_or_path outputs/tiny_data/sft/model \\
    --train_file outputs/tiny_data/sft/train.jsonl \\
    --validation_file outputs/tiny_data/sft/eval.jsonl \\
    --max_steps 4 --per_device_train_batch_size 8 --learning_rate 1e-2 \\
    --lora_r 4 --lora_target_modules q_proj v_proj \\
    --lookbehind_method lookbehind --minibatch_switching --rho 0.05 \\
    --save_strategy no --report_to none --use_cpu --output_dir outputs/tiny/sft""",
        ),
    ),
    "translation": (
        translation_needs,
        RecipeHelp(
            script="run_translation.py",
            readme="examples/translation/README.md",
            local_data="--data_dir DIR (aligned files SPLIT.de / SPLIT.en, one sentence per "
            "line), e.g. --data_dir ../shared/data/iwslt14_de_en/tok --train_split valid "
            "--validation_split test",
            tiny_command=f"""{TINY_DATA} translation outputs/tiny_data
python examples/translation/run_translation.py \\
    --data_dir outputs/tiny_data/iwslt14_de_en/tok --train_split valid --validation_split test \\
    --bpe_vocab_size 200 --d_model 32 --encoder_layers 1 --decoder_layers 1 \\
    --attention_heads 2 --ffn_dim 64 --dropout 0.1 --max_tokens 500 \\
    --num_train_epochs 2 --learning_rate 1e-2 \\
    --do_train --do_eval --do_predict --predict_with_generate --generation_num_beams 1 \\
    --generation_max_length 16 --save_strategy no --report_to none --use_cpu \\
    --output_dir outputs/tiny/translation""",
        ),
    ),
}


def exit_if_hub_unreachable(recipe: str, argv: Sequence[str]) -> None:
    """:func:`check_hub` for the command line ``argv`` of ``recipe`` (a key of
    :data:`RECIPES`)."""
    needs, recipe_help = RECIPES[recipe]
    check_hub(needs(argv), recipe_help)
