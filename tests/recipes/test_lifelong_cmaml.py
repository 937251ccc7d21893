"""One outer step of Lookahead-C-MAML (Algorithm 3) and Lookbehind-C-MAML (Algorithm 4) of the
paper's Figure 12, as ``examples/lifelong/cmaml.py`` computes it with ``functional_call`` and
autograd through the inner steps, against literal float64 transcriptions that carry the
Jacobian of every inner step explicitly (Hessians of the flat-parameter loss), exact and
first-order."""

from __future__ import annotations

import pytest
import torch
from cmaml import cmaml_outer_step
from torch import nn
from torch.autograd.functional import hessian, jacobian

TASKS, CLASSES, INPUTS, HIDDEN = 2, 2, 4, 3


class TinyMultiHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Linear(INPUTS, HIDDEN)
        self.heads = nn.Linear(HIDDEN, TASKS * CLASSES)

    def forward(self, x: torch.Tensor, tasks: torch.Tensor) -> torch.Tensor:
        logits = self.heads(torch.tanh(self.body(x))).view(len(x), TASKS, CLASSES)
        return logits[torch.arange(len(x)), tasks]


def flat_loss(theta: torch.Tensor, batch) -> torch.Tensor:
    """The same network written out on one flat parameter vector (named_parameters order)."""
    x, labels, tasks = batch
    sizes = [HIDDEN * INPUTS, HIDDEN, TASKS * CLASSES * HIDDEN, TASKS * CLASSES]
    w1, b1, w2, b2 = torch.split(theta, sizes)
    hidden = torch.tanh(x @ w1.view(HIDDEN, INPUTS).T + b1)
    all_heads = hidden @ w2.view(TASKS * CLASSES, HIDDEN).T + b2
    total = 0.0
    for i in range(len(x)):
        own = all_heads[i, tasks[i] * CLASSES : (tasks[i] + 1) * CLASSES]
        total = total - torch.log_softmax(own, 0)[labels[i]]
    return total / len(x)


def grad_and_hessian(theta: torch.Tensor, batch) -> tuple[torch.Tensor, torch.Tensor]:
    gradient = jacobian(lambda t: flat_loss(t, batch), theta)
    return gradient, hessian(lambda t: flat_loss(t, batch), theta)


def clamped(g, h, clip):
    """La-MAML's inner clamp to [-clip, clip] and its Jacobian diag(|g| < clip) H."""
    if clip is None:
        return g, h
    return g.clamp(-clip, clip), (g.abs() < clip).to(h.dtype)[:, None] * h


def norm_clipped(meta, clip):
    """clip_grad_norm_: scale by min(1, clip / (||meta|| + 1e-6))."""
    if clip is None:
        return meta
    return meta * min(1.0, clip / (torch.linalg.vector_norm(meta).item() + 1e-6))


def algorithm_3(phi0, pieces, meta_batch, eta, first_order, clip=None):
    """Lookahead-C-MAML: phi_{k'+1} = phi_k' - eta grad l(phi_k', b[k']);
    phi_0 <- phi_0 - eta d/dphi_0 L(phi_k, b_m), with d phi_k / d phi_0 = prod (I - eta H)."""
    identity = torch.eye(len(phi0), dtype=phi0.dtype)
    phi, jac = phi0.clone(), identity.clone()
    for piece in pieces:
        g, h = clamped(*grad_and_hessian(phi, piece), clip)
        if not first_order:
            jac = (identity - eta * h) @ jac
        phi = phi - eta * g
    meta, _ = grad_and_hessian(phi, meta_batch)
    return phi0 - eta * norm_clipped(jac.T @ meta, clip)


