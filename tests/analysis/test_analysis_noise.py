"""Robustness to noisy weights (Sec. 4.4): clean baseline, BatchNorm recalibration, a real drop."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
from helpers.models import make_batches, make_model

from hf_lookbehind.analysis import (
    add_weight_noise_,
    evaluate,
    noisy_weight_robustness,
    recalibrate_batchnorm,
)
from hf_lookbehind.analysis.data import image_classification_loader, load_split
from hf_lookbehind_recipes.cifar_models import load_pretrained_resnet

CHECKPOINT_NORMALIZATION = ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def accuracy_by_hand(model, batches) -> float:
    model.eval()
    with torch.no_grad():
        correct = sum((model(x).argmax(1) == y).sum().item() for x, y in batches)
    return correct / sum(len(y) for _, y in batches)


def test_sigma_zero_reproduces_clean_accuracy_and_model_is_untouched():
    model = make_model()
    model.train()
    before = copy.deepcopy(model.state_dict())
    eval_batches, calibration = make_batches(3, seed=5), make_batches(4, seed=6)
    result = noisy_weight_robustness(
        model,
        eval_batches,
        calibration,
        [0.0, 0.3],
        draws=3,
        num_calibration_batches=2,
        progress=False,
    )
    clean = accuracy_by_hand(copy.deepcopy(model), eval_batches)
    assert result.clean_accuracy == clean
    assert result.accuracy_mean[0] == clean and result.accuracy_std[0] == 0.0
    assert result.per_draw_accuracy[0] == [clean] * 3
    assert len(result.per_draw_accuracy[1]) == 3
    np.testing.assert_allclose(result.accuracy_mean[1], np.mean(result.per_draw_accuracy[1]))
    np.testing.assert_allclose(result.accuracy_std[1], np.std(result.per_draw_accuracy[1]))
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert model.training


def test_noise_is_reproducible_and_shared_across_sigmas():
    model = make_model()
    args = (model, make_batches(3, seed=5), make_batches(2, seed=6), [0.1, 0.5])
    first = noisy_weight_robustness(*args, draws=2, seed=3, progress=False)
    second = noisy_weight_robustness(*args, draws=2, seed=3, progress=False)
    assert first.per_draw_accuracy == second.per_draw_accuracy
    assert first.loss_mean == second.loss_mean
    other_seed = noisy_weight_robustness(*args, draws=2, seed=4, progress=False)
    assert other_seed.loss_mean != first.loss_mean
    # draw d multiplies by 1 + sigma u_d with the same u_d for every sigma
    ratios = []
    for sigma in (0.1, 0.5):
        noisy = copy.deepcopy(model)
        add_weight_noise_(noisy, sigma, torch.Generator().manual_seed(7))
        ratios.append((noisy.fc1.weight / model.fc1.weight - 1) / sigma)
    torch.testing.assert_close(ratios[0], ratios[1])


def test_batchnorm_recalibration_is_the_cumulative_average_of_batch_statistics():
    model = make_model()
    model.norm.momentum = 0.1
    model.norm.running_mean.fill_(5.0)
    model.eval()
    batches = make_batches(4, seed=9)
    recalibrate_batchnorm(model, batches, num_batches=3)
    with torch.no_grad():
        activations = [model.fc1(x) for x, _ in batches[:3]]
    expected_mean = torch.stack([a.mean(0) for a in activations]).mean(0)
    expected_var = torch.stack([a.var(0, unbiased=True) for a in activations]).mean(0)
    torch.testing.assert_close(model.norm.running_mean, expected_mean)
    torch.testing.assert_close(model.norm.running_var, expected_var)
    assert model.norm.momentum == 0.1 and not model.training


def test_bad_arguments_are_rejected():
    model, batches = make_model(), make_batches(1)
    with pytest.raises(ValueError, match="at least one noise level"):
        noisy_weight_robustness(model, batches, batches, [], progress=False)
    with pytest.raises(ValueError, match="sigmas must be finite numbers >= 0"):
        noisy_weight_robustness(model, batches, batches, [-0.1], progress=False)
    with pytest.raises(ValueError, match="draws must be an integer >= 1"):
        noisy_weight_robustness(model, batches, batches, [0.1], draws=0, progress=False)
    with pytest.raises(ValueError, match="no examples"):
        noisy_weight_robustness(model, iter(batches), batches, [0.1], progress=False)


@pytest.mark.slow
def test_pretrained_resnet20_loses_accuracy_under_large_noise(shared_data):
    model, _ = load_pretrained_resnet(shared_data / "pretrained_cifar10_resnet" / "resnet20.th")
    cifar = shared_data / "cifar10"
    test = load_split(str(cifar / "test.parquet"), "test")
    train = load_split(str(cifar / "train.parquet"), "train")
    eval_batches = image_classification_loader(
        test, batch_size=200, normalization=CHECKPOINT_NORMALIZATION, max_samples=200
    )
    calibration = image_classification_loader(
        train,
        batch_size=100,
        normalization=CHECKPOINT_NORMALIZATION,
        max_samples=200,
        shuffle=True,
    )
    result = noisy_weight_robustness(
        model,
        eval_batches,
        calibration,
        [0.0, 0.5],
        draws=1,
        num_calibration_batches=2,
        progress=False,
    )
    assert result.accuracy_mean[0] == evaluate(model, eval_batches)[1]
    assert result.accuracy_mean[0] > 0.7
    assert result.accuracy_mean[1] < result.accuracy_mean[0] - 0.3
