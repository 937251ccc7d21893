"""Validation of a Lookbehind setup: every bad value fails at construction time with a message
that says what was wrong and what is allowed."""

from __future__ import annotations

from typing import Any

from .alpha import ADAPTIVE_SCOPES
from .batchnorm import BATCHNORM_UPDATES
from .perturbation import PERTURBATIONS

METHODS = ("lookbehind", "sam", "multistep", "multistep_avg", "lookahead")


def _check_fraction(alpha: float | str, method: str) -> None:
    if alpha == "adaptive":
        if method != "lookbehind":
            raise ValueError(f"alpha='adaptive' is defined for method='lookbehind', not {method!r}")
        return
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not 0.0 < alpha <= 1.0:
        raise ValueError(f"alpha must be a number in (0, 1] or 'adaptive', got {alpha!r}")


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def _check_nonnegative(name: str, value: Any) -> None:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0.0 <= value < float("inf")
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")


def validate_settings(
    *,
    method: str,
    k: int | None,
    alpha: float | str,
    rho: float,
    perturbation: str,
    asam_eta: float,
    adaptive_scope: str,
    minibatch_switching: bool,
    batchnorm_update: str,
    max_grad_norm: float | None = None,
    micro_batch_ascent: bool = False,
) -> int:
    """Check a Lookbehind setup; raise ``ValueError`` saying what is wrong and what is allowed.
    Returns ``k`` with its default filled in (2, or 1 for sam)."""
    _check_choice("method", method, METHODS)
    if k is None:
        k = 1 if method == "sam" else 2
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if method == "sam" and k != 1:
        raise ValueError(f"method='sam' takes k=1, got k={k}; use method='multistep'")
    _check_fraction(alpha, method)
    _check_nonnegative("rho", rho)
    _check_nonnegative("asam_eta", asam_eta)
    _check_choice("perturbation", perturbation, PERTURBATIONS)
    if perturbation == "none" and method != "lookahead":
        raise ValueError(f"perturbation='none' is for method='lookahead', not {method!r}")
    _check_choice("adaptive_scope", adaptive_scope, ADAPTIVE_SCOPES)
    _check_choice("batchnorm_update", batchnorm_update, BATCHNORM_UPDATES)
    if minibatch_switching and method != "lookbehind":
        raise ValueError(
            f"minibatch_switching is a lookbehind mode; method={method!r} has no such mode "
            "(lookahead always takes one minibatch per inner step)"
        )
    if micro_batch_ascent and (method not in ("sam", "lookbehind") or minibatch_switching):
        raise ValueError(
            "micro_batch_ascent (m-SAM) is defined for method='sam' and for method='lookbehind' "
            f"in same-batch mode, not method={method!r}"
            + (" with minibatch_switching" if minibatch_switching else "")
        )
    if max_grad_norm is not None:
        _check_nonnegative("max_grad_norm", max_grad_norm)
        if max_grad_norm == 0:
            raise ValueError("max_grad_norm must be > 0, or None for no clipping")
    return k
