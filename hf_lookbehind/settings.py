"""Validation of a Lookbehind setup: every bad value fails at construction time with a message
that says what was wrong and what is allowed.

A setting left at ``None`` is "not given" and takes its default where the method reads it. A
value other than the default, given for a method that does not read it (``alpha`` for ``sam``,
``asam_eta`` for SAM's ascent, ``adaptive_scope`` with a static alpha, ``rho`` without a
perturbation), is refused, so that no value is silently ignored.
"""

from __future__ import annotations

import warnings
from typing import Any

from .alpha import ADAPTIVE_SCOPES
from .batchnorm import BATCHNORM_UPDATES
from .distributed import ASCENT_SYNCS
from .perturbation import PERTURBATIONS, Perturbation

METHODS = ("lookbehind", "sam", "multistep", "multistep_avg", "lookahead")
# Methods with a slow-weight step ``S <- S + alpha (F_k - S)``.
ALPHA_METHODS = ("lookbehind", "lookahead")
DEFAULT_ALPHA = 0.5
DEFAULT_RHO = 0.05
DEFAULT_ASAM_ETA = 0.01
DEFAULT_ADAPTIVE_SCOPE = "per_tensor"


SCHEDULE_FREE = (
    "schedule-free optimizers cannot be Lookbehind's base optimizer: they keep the weights to "
    "evaluate (their average x) apart from the point where gradients are taken (y), and switch "
    "the parameters between the two with train()/eval(), while the engine keeps the slow "
    "weights in the parameters between steps and moves the fast and perturbed weights through "
    "them, so every slow-weight update would cut the optimizer's y and its average apart. Use "
    "a plain optimizer (SGD, AdamW) with a learning-rate schedule, or train with the "
    "schedule-free optimizer alone (--lookbehind_method none in the Trainer)"
)


def refuse_schedule_free(optimizer: Any) -> None:
    """Refuse a schedule-free base optimizer (one with ``train()``/``eval()`` modes), also
    inside a wrapper that keeps it as ``.optimizer`` (accelerate's)."""
    base = getattr(optimizer, "optimizer", optimizer)
    if callable(getattr(base, "train", None)) and callable(getattr(base, "eval", None)):
        raise ValueError(f"{type(base).__name__}: {SCHEDULE_FREE}")


ADAPTIVE_SPELLING = (
    "alpha='adaptive' (--lookbehind_alpha adaptive) is deprecated: pass adaptive_alpha=True "
    "(--lookbehind_adaptive_alpha) and leave alpha for the static step size"
)


def parse_alpha(value: float | str | None) -> float | str | None:
    """The one rule for alpha, in the engine and on the command line: ``None`` (not given), a
    number in (0, 1] (a number, or its text), or the deprecated spelling ``"adaptive"`` (any
    letter case) of ``adaptive_alpha=True``, returned as ``"adaptive"``."""
    if value is None:
        return None
    if isinstance(value, str):
        if value.strip().lower() == "adaptive":
            return "adaptive"
        try:
            value = float(value)
        except ValueError:
            raise ValueError(f"alpha must be a number in (0, 1], got {value!r}") from None
    return check_alpha_value("alpha", value)


def _check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(allowed)}")


def check_nonnegative(name: str, value: Any) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or not 0.0 <= value < float("inf")
    ):
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _refuse_unread(name: str, value: Any, default: Any, reason: str) -> None:
    """A value other than the default, given where it is not read, is refused: the user meant
    something that would not happen. The default itself changes nothing and passes."""
    if value is not None and value != default:
        raise ValueError(f"{name}={value!r} has no effect: {reason}; leave it unset")


