"""Which Lookbehind flags a ``--lookbehind_method`` does not read: a recipe that sets them by
default, or a benchmark that runs several methods from one command line, leaves them unset for
that method (the Trainer refuses a setting that would have no effect)."""

from __future__ import annotations

import dataclasses

from hf_lookbehind import LookbehindConfig, LookbehindSettings

# The flags the base optimizer alone (``--lookbehind_method none``) does not read.
ENGINE_FLAGS = frozenset(
    flag.name
    for flag in dataclasses.fields(LookbehindConfig)
    if flag.name
    not in (
        "lookbehind_method",
        "decay_all_parameters",
        "lookbehind_start_epoch",
        "lookbehind_end_epoch",
    )
)


def unread_flags(method: str, adaptive_alpha: bool = False) -> frozenset[str]:
    """With ``none`` (the base optimizer alone) every Lookbehind flag; otherwise alpha without a
    slow-weight step or with ``adaptive_alpha`` (eq. 7-8 replaces it), adaptive alpha, its scope
    and minibatch switching outside Lookbehind, and k with SAM (one ascent per step)."""
    if method == "none":
        return ENGINE_FLAGS
    unread = set()
    if LookbehindSettings(method=method).alpha is None or adaptive_alpha:
        unread.add("lookbehind_alpha")
    if method != "lookbehind":
        unread.update(("lookbehind_adaptive_alpha", "adaptive_alpha_scope", "minibatch_switching"))
    if method == "sam":
        unread.add("lookbehind_k")
    return frozenset(unread)
