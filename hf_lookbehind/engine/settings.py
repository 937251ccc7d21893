"""One Lookbehind setup as one validated, immutable value: :class:`LookbehindSettings`.

Every bad value fails when the value is built, with a message that says what was wrong and what
is allowed. A setting left at ``None`` is "not given" and takes its default where the method
reads it; a value other than the default, given for a method that does not read it (``alpha``
for ``sam``, ``asam_eta`` for SAM's ascent, ``adaptive_alpha_scope`` with a static alpha, ``rho``
without a perturbation), is refused, so that no value is silently ignored. The engine's keyword
arguments (:meth:`LookbehindSettings.as_kwargs`), the Trainer's flags and the record a
checkpoint keeps (:meth:`LookbehindSettings.record`) are views of it.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

from .alpha import ADAPTIVE_SCOPES
from .batchnorm import BATCHNORM_UPDATES
from .distributed import ASCENT_SYNCS
from .perturbation import PERTURBATIONS, Perturbation, describe_perturbation

METHODS = ("lookbehind", "sam", "multistep", "multistep_avg", "lookahead")
# Methods with a slow-weight step ``S <- S + alpha (F_k - S)``.
ALPHA_METHODS = ("lookbehind", "lookahead")
DEFAULT_ALPHA = 0.5
DEFAULT_RHO = 0.05
DEFAULT_ASAM_ETA = 0.01
DEFAULT_ADAPTIVE_SCOPE = "per_tensor"
# What a checkpoint must agree on to be resumed between outer steps (mid-cycle: everything).
FIXED_BETWEEN_STEPS = (
    "method",
    "k",
    "minibatch_switching",
    "perturbation",
    "adaptive_alpha_scope",
)

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


def check_choice(name: str, value: Any, allowed: tuple[str, ...]) -> None:
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


def check_alpha(name: str, value: Any) -> float:
    """A static alpha: a number in (0, 1] (``name`` says where it came from)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def _refuse_unread(name: str, value: Any, default: Any, reason: str) -> None:
    """A value other than the default, given where it is not read, is refused: the user meant
    something that would not happen. The default itself changes nothing and passes."""
    if value is not None and value != default:
        raise ValueError(f"{name}={value!r} has no effect: {reason}; leave it unset")