def check_alpha_value(name: str, value: Any) -> float:
    """A static alpha: a number in (0, 1] (``name`` says where it came from)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def applicable_settings(settings: dict[str, Any]) -> dict[str, Any]:
    """``settings`` with every entry that its method, perturbation and alpha do not read set to
    ``None``: what carries over when :meth:`Lookbehind.reconfigure` changes the method."""
    kept = dict(settings)
    method, perturbation = kept.get("method"), kept.get("perturbation", "sam")
    if method not in ALPHA_METHODS:
        kept["alpha"] = kept["adaptive_alpha"] = None
    if method == "lookahead" and perturbation == "none":
        kept["rho"] = None
    if perturbation != "asam":
        kept["asam_eta"] = None
    if not kept.get("adaptive_alpha"):
        kept["adaptive_scope"] = None
    return kept


def validate_settings(
    *,
    method: str,
    k: int | None = None,
    alpha: float | str | None = None,
    adaptive_alpha: bool | None = None,
    rho: float | None = None,
    perturbation: str | Perturbation = "sam",
    asam_eta: float | None = None,
    adaptive_scope: str | None = None,
    minibatch_switching: bool = False,
    batchnorm_update: str | None = None,
    max_grad_norm: float | None = None,
    micro_batch_ascent: bool = False,
    ascent_sync: str = "global",
) -> dict[str, Any]:
    """Check a Lookbehind setup; raise ``ValueError`` saying what is wrong and what is allowed.

    Returns every setting with its default filled in where the method reads it (k: 2, or 1 for
    sam; alpha 0.5 and adaptive_alpha False; rho 0.05; asam_eta 0.01; adaptive_scope
    per_tensor) and ``None`` where it does not. ``alpha="adaptive"`` is the deprecated
    spelling of ``adaptive_alpha=True`` (a ``FutureWarning``)."""
    _check_choice("method", method, METHODS)
    if k is None:
        k = 1 if method == "sam" else 2
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if method == "sam" and k != 1:
        raise ValueError(f"method='sam' takes k=1, got k={k}; use method='multistep'")

    # Every given value is checked first, whatever the method; then whether the method reads it.
    alpha = parse_alpha(alpha)
    if alpha == "adaptive":
        warnings.warn(ADAPTIVE_SPELLING, FutureWarning, stacklevel=3)
        if adaptive_alpha is False:
            raise ValueError("alpha='adaptive' contradicts adaptive_alpha=False; give one of them")
        alpha, adaptive_alpha = None, True
    if adaptive_alpha is not None and not isinstance(adaptive_alpha, bool):
        raise ValueError(f"adaptive_alpha must be True or False, got {adaptive_alpha!r}")
    if not isinstance(perturbation, Perturbation):
        _check_choice("perturbation", perturbation, PERTURBATIONS)
    if rho is not None:
        rho = check_nonnegative("rho", rho)
    if asam_eta is not None:
        asam_eta = check_nonnegative("asam_eta", asam_eta)
    if adaptive_scope is not None:
        _check_choice("adaptive_scope", adaptive_scope, ADAPTIVE_SCOPES)

    if adaptive_alpha and method != "lookbehind":
        raise ValueError(f"adaptive alpha is defined for method='lookbehind', not {method!r}")
    if method in ALPHA_METHODS:
        if adaptive_alpha:
            _refuse_unread("alpha", alpha, DEFAULT_ALPHA, "adaptive alpha (eq. 7-8) replaces it")
        alpha = DEFAULT_ALPHA if alpha is None else alpha
        adaptive_alpha = bool(adaptive_alpha)
    else:
        _refuse_unread("alpha", alpha, DEFAULT_ALPHA, f"method={method!r} has no slow-weight step")
        alpha = adaptive_alpha = None
    if perturbation == "none" and method != "lookahead":
        raise ValueError(f"perturbation='none' is for method='lookahead', not {method!r}")
    if perturbation == "none":
        _refuse_unread("rho", rho, DEFAULT_RHO, "perturbation='none' takes no ascent step")
        rho = None
    elif rho is None:
        rho = DEFAULT_RHO
    if perturbation == "asam":
        asam_eta = DEFAULT_ASAM_ETA if asam_eta is None else asam_eta
    else:
        _refuse_unread(
            "asam_eta", asam_eta, DEFAULT_ASAM_ETA, f"perturbation={perturbation!r} is not ASAM"
        )
        asam_eta = None
    if adaptive_alpha:
        adaptive_scope = DEFAULT_ADAPTIVE_SCOPE if adaptive_scope is None else adaptive_scope
    else:
        _refuse_unread(
            "adaptive_scope", adaptive_scope, DEFAULT_ADAPTIVE_SCOPE, "alpha is not adaptive"
        )
        adaptive_scope = None

    if batchnorm_update is not None:
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
    _check_choice("ascent_sync", ascent_sync, ASCENT_SYNCS)
    if ascent_sync == "per_device" and perturbation == "none":
        _refuse_unread("ascent_sync", ascent_sync, "global", "perturbation='none' takes no ascent")
    if ascent_sync == "per_device" and micro_batch_ascent:
        _refuse_unread(
            "ascent_sync",
            ascent_sync,
            "global",
            "micro_batch_ascent perturbs every micro-batch with its own gradient already",
        )
    if max_grad_norm is not None:
        max_grad_norm = check_nonnegative("max_grad_norm", max_grad_norm)
        if max_grad_norm == 0:
            raise ValueError("max_grad_norm must be > 0, or None for no clipping")
    return {
        "method": method,
        "k": k,
        "alpha": alpha,
        "adaptive_alpha": adaptive_alpha,
        "rho": rho,
        "perturbation": perturbation,
        "asam_eta": asam_eta,
        "adaptive_scope": adaptive_scope,
        "minibatch_switching": bool(minibatch_switching),
        "batchnorm_update": batchnorm_update,
        "max_grad_norm": max_grad_norm,
        "micro_batch_ascent": bool(micro_batch_ascent),
        "ascent_sync": ascent_sync,
    }
