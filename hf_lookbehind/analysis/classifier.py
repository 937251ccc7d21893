"""Run any classifier on any minibatch: the batch and output conventions the analysis tools accept.

A batch is ``(inputs, labels)`` (torch ``TensorDataset``/``DataLoader`` style, ``model(inputs)``)
or a mapping with a ``labels`` (or ``label``) entry, the other entries being keyword arguments
of the model (Hugging Face style, ``model(**inputs)``). The model returns logits, an object with
``.logits`` (a ``transformers`` ``ModelOutput``), a mapping with a ``logits`` entry, or a tuple
whose first element is the logits.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

LABEL_KEYS = ("labels", "label")

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def split_batch(batch: Any) -> tuple[Any, torch.Tensor]:
    """``(inputs, labels)`` of one minibatch."""
    if isinstance(batch, Mapping):
        label_key = next((key for key in LABEL_KEYS if key in batch), None)
        if label_key is None:
            raise ValueError(
                f"a mapping batch needs a 'labels' or 'label' entry; got keys {sorted(batch)}"
            )
        return {key: value for key, value in batch.items() if key != label_key}, batch[label_key]
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        "a batch must be (inputs, labels) or a mapping with a 'labels' entry; "
        f"got {type(batch).__name__}"
    )


def model_device(model: nn.Module) -> torch.device:
    """The device of the model's first parameter (CPU for a model without parameters)."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor moved to ``device`` (nested mappings and sequences too)."""
    from accelerate.utils import send_to_device

    return send_to_device(batch, device)


def logits_of(model: nn.Module, inputs: Any) -> torch.Tensor:
    """Call ``model`` on ``inputs`` (keyword arguments if a mapping) and return its logits."""
    output = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    if hasattr(output, "logits"):
        return output.logits
    if isinstance(output, Mapping):
        return output["logits"]
    if isinstance(output, (tuple, list)):
        return output[0]
    return output


class LogitsOf(nn.Module):
    """``model`` behind a one-argument ``forward(inputs)``, for utilities that call
    ``model(batch_inputs)`` (such as ``torch.optim.swa_utils.update_bn``)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: Any) -> torch.Tensor:
        return logits_of(self.model, inputs)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode for every submodule, restoring each module's own mode on exit."""
    modes = {module: module.training for module in model.modules()}
    model.eval()
    try:
        yield
    finally:
        for module, training in modes.items():
            module.training = training


@torch.no_grad()
def evaluate(
    model: nn.Module, batches: Iterable[Any], loss_fn: LossFn = F.cross_entropy
) -> tuple[float, float]:
    """``(mean loss, accuracy)`` over all examples of ``batches``, in eval mode.

    The loss of each minibatch (``loss_fn`` reduces by the mean) is weighted by its size.
    """
    device = model_device(model)
    loss_sum, correct, count = 0.0, 0, 0
    with eval_mode(model):
        for batch in batches:
            inputs, labels = to_device(split_batch(batch), device)
            logits = logits_of(model, inputs)
            loss_sum += loss_fn(logits, labels).item() * labels.numel()
            correct += (logits.argmax(dim=-1) == labels).sum().item()
            count += labels.numel()
    if count == 0:
        raise ValueError("evaluation got no examples (an exhausted iterator instead of a loader?)")
    return loss_sum / count, correct / count
