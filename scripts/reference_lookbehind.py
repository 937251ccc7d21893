"""A literal, slow transcription of Algorithm 1 and the baselines, written the way the paper's
public code runs them: 2 forward/backward passes per inner step (2k per outer step), plain
per-parameter loops, fresh copies of the weights at every inner step.

It exists to check :class:`hf_lookbehind.Lookbehind` against (the test suite, in float64) and
to time against (``scripts/benchmark_step.py``). It shares no code with the engine.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

Closure = Callable[[], torch.Tensor]


class ReferenceLookbehind:
    """Same settings as :class:`hf_lookbehind.Lookbehind`; ``step`` takes one closure per inner
    step (the same closure k times for same-batch mode). Adaptive alpha (eq. 7-8) is
    ``adaptive_alpha=True``.

    ``asam_scaled`` gives, per parameter of ``base_optimizer``, whether ASAM rescales it
    (default: all). BatchNorm statistics are updated by every pass, as in the public code.
    """

    def __init__(
        self,
        base_optimizer: torch.optim.Optimizer,
        *,
        method: str = "lookbehind",
        k: int = 2,
        alpha: float = 0.5,
        adaptive_alpha: bool = False,
        rho: float = 0.05,
        perturbation: str = "sam",
        asam_eta: float = 0.01,
        adaptive_alpha_scope: str = "per_tensor",
        asam_scaled: Sequence[bool] | None = None,
    ) -> None:
        self.optimizer = base_optimizer
        self.params = [p for g in base_optimizer.param_groups for p in g["params"]]
        self.method, self.k, self.alpha, self.rho = method, k, alpha, rho
        self.adaptive = adaptive_alpha
        self.perturbation, self.eta, self.scope = perturbation, asam_eta, adaptive_alpha_scope
        self.scaled = list(asam_scaled) if asam_scaled is not None else [True] * len(self.params)

    # --- the ascent step of the public SAM/ASAM code -----------------------------------------
    @torch.no_grad()
    def _ascent(self) -> None:
        if self.perturbation == "none":
            return
        items = [(p, s) for p, s in zip(self.params, self.scaled) if p.grad is not None]
        grads = []
        for p, scaled in items:
            g = p.grad.clone()
            if self.perturbation == "asam" and scaled:
                g = g * (p.abs() + self.eta)
            grads.append(g)
        norm = torch.norm(torch.stack([torch.norm(g, p=2) for g in grads]), p=2) + 1e-16
        for (p, scaled), g in zip(items, grads):
            if self.perturbation == "asam" and scaled:
                g = g * (p.abs() + self.eta)
            p.add_(g * (self.rho / norm))

    def _grad_at_current_weights(self, closure: Closure) -> torch.Tensor:
        self.optimizer.zero_grad(set_to_none=True)
        with torch.enable_grad():
            loss = closure()
        return loss

    @torch.no_grad()
    def _base_step_on(self, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """Load ``weights`` into the model, take a base step with the current gradients,
        return the result, and put the model's previous weights back."""
        backup = [p.clone() for p in self.params]
        for p, w in zip(self.params, weights):
            p.copy_(w)
        self.optimizer.step()
        result = [p.clone() for p in self.params]
        for p, b in zip(self.params, backup):
            p.copy_(b)
        return result

    # --- the methods ---------------------------------------------------------------------------
    def step(self, closures: Sequence[Closure]) -> None:
        if len(closures) != self.k:
            raise ValueError("one closure per inner step")
        if self.method == "lookbehind":
            self._lookbehind(closures)
        elif self.method == "lookahead":
            self._lookahead(closures)
        else:
            self._multistep(closures)

    def _lookbehind(self, closures: Sequence[Closure]) -> None:
        slow = [p.detach().clone() for p in self.params]
        fast = [p.detach().clone() for p in self.params]
        first_fast = None
        for i, closure in enumerate(closures):
            self._grad_at_current_weights(closure)  # at P_{i-1}
            self._ascent()  # P_i
            self._grad_at_current_weights(closure)  # at P_i
            fast = self._base_step_on(fast)
            if i == 0:
                first_fast = [f.clone() for f in fast]
        self._interpolate(slow, fast, first_fast)

    def _lookahead(self, closures: Sequence[Closure]) -> None:
        slow = [p.detach().clone() for p in self.params]
        for closure in closures:
            self._grad_at_current_weights(closure)
            if self.perturbation != "none":
                unperturbed = [p.detach().clone() for p in self.params]
                self._ascent()
                self._grad_at_current_weights(closure)
                with torch.no_grad():
                    for p, w in zip(self.params, unperturbed):
                        p.copy_(w)
            with torch.no_grad():
                self.optimizer.step()
        fast = [p.detach().clone() for p in self.params]
        self._interpolate(slow, fast, None)

    def _multistep(self, closures: Sequence[Closure]) -> None:
        slow = [p.detach().clone() for p in self.params]
        descent_grads = []
        for closure in closures:
            self._grad_at_current_weights(closure)
            self._ascent()
            self._grad_at_current_weights(closure)
            descent_grads.append([None if p.grad is None else p.grad.clone() for p in self.params])
        with torch.no_grad():
            for j, (p, s) in enumerate(zip(self.params, slow)):
                p.copy_(s)
                if self.method == "multistep_avg" and p.grad is not None:
                    p.grad.copy_(sum(g[j] for g in descent_grads) / self.k)
            self.optimizer.step()

    def step_micro_batches(self, micro_closures: Sequence[Closure]) -> None:
        """m-SAM and Lookbehind-m-SAM (Table 9) on one batch given as micro-batches, one
        closure each: every micro-batch keeps its own perturbed weights, and inner step i
        descends with the sum of the micro-batch gradients, each at its own ``P_{j,i}``."""
        slow = [p.detach().clone() for p in self.params]
        perturbed = [[w.clone() for w in slow] for _ in micro_closures]
        fast = [w.clone() for w in slow]
        first_fast = None
        for i in range(1 if self.method == "sam" else self.k):
            descent = [None] * len(self.params)
            for j, closure in enumerate(micro_closures):
                with torch.no_grad():
                    for p, w in zip(self.params, perturbed[j]):
                        p.copy_(w)
                self._grad_at_current_weights(closure)  # at P_{j,i-1}
                self._ascent()  # P_{j,i}
                perturbed[j] = [p.detach().clone() for p in self.params]
                self._grad_at_current_weights(closure)  # at P_{j,i}
                for n, p in enumerate(self.params):
                    if p.grad is not None:
                        g = p.grad.clone()
                        descent[n] = g if descent[n] is None else descent[n] + g
            with torch.no_grad():
                for p, w, g in zip(self.params, slow, descent):
                    p.copy_(w)
                    p.grad = g
            if self.method == "sam":
                with torch.no_grad():
                    self.optimizer.step()
                return
            fast = self._base_step_on(fast)
            if i == 0:
                first_fast = [f.clone() for f in fast]
        self._interpolate(slow, fast, first_fast)

    @torch.no_grad()
    def _interpolate(self, slow, fast, first_fast) -> None:
        if self.adaptive:
            first = [(f1 - s).flatten() for f1, s in zip(first_fast, slow)]
            last = [(fk - s).flatten() for fk, s in zip(fast, slow)]
            if self.scope == "global":
                cos = F.cosine_similarity(torch.cat(first), torch.cat(last), dim=0)
                alphas = [(cos + 1.0) / 2.0] * len(slow)
            else:
                alphas = [
                    (F.cosine_similarity(a, b, dim=0) + 1.0) / 2.0 for a, b in zip(first, last)
                ]
        else:
            alphas = [self.alpha] * len(slow)
        for p, s, f, a in zip(self.params, slow, fast, alphas):
            p.copy_(s + a * (f - s))