def algorithm_4_adapted(phi0, pieces, eta, rho, alpha, first_order, clip=None):
    """Lookbehind inner loop from phi_0 and the interpolation; returns (A, dA/dphi_0).
    P_{k'+1} = P_k' + rho g/||g|| (g at P_k'), F_{k'+1} = F_k' - eta grad l(P_{k'+1}, b[k'])."""
    identity = torch.eye(len(phi0), dtype=phi0.dtype)
    perturbed, fast = phi0.clone(), phi0.clone()
    jac_perturbed, jac_fast = identity.clone(), identity.clone()
    for piece in pieces:
        g, h = grad_and_hessian(perturbed, piece)
        norm = torch.linalg.vector_norm(g)
        unit = g / norm
        if not first_order:
            d_unit = (identity - torch.outer(unit, unit)) @ h / norm
            jac_perturbed = (identity + rho * d_unit) @ jac_perturbed
        perturbed = perturbed + rho * unit
        d, hd = clamped(*grad_and_hessian(perturbed, piece), clip)
        if not first_order:
            jac_fast = jac_fast - eta * hd @ jac_perturbed
        fast = fast - eta * d
    adapted = phi0 + alpha * (fast - phi0)
    return adapted, (1 - alpha) * identity + alpha * jac_fast


def algorithm_4(phi0, pieces, meta_batch, eta, rho, alpha, first_order, clip=None):
    """eps = rho grad M(phi_0)/||.||, phi_0 <- phi_0 - eta grad M(phi_0 + eps),
    M(phi) = L(A(phi), b_m)."""

    def meta_gradient(phi):
        adapted, jac = algorithm_4_adapted(phi, pieces, eta, rho, alpha, first_order, clip)
        meta, _ = grad_and_hessian(adapted, meta_batch)
        return jac.T @ meta

    g = meta_gradient(phi0)
    descent = meta_gradient(phi0 + rho * g / torch.linalg.vector_norm(g))
    return phi0 - eta * norm_clipped(descent, clip)


def tiny_problem(seed: int = 0):
    torch.manual_seed(seed)
    model = TinyMultiHead().double()
    generator = torch.Generator().manual_seed(seed + 1)

    def batch(n: int, task: int | None):
        tasks = (
            torch.randint(0, TASKS, (n,), generator=generator)
            if task is None
            else (torch.full((n,), task))
        )
        x = torch.randn(n, INPUTS, generator=generator, dtype=torch.float64)
        return x, torch.randint(0, CLASSES, (n,), generator=generator), tasks

    incoming = batch(6, task=1)
    pieces = list(zip(*(part.tensor_split(3) for part in incoming)))
    replay = batch(5, task=None)
    meta_batch = tuple(torch.cat(parts) for parts in zip(replay, incoming))
    return model, pieces, meta_batch


def flat(model: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().flatten() for p in model.parameters()])


