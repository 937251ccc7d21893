"""The engine and :class:`reference_lookbehind.ReferenceLookbehind`, the literal 2k-pass
transcription of Algorithm 1, on twin models."""

from __future__ import annotations

from reference_lookbehind import ReferenceLookbehind

from helpers.models import OPTIMIZERS, twin
from hf_lookbehind import Lookbehind, asam_param_groups


def alpha_settings(alpha: float | str) -> dict:
    """The settings of a parametrized alpha: a static value, or ``"adaptive"`` for adaptive
    alpha (eq. 7-8)."""
    return dict(adaptive_alpha=True) if alpha == "adaptive" else dict(alpha=alpha)


def engine_and_reference(model, optimizer_name, perturbation, engine_kwargs, reference_kwargs):
    """Engine and reference on twin models; ASAM scales only ``weight`` tensors, as the
    public ASAM code does (the engine gets it through parameter groups, the reference by name)."""
    reference_model = twin(model)
    if perturbation == "asam":
        engine_params = asam_param_groups(model)
        frozen = [p for p in model.parameters() if not p.requires_grad]
        engine_params.append({"params": frozen, "asam_scale": False})
    else:
        engine_params = model.parameters()
    engine = Lookbehind(
        OPTIMIZERS[optimizer_name](engine_params), perturbation=perturbation, **engine_kwargs
    )
    reference_base = OPTIMIZERS[optimizer_name](reference_model.parameters())
    reference = ReferenceLookbehind(
        reference_base,
        perturbation=perturbation,
        asam_scaled=["weight" in name for name, _ in reference_model.named_parameters()],
        **reference_kwargs,
    )
    return engine, reference, reference_model
