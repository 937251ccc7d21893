"""m-sharpness (eq. 5/6) against closed forms computed independently with numpy."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from helpers.models import make_batches, make_model
from torch import nn

from hf_lookbehind.analysis import SharpnessResult, m_sharpness

ANGLES = np.linspace(0.0, 2.0 * np.pi, 400_001)
ONE_BATCH = [(torch.zeros(4, 1, dtype=torch.float64), torch.zeros(4))]


class Quadratic(nn.Module):
    """Loss 0.5 w'Hw (returned as a 1-column output, turned into the loss by ``output_mean``)."""

    def __init__(self, w, hessian, name: str = "weight") -> None:
        super().__init__()
        self.name = name
        self.register_parameter(name, nn.Parameter(torch.tensor(w, dtype=torch.float64)))
        self.register_buffer("hessian", torch.tensor(hessian, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = getattr(self, self.name)
        return (0.5 * w @ self.hessian @ w).expand(x.shape[0], 1)


def output_mean(output: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return output.mean()


def ball_maximum(w, hessian, radius: float) -> float:
    """max over ||e|| <= r of 0.5 (w+e)'H(w+e) - 0.5 w'Hw for 2-D w, by a fine grid on the circle
    (a convex function attains its maximum over the ball on the boundary)."""
    w, hessian = np.asarray(w), np.asarray(hessian)
    points = w + radius * np.stack([np.cos(ANGLES), np.sin(ANGLES)], axis=1)
    values = 0.5 * np.einsum("ni,ij,nj->n", points, hessian, points)
    return float(values.max() - 0.5 * w @ hessian @ w)


def sharpness(model, radii, **kwargs) -> SharpnessResult:
    kwargs.setdefault("loss_fn", output_mean)
    return m_sharpness(model, ONE_BATCH, radii, progress=False, **kwargs)


HESSIAN = [[2.0, 0.7], [0.7, 1.0]]


def test_quadratic_at_minimum_is_half_r_squared_times_top_eigenvalue():
    rng = np.random.default_rng(0)
    factor = rng.normal(size=(6, 6))
    hessian = factor @ factor.T / 6
    top = np.linalg.eigvalsh(hessian)[-1]
    radii = [0.1, 0.5, 2.0]
    result = sharpness(Quadratic(np.zeros(6), hessian), radii, ascent_steps=100)
    np.testing.assert_allclose(result.mean, [0.5 * r**2 * top for r in radii], rtol=1e-6)


@pytest.mark.parametrize("w", [[0.5, -1.0], [-2.0, 0.3]])
def test_quadratic_away_from_minimum_matches_trust_region_maximum(w):
    radii = [0.05, 0.5, 1.5]
    result = sharpness(Quadratic(w, HESSIAN), radii, ascent_steps=100)
    expected = [ball_maximum(w, HESSIAN, r) for r in radii]
    np.testing.assert_allclose(result.mean, expected, rtol=1e-6)
    assert result.std == [0.0] * 3  # one minibatch


def test_asam_is_sam_of_the_rescaled_problem():
    """eq. 6 with T = |w| + eta: substituting eps = T delta turns it into eq. 5 for the parameter
    v = w / T and the Hessian T H T; compare with the closed form of that problem."""
    w, eta = np.array([0.5, -1.0]), 0.1
    scale = np.abs(w) + eta
    rescaled_hessian = np.diag(scale) @ np.asarray(HESSIAN) @ np.diag(scale)
    radii = [0.1, 1.0]
    asam = sharpness(
        Quadratic(w, HESSIAN), radii, neighbourhood="asam", asam_eta=eta, ascent_steps=100
    )
    sam = sharpness(Quadratic(w / scale, rescaled_hessian), radii, ascent_steps=100)
    expected = [ball_maximum(w / scale, rescaled_hessian, r) for r in radii]
    np.testing.assert_allclose(asam.mean, expected, rtol=1e-6)
    np.testing.assert_allclose(asam.mean, sam.mean, rtol=1e-6)
    assert asam.neighbourhood == "asam"


def test_asam_weights_only_leaves_other_parameters_unscaled():
    """A parameter not named *weight* gets T = 1 by default (the public ASAM code's grouping)."""
    w = [0.5, -1.0]
    default = sharpness(Quadratic(w, HESSIAN, "bias"), [0.5], neighbourhood="asam", ascent_steps=50)
    sam = sharpness(Quadratic(w, HESSIAN, "bias"), [0.5], ascent_steps=50)
    all_scaled = sharpness(
        Quadratic(w, HESSIAN, "bias"),
        [0.5],
        neighbourhood="asam",
        asam_weights_only=False,
        ascent_steps=50,
    )
    assert default.mean == pytest.approx(sam.mean, rel=1e-12)
    assert all_scaled.mean[0] != pytest.approx(sam.mean[0], rel=1e-3)


class WeightFree(nn.Module):
    """Has parameters, but its loss does not depend on them (one unused, one multiplied by 0)."""

    def __init__(self) -> None:
        super().__init__()
        self.unused = nn.Linear(6, 3)
        self.zeroed = nn.Parameter(torch.ones(3))
        self.register_buffer("projection", torch.randn(6, 3))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.float() @ self.projection + 0.0 * self.zeroed


@pytest.mark.parametrize("neighbourhood", ["sam", "asam"])
def test_zero_when_loss_does_not_depend_on_weights(neighbourhood):
    batches = make_batches(3, batch_size=8)
    result = m_sharpness(
        WeightFree(), batches, [0.01, 1.0, 10.0], neighbourhood=neighbourhood, progress=False
    )
    assert result.mean == [0.0, 0.0, 0.0]
    assert result.per_batch == [[0.0] * 3] * 3
    assert result.base_loss > 0


def test_network_statistics_restoration_and_more_steps_never_lower():
    model = make_model(dropout=0.3)
    model.train()
    model.fc2.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    batches = make_batches(4, batch_size=16)
    radii = [0.05, 0.2]
    one_step = m_sharpness(model, batches, radii, ascent_steps=1, progress=False)
    result = m_sharpness(model, batches, radii, num_batches=3, ascent_steps=5, progress=False)

    assert result.num_batches == 3 and result.batch_size == 16 and result.ascent_steps == 5
    values = np.array(result.per_batch)
    assert values.shape == (2, 3) and (values > 0).all()
    np.testing.assert_allclose(result.mean, values.mean(axis=1))
    np.testing.assert_allclose(result.std, values.std(axis=1))
    # the first ascent step is the SAM step of eq. 3 and the maximum over iterates is kept
    assert (values >= np.array(one_step.per_batch)[:, :3] - 1e-12).all()
    # eval mode: dropout off, so a repeated measurement is identical
    again = m_sharpness(model, batches, radii, num_batches=3, ascent_steps=5, progress=False)
    assert again.per_batch == result.per_batch
    # weights, BatchNorm statistics and every module's mode are restored
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.training and model.drop.training and not model.fc2.training


@pytest.mark.parametrize(
    "wrap", [lambda logits: types.SimpleNamespace(logits=logits), lambda logits: {"logits": logits}]
)
def test_dict_batches_and_logits_outputs_give_the_same_values(wrap):
    """Hugging Face conventions: model(**inputs) returning an object with .logits (or a dict)."""
    model = make_model()

    class WithLogits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.inner = model

        def forward(self, features: torch.Tensor):
            return wrap(self.inner(features))

    batches = make_batches(2)
    dict_batches = [{"features": x, "labels": y} for x, y in batches]
    plain = m_sharpness(model, batches, [0.1], ascent_steps=3, progress=False)
    wrapped = m_sharpness(WithLogits(), dict_batches, [0.1], ascent_steps=3, progress=False)
    assert wrapped.per_batch == plain.per_batch


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"radii": []}, "at least one radius"),
        ({"radii": [-0.1]}, "radii must be finite numbers >= 0"),
        ({"neighbourhood": "fisher"}, "unknown neighbourhood 'fisher'"),
        ({"ascent_steps": 0}, "ascent_steps must be an integer >= 1"),
        ({"num_batches": 0}, "num_batches must be an integer >= 1"),
        ({"step_size": 0.0}, "step_size must be a finite number > 0"),
    ],
)
def test_bad_arguments_are_rejected(kwargs, message):
    arguments = {"radii": [0.1], **kwargs}
    with pytest.raises(ValueError, match=message):
        m_sharpness(make_model(), make_batches(1), progress=False, **arguments)


def test_rejects_no_batches_and_batches_without_labels():
    with pytest.raises(ValueError, match="no minibatches"):
        m_sharpness(make_model(), [], [0.1], progress=False)
    with pytest.raises(ValueError, match="'labels' or 'label' entry"):
        m_sharpness(make_model(), [{"x": torch.zeros(2, 6)}], [0.1], progress=False)
