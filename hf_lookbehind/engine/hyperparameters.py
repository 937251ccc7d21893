"""Hyper-parameters in the parameter groups, as ``torch.optim`` keeps ``lr``: ``rho``, ``alpha``
and the adaptive-alpha switch are entries of every group (``lookbehind_rho``,
``lookbehind_alpha``, ``lookbehind_adaptive_alpha``), with the setup's values as defaults, so a
scheduler or a training loop changes them between steps and the next step uses them.

Per group: with ``rho_g`` the radius of group g, the ascent is ``eps_g = rho_g d_g / ||d||``,
the norm still that of the whole model, so equal values give eq. 3/4 and a group with
``rho_g = 0`` is not perturbed; ``alpha_g`` is the step size of the group's slow weights. The
adaptive switch must be the same in every group.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .settings import LookbehindSettings, check_alpha, check_nonnegative

RHO = "lookbehind_rho"
ALPHA = "lookbehind_alpha"
ADAPTIVE_ALPHA = "lookbehind_adaptive_alpha"
# The setting each group entry gives a value to.
GROUP_SETTINGS = {RHO: "rho", ALPHA: "alpha", ADAPTIVE_ALPHA: "adaptive_alpha"}
GROUP_KEYS = {name: key for key, name in GROUP_SETTINGS.items()}


@dataclass(frozen=True)
class GroupValues:
    """The groups' hyper-parameters for one step: rho and the static alpha as one value, or one
    per parameter (in layout order) where the groups differ; ``None`` where the method reads
    none; and the adaptive switch."""

    rho: float | list[float] | None = None
    alpha: float | list[float] | None = None
    adaptive: bool = False


def check_group(where: str, group: dict[str, Any], settings: LookbehindSettings) -> None:
    """Refuse a group's hyper-parameter that the method does not read, or a bad value."""
    for key, name in GROUP_SETTINGS.items():
        if key in group and getattr(settings, name) is None:
            raise ValueError(
                f"{where} sets {key}={group[key]!r}, which method={settings.method!r} "
                f"with perturbation={settings.perturbation!r} does not read; remove it"
            )
    if RHO in group:
        check_nonnegative(f"{where}[{RHO!r}]", group[RHO])
    if ALPHA in group:
        check_alpha(f"{where}[{ALPHA!r}]", group[ALPHA])
    switch = group.get(ADAPTIVE_ALPHA, False)
    if not isinstance(switch, bool):
        raise ValueError(f"{where}[{ADAPTIVE_ALPHA!r}] must be True or False, got {switch!r}")
    if switch and settings.method != "lookbehind":
        raise ValueError(
            f"{where}[{ADAPTIVE_ALPHA!r}] is True, but adaptive alpha is defined for "
            f"method='lookbehind', not {settings.method!r}"
        )


def fill_groups(
    groups: Iterable[dict[str, Any]], settings: LookbehindSettings, overwrite: Iterable[str] = ()
) -> None:
    """Give every group the hyper-parameters the method reads (the setting's value where a
    group has none, or for the keys in ``overwrite``), and drop those it does not read."""
    overwrite = set(overwrite)
    for group in groups:
        for key, name in GROUP_SETTINGS.items():
            value = getattr(settings, name)
            if value is None:
                group.pop(key, None)
            elif key in overwrite or key not in group:
                group[key] = value


def read_groups(
    groups: Sequence[dict[str, Any]], settings: LookbehindSettings, group_of: Sequence[int]
) -> GroupValues:
    """Check the groups' hyper-parameters and read them for a step (``group_of``: each
    parameter's group): a bad value, or one the method does not read, fails here, before the
    step does any work. A group without one (added to the base optimizer directly) gets the
    setting's value."""
    for index, group in enumerate(groups):
        check_group(f"param_groups[{index}]", group, settings)
    fill_groups(groups, settings)
    switches = {group[ADAPTIVE_ALPHA] for group in groups if ADAPTIVE_ALPHA in group}
    if len(switches) > 1:
        raise ValueError(
            f"{ADAPTIVE_ALPHA!r} differs between the parameter groups: one slow-weight update "
            "takes adaptive alpha (eq. 7-8) for all of them or for none"
        )
    return GroupValues(
        rho=_per_parameter([group.get(RHO) for group in groups], group_of),
        alpha=_per_parameter([group.get(ALPHA) for group in groups], group_of),
        adaptive=bool(switches and switches.pop()),
    )


def _per_parameter(values: list[Any], group_of: Sequence[int]) -> float | list[float] | None:
    """One value when every group has the same (the usual case), else one per parameter."""
    if not values or values[0] is None:
        return None
    floats = [float(value) for value in values]
    if len(set(floats)) == 1:
        return floats[0]
    return [floats[group] for group in group_of]
