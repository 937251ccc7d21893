"""Which Lookbehind flags a ``--lookbehind_method`` does not read: a recipe that sets them by
default, or a benchmark that runs several methods from one command line, leaves them unset for
that method (the Trainer refuses a setting that would have no effect)."""

from __future__ import annotations

from hf_lookbehind.settings import ALPHA_METHODS
from hf_lookbehind.training_args import ENGINE_FLAG_DEFAULTS, GIVEN_FLAGS


def unread_flags(method: str, adaptive_alpha: bool = False) -> frozenset[str]:
    """With ``none`` (the base optimizer alone) every Lookbehind flag; otherwise alpha without a
    slow-weight step or with ``adaptive_alpha`` (eq. 7-8 replaces it), adaptive alpha, its scope
    and minibatch switching outside Lookbehind, and k with SAM (one ascent per step)."""
    if method == "none":
        return frozenset({*GIVEN_FLAGS, *ENGINE_FLAG_DEFAULTS})
    unread = set()
    if method not in ALPHA_METHODS or adaptive_alpha:
        unread.add("lookbehind_alpha")
    if method != "lookbehind":
        unread.update(("lookbehind_adaptive_alpha", "adaptive_alpha_scope", "minibatch_switching"))
    if method == "sam":
        unread.add("lookbehind_k")
    return frozenset(unread)
