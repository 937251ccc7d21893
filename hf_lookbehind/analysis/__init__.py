"""Analysis tools for reproducing the paper's figures: m-sharpness (eq. 5/6, Figure 3), robustness
to noisy weights (Sec. 4.4, Figure 4), training curves (Figure 10), the loss-sharpness
trade-off (Figure 1), the alpha x k sweep (Figure 7) and accuracy per gradient computation
(Table 10).

Each tool is a function here and a command-line entry point (:mod:`.cli`). Nothing here imports
``transformers`` or matplotlib at import time.
"""

from .classifier import evaluate
from .compute import (
    ComputeCurve,
    EqualPerformanceComparison,
    RunAtTarget,
    compare_at_equal_performance,
    computations_to_reach,
    metric_against_computations,
)
from .curves import Curve, TradeoffPoint, load_log_history, tradeoff_points, training_curves
from .noise import (
    NoiseRobustnessResult,
    add_weight_noise_,
    noisy_weight_robustness,
    recalibrate_batchnorm,
)
from .plotting import (
    plot_metric_against_computations,
    plot_noise_robustness,
    plot_sharpness,
    plot_sweep_heatmap,
    plot_tradeoff,
    plot_training_curves,
)
from .sharpness import SharpnessResult, m_sharpness
from .sweep import SweepGrid, collect_sweep, launch_sweep

__all__ = [
    "ComputeCurve",
    "Curve",
    "EqualPerformanceComparison",
    "NoiseRobustnessResult",
    "RunAtTarget",
    "SharpnessResult",
    "SweepGrid",
    "TradeoffPoint",
    "add_weight_noise_",
    "collect_sweep",
    "compare_at_equal_performance",
    "computations_to_reach",
    "evaluate",
    "launch_sweep",
    "load_log_history",
    "m_sharpness",
    "metric_against_computations",
    "noisy_weight_robustness",
    "plot_metric_against_computations",
    "plot_noise_robustness",
    "plot_sharpness",
    "plot_sweep_heatmap",
    "plot_tradeoff",
    "plot_training_curves",
    "recalibrate_batchnorm",
    "tradeoff_points",
    "training_curves",
]