@dataclass(frozen=True)
class LookbehindSettings:
    """The setup of :class:`~hf_lookbehind.Lookbehind`, validated when built; the fields the
    method does not read hold ``None``.

    Attributes:
        method: ``lookbehind`` (Algorithm 1), ``sam``, ``multistep``, ``multistep_avg`` or
            ``lookahead``.
        k: inner steps per outer step (ascent steps for multistep); default 2, and 1 for sam.
        alpha: slow-weight step size in (0, 1] (default 0.5); lookbehind and lookahead only.
        adaptive_alpha: alpha by eq. 7-8 at every slow-weight update (lookbehind only).
        rho: neighbourhood radius of the ascent step (default 0.05).
        perturbation: ``sam`` (eq. 3), ``asam`` (eq. 4), ``fisher`` (Fisher-SAM), ``none``
            (lookahead only), or a :class:`~hf_lookbehind.Perturbation` of your own.
        asam_eta: eta of ASAM's ``T = |w| + eta`` (default 0.01; ASAM only).
        adaptive_alpha_scope: ``per_tensor`` (default; one angle per tensor, the public code)
            or ``global`` (one angle, eq. 8); adaptive alpha only.
        minibatch_switching: a new minibatch per inner step (Sec. 6.2); lookbehind only.
        batchnorm_update: ``first_pass`` (only the pass at the weights held on entry updates
            running statistics; the default with a model) or ``every_pass`` (the public code).
        max_grad_norm: clip the global gradient norm of every descent update (never the
            ascent); ``None`` does not clip.
        ascent_sync: whose gradient each ascent follows: ``global`` (the batch's, averaged over
            the processes), ``per_device`` (each process its own under DDP: m-SAM with m the
            per-process batch; the closure runs without all-reduce) or ``per_micro_batch``
            (m-SAM, Table 9: :meth:`~hf_lookbehind.Lookbehind.step_micro_batches` takes one
            closure per micro-batch, each perturbed with its own gradient; sam and same-batch
            lookbehind).
    """

    method: str = "lookbehind"
    k: int | None = None
    alpha: float | None = None
    adaptive_alpha: bool | None = None
    rho: float | None = None
    perturbation: str | Perturbation = "sam"
    asam_eta: float | None = None
    adaptive_alpha_scope: str | None = None
    minibatch_switching: bool = False
    batchnorm_update: str | None = None
    max_grad_norm: float | None = None
    ascent_sync: str = "global"

    def __post_init__(self) -> None:
        for name, value in _resolved(self).items():
            object.__setattr__(self, name, value)

    def as_kwargs(self) -> dict[str, Any]:
        """The keyword arguments of :class:`~hf_lookbehind.Lookbehind` this value holds."""
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    def changed(self, **changes: Any) -> LookbehindSettings:
        """Another setup: ``changes`` applied, every other setting kept where the new method
        reads it (``k`` falls back to its default; a static ``alpha`` given ends adaptive
        alpha, ``adaptive_alpha=True`` given replaces the static alpha)."""
        unknown = set(changes) - set(self.as_kwargs())
        if unknown:
            raise TypeError(
                f"unknown settings {sorted(unknown)}; allowed: {sorted(self.as_kwargs())}"
            )
        carried = {**self.as_kwargs(), "k": None, **changes}
        method, perturbation = carried["method"], carried["perturbation"]
        if method not in ALPHA_METHODS:
            carried["alpha"] = carried["adaptive_alpha"] = None
        if method == "lookahead" and perturbation == "none":
            carried["rho"] = None
        if perturbation != "asam":
            carried["asam_eta"] = None
        if "alpha" in changes and "adaptive_alpha" not in changes:
            carried["adaptive_alpha"] = None
        if changes.get("adaptive_alpha"):
            carried["alpha"] = changes.get("alpha")
        if not carried["adaptive_alpha"]:
            carried["adaptive_alpha_scope"] = None
        return LookbehindSettings(**{**carried, **changes})

    def clipped(self, max_grad_norm: float | None) -> LookbehindSettings:
        """The same setup with ``max_grad_norm`` (0 or None: no clipping); only that value is
        checked."""
        clipped = copy.copy(self)
        object.__setattr__(clipped, "max_grad_norm", _check_clipping(max_grad_norm or None))
        return clipped

    @property
    def micro_batch_ascent(self) -> bool:
        """m-SAM: every micro-batch is perturbed with its own gradient."""
        return self.ascent_sync == "per_micro_batch"

    @property
    def cycles(self) -> bool:
        """Whether an outer step spreads over k calls of ``step()`` (a cycle that a checkpoint
        may cut): minibatch switching and lookahead."""
        return self.method == "lookahead" or self.minibatch_switching

    def record(self) -> dict[str, Any]:
        """What a checkpoint records of the setup: the settings, with the perturbation
        described with its hyper-parameters (``"ASAM(eta=0.01)"``) in place of ``asam_eta``."""
        record = self.as_kwargs()
        record["perturbation"] = describe_perturbation(
            record["perturbation"], record.pop("asam_eta")
        )
        return record

    def refused_changes(self, saved: dict[str, Any], *, mid_cycle: bool) -> dict[str, tuple]:
        """The settings of ``saved`` (a :meth:`record`) that differ from this setup where a
        resumed run may not change them: mid-cycle all, between outer steps those of
        :data:`FIXED_BETWEEN_STEPS` (``adaptive_alpha_scope`` may follow the adaptive switch)."""
        return {
            key: (old, new)
            for key, (old, new) in self.changes_from(saved).items()
            if mid_cycle or _fixed_between_steps(key, old, new)
        }

    def changes_from(self, saved: dict[str, Any]) -> dict[str, tuple]:
        """``{setting: (saved value, this value)}`` for every setting that differs."""
        return {
            key: (saved[key], value)
            for key, value in self.record().items()
            if key in saved and saved[key] != value
        }


