"""Host work that grows with the model: the engine's Python-level calls per parameter tensor.

On a GPU a step's cost beyond its passes is what the host does to launch them. The kernels an
outer step launches do not grow with the number of parameter tensors (``benchmark_ops.py``);
this script measures the Python work that could. It counts the calls ``cProfile`` would (Python
functions and built-in C functions, through ``sys.setprofile``) during one steady-state outer
step, without the calls inside the passes (the closure) and inside the base optimizer's own
``step``, on two MLPs with BatchNorm (the engine given ``model=``, so the BatchNorm guard runs)
and SGD with ``foreach=True``, momentum and weight decay as the base. The slope between them is
the engine's calls per parameter tensor per outer step (per call for minibatch switching);
torch's own SGD step is measured the same way, for scale.

    python scripts/benchmark_calls.py            # 440 and 1,760 parameter tensors, ~20 s
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hf_lookbehind import Lookbehind

CASES = {
    "lookbehind k=2": dict(k=2),
    "lookbehind k=2, adaptive alpha": dict(k=2, adaptive_alpha=True),
    "lookbehind k=2, switching (per call)": dict(k=2, minibatch_switching=True),
    "sam": dict(method="sam"),
}
BUDGET = 10  # calls per tensor per outer step (per call with switching)


class CallCounter:
    """Counts ``call`` and ``c_call`` profile events, each in the region it happens in: the
    engine's own work, or a region entered through :meth:`region` (the passes, the base
    optimizer's step)."""

    def __init__(self) -> None:
        self.calls: dict[str, int] = {"engine": 0}
        self.current = "engine"

    def __call__(self, frame: Any, event: str, arg: Any) -> None:
        if event in ("call", "c_call"):
            self.calls[self.current] = self.calls.get(self.current, 0) + 1

    def region(self, name: str, function: Callable[..., Any]) -> Callable[..., Any]:
        """``function``, with its calls counted under ``name``."""

        def counted(*args: Any, **kwargs: Any) -> Any:
            outer, self.current = self.current, name
            try:
                return function(*args, **kwargs)
            finally:
                self.current = outer

        return counted

    def count(self, run: Callable[[], Any]) -> dict[str, int]:
        self.calls = {"engine": 0}
        sys.setprofile(self)
        try:
            run()
        finally:
            sys.setprofile(None)
        return self.calls


def mlp(tensors: int, width: int = 4) -> nn.Sequential:
    """Blocks of Linear + BatchNorm1d + ReLU: 4 parameter tensors each."""
    layers = [
        module
        for _ in range(tensors // 4)
        for module in (nn.Linear(width, width), nn.BatchNorm1d(width), nn.ReLU())
    ]
    return nn.Sequential(*layers)


def engine_calls(tensors: int, settings: dict[str, Any]) -> tuple[float, float]:
    """(engine calls, base-optimizer calls) of one outer step (per call for switching)."""
    torch.manual_seed(0)
    model = mlp(tensors)
    base = torch.optim.SGD(
        model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4, foreach=True
    )
    counter = CallCounter()
    base.step = counter.region("base", base.step)  # type: ignore[method-assign]
    engine = Lookbehind(base, model=model, **settings)
    x, y = torch.randn(8, 4), torch.randn(8, 4)

    def closure() -> torch.Tensor:
        loss = nn.functional.mse_loss(model(x), y)
        loss.backward()
        return loss

    paused_closure = counter.region("passes", closure)
    calls = settings.get("k", 1) if settings.get("minibatch_switching") else 1
    for _ in range(2 * calls):  # warm-up: buffers allocated, caches filled
        engine.step(paused_closure)
    counted = counter.count(lambda: [engine.step(paused_closure) for _ in range(calls)])
    return counted["engine"] / calls, counted.get("base", 0) / calls


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--tensors",
        type=int,
        nargs=2,
        default=[440, 1760],
        help="parameter tensors of the two models (multiples of 4; default: %(default)s)",
    )
    args = parser.parse_args(argv)
    small, large = args.tensors
    print(f"Python-level calls per parameter tensor, slope between {small} and {large} tensors")
    print(f"{'case':40s} {'engine':>8s} {'base SGD step':>14s} {'budget':>7s}")
    for name, settings in CASES.items():
        engine_small, base_small = engine_calls(small, settings)
        engine_large, base_large = engine_calls(large, settings)
        slope = (engine_large - engine_small) / (large - small)
        base_slope = (base_large - base_small) / (large - small)
        budget = "-" if name == "sam" else f"<={BUDGET}"
        print(f"{name:40s} {slope:8.2f} {base_slope:14.2f} {budget:>7s}")


if __name__ == "__main__":
    main()