@pytest.mark.parametrize("first_order", [False, True])
def test_lookahead_cmaml_matches_algorithm_3(first_order):
    model, pieces, meta_batch = tiny_problem()
    expected = algorithm_3(flat(model), pieces, meta_batch, eta=0.3, first_order=first_order)
    cmaml_outer_step(
        model, pieces, meta_batch, algorithm="lookahead", lr=0.3, first_order=first_order
    )
    torch.testing.assert_close(flat(model), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("first_order", [False, True])
def test_lookbehind_cmaml_matches_algorithm_4(first_order):
    model, pieces, meta_batch = tiny_problem(seed=3)
    settings = {"rho": 0.2, "alpha": 0.6}
    expected = algorithm_4(
        flat(model), pieces, meta_batch, eta=0.3, first_order=first_order, **settings
    )
    cmaml_outer_step(
        model,
        pieces,
        meta_batch,
        algorithm="lookbehind",
        lr=0.3,
        first_order=first_order,
        **settings,
    )
    torch.testing.assert_close(flat(model), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("algorithm", ["lookahead", "lookbehind"])
def test_exact_meta_gradient_differs_from_first_order(algorithm):
    """The second-order terms matter at this size, so the two tests above check two things."""
    results = []
    for first_order in (False, True):
        model, pieces, meta_batch = tiny_problem()
        before = flat(model)
        cmaml_outer_step(
            model,
            pieces,
            meta_batch,
            algorithm=algorithm,
            lr=0.3,
            rho=0.2,
            alpha=0.6,
            first_order=first_order,
        )
        results.append(flat(model) - before)
    assert (results[0] - results[1]).abs().max() > 1e-4


@pytest.mark.parametrize("algorithm", ["lookahead", "lookbehind"])
@pytest.mark.parametrize("first_order", [False, True])
def test_la_maml_gradient_clipping_matches_transcription(algorithm, first_order):
    """La-MAML's clamp of the inner gradients and norm clip of the meta-gradient, at a bound
    that clamps part of the entries and shortens the meta-gradient."""
    model, pieces, meta_batch = tiny_problem(seed=5)
    clip = 0.05
    gradient, _ = grad_and_hessian(flat(model), pieces[0])
    assert (gradient.abs() > clip).any() and (gradient.abs() < clip).any()

    def transcription(clip_bound):
        if algorithm == "lookahead":
            return algorithm_3(
                flat(model), pieces, meta_batch, eta=0.3, first_order=first_order, clip=clip_bound
            )
        return algorithm_4(
            flat(model), pieces, meta_batch, eta=0.3, rho=0.2, alpha=0.6,
            first_order=first_order, clip=clip_bound,
        )  # fmt: skip

    expected, unclipped = transcription(clip), transcription(None)
    assert (expected - unclipped).abs().max() > 1e-4
    cmaml_outer_step(
        model,
        pieces,
        meta_batch,
        algorithm=algorithm,
        lr=0.3,
        rho=0.2,
        alpha=0.6,
        first_order=first_order,
        grad_clip=clip,
    )
    torch.testing.assert_close(flat(model), expected, rtol=0, atol=1e-10)


def test_unknown_algorithm_is_rejected():
    model, pieces, meta_batch = tiny_problem()
    with pytest.raises(ValueError, match="unknown C-MAML algorithm 'maml'"):
        cmaml_outer_step(model, pieces, meta_batch, algorithm="maml", lr=0.1)


def balanced_zero_gradient_problem():
    """All weights zero and every batch holding both labels of one task once: the logits are
    zero, so every loss gradient (inner ascent, inner descent, meta) is exactly zero."""
    model = TinyMultiHead().double()
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    x = torch.randn(4, INPUTS, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    labels, tasks = torch.tensor([0, 1, 0, 1]), torch.tensor([1, 1, 0, 0])
    pieces = [(x[:2], labels[:2], tasks[:2]), (x[2:], labels[2:], tasks[2:])]
    return model, pieces, (x, labels, tasks)


@pytest.mark.parametrize("first_order", [False, True])
def test_zero_gradient_gives_a_zero_lookbehind_step(first_order):
    """The inner ascent and the outer SAM step normalise by the gradient norm: at a zero
    gradient they must not move the weights (the engine's NORM_EPS), not make them NaN."""
    model, pieces, meta_batch = balanced_zero_gradient_problem()
    gradient, _ = grad_and_hessian(flat(model), pieces[0])
    assert torch.equal(gradient, torch.zeros_like(gradient))
    cmaml_outer_step(
        model, pieces, meta_batch, algorithm="lookbehind", lr=0.3, rho=0.2, alpha=0.6,
        first_order=first_order,
    )  # fmt: skip
    torch.testing.assert_close(flat(model), torch.zeros_like(flat(model)), rtol=0, atol=0)


class WithUnusedParameter(TinyMultiHead):
    """TinyMultiHead plus a trainable parameter that no forward pass uses."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Parameter(torch.ones(2))


@pytest.mark.parametrize("algorithm", ["lookahead", "lookbehind"])
@pytest.mark.parametrize("first_order", [False, True])
def test_parameter_without_gradient_is_left_untouched(algorithm, first_order):
    """As ``torch.optim`` skips a parameter whose gradient is None: the unused parameter keeps
    its value, and the used ones take the same step as in a model without it (with clipping,
    so that the unused parameter would show in the global norms if it counted)."""
    settings = {"algorithm": algorithm, "lr": 0.3, "rho": 0.2, "alpha": 0.6,
                "first_order": first_order, "grad_clip": 0.05}  # fmt: skip
    reference, pieces, meta_batch = tiny_problem(seed=5)
    torch.manual_seed(0)
    model = WithUnusedParameter().double()
    model.load_state_dict(reference.state_dict(), strict=False)
    cmaml_outer_step(reference, pieces, meta_batch, **settings)
    cmaml_outer_step(model, pieces, meta_batch, **settings)
    assert torch.equal(model.unused.detach(), torch.ones(2, dtype=torch.float64))
    for name, p in reference.named_parameters():
        torch.testing.assert_close(model.get_parameter(name).detach(), p.detach(), rtol=0, atol=0)