def _fixed_between_steps(key: str, old: Any, new: Any) -> bool:
    """Whether a resumed run may not change ``key`` from ``old`` to ``new`` between outer steps
    (the adaptive scope follows the adaptive switch, which may change; m-SAM keeps other
    buffers than the other ascents)."""
    if key == "adaptive_alpha_scope":
        return None not in (old, new)
    if key == "ascent_sync":
        return "per_micro_batch" in (old, new)
    return key in FIXED_BETWEEN_STEPS


def _check_clipping(max_grad_norm: Any) -> float | None:
    if max_grad_norm is None:
        return None
    max_grad_norm = check_nonnegative("max_grad_norm", max_grad_norm)
    if max_grad_norm == 0:
        raise ValueError("max_grad_norm must be > 0, or None for no clipping")
    return max_grad_norm


def _resolved(s: LookbehindSettings) -> dict[str, Any]:
    """Check every value of ``s`` and fill in the defaults where the method reads them."""
    method = s.method
    check_choice("method", method, METHODS)
    k = s.k
    if k is None:
        k = 1 if method == "sam" else 2
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an integer >= 1, got {k!r}")
    if method == "sam" and k != 1:
        raise ValueError(f"method='sam' takes k=1, got k={k}; use method='multistep'")

    # Every given value is checked first, whatever the method; then whether the method reads it.
    alpha, adaptive_alpha = s.alpha, s.adaptive_alpha
    if alpha is not None:
        alpha = check_alpha("alpha", alpha)
    if adaptive_alpha is not None and not isinstance(adaptive_alpha, bool):
        raise ValueError(f"adaptive_alpha must be True or False, got {adaptive_alpha!r}")
    perturbation = s.perturbation
    if not isinstance(perturbation, Perturbation):
        check_choice("perturbation", perturbation, PERTURBATIONS)
    rho = None if s.rho is None else check_nonnegative("rho", s.rho)
    asam_eta = None if s.asam_eta is None else check_nonnegative("asam_eta", s.asam_eta)
    adaptive_scope = s.adaptive_alpha_scope
    if adaptive_scope is not None:
        check_choice("adaptive_alpha_scope", adaptive_scope, ADAPTIVE_SCOPES)

    if adaptive_alpha and method != "lookbehind":
        raise ValueError(f"adaptive_alpha=True is defined for method='lookbehind', not {method!r}")
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
            "adaptive_alpha_scope",
            adaptive_scope,
            DEFAULT_ADAPTIVE_SCOPE,
            "adaptive_alpha is False",
        )
        adaptive_scope = None

    if s.batchnorm_update is not None:
        check_choice("batchnorm_update", s.batchnorm_update, BATCHNORM_UPDATES)
    switching, sync = s.minibatch_switching, s.ascent_sync
    if not isinstance(switching, bool):
        raise ValueError(f"minibatch_switching must be True or False, got {switching!r}")
    if switching and method != "lookbehind":
        raise ValueError(
            f"minibatch_switching is a lookbehind mode; method={method!r} has no such mode "
            "(lookahead always takes one minibatch per inner step)"
        )
    check_choice("ascent_sync", sync, ASCENT_SYNCS)
    if sync == "per_micro_batch" and (method not in ("sam", "lookbehind") or switching):
        raise ValueError(
            "ascent_sync='per_micro_batch' (m-SAM) is defined for method='sam' and for "
            f"method='lookbehind' in same-batch mode, not method={method!r}"
            + (" with minibatch_switching" if switching else "")
        )
    if sync == "per_device" and perturbation == "none":
        _refuse_unread("ascent_sync", sync, "global", "perturbation='none' takes no ascent")
    return {
        "k": k,
        "alpha": alpha,
        "adaptive_alpha": adaptive_alpha,
        "rho": rho,
        "asam_eta": asam_eta,
        "adaptive_alpha_scope": adaptive_scope,
        "max_grad_norm": _check_clipping(s.max_grad_norm),
    }
