"""The engine: :class:`Lookbehind`, a ``torch.optim.Optimizer`` around any base optimizer, with
its setup (:class:`LookbehindSettings`) and the ascent steps of the SAM family. Needs only torch.

Modules, by job: ``settings`` (the validated setup), ``optimizer`` (the public class),
``schedules`` (each method's step as its line of Algorithm 1), ``step`` (the operations of one
step), ``undo`` (what an interrupted step puts back), ``checkpoint`` (the state dict),
``hyperparameters`` (rho and alpha in the parameter groups), ``layout`` (per-tensor work
prepared once), ``perturbation`` and ``alpha`` (eq. 3-4 and 7-8), ``multi_tensor``,
``sharding``, ``distributed`` and ``batchnorm`` (kernels, FSDP2, DDP and running statistics).
"""

from .alpha import adaptive_alpha
from .checkpoint import RUN_STATE, saved_record
from .diagnostics import BufferFootprint, LookbehindStats
from .optimizer import Lookbehind
from .param_groups import asam_param_groups
from .perturbation import ASAM, NORM_EPS, SAM, FisherSAM, Perturbation
from .settings import METHODS, LookbehindSettings, refuse_schedule_free
from .step import Closure

__all__ = [
    "ASAM",
    "METHODS",
    "NORM_EPS",
    "RUN_STATE",
    "SAM",
    "BufferFootprint",
    "Closure",
    "FisherSAM",
    "Lookbehind",
    "LookbehindSettings",
    "LookbehindStats",
    "Perturbation",
    "adaptive_alpha",
    "asam_param_groups",
    "refuse_schedule_free",
    "saved_record",
]
