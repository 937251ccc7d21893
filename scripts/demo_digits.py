"""Plain-PyTorch demo: SGD vs SAM vs Lookbehind-SAM on scikit-learn's digits (shipped with
scikit-learn, no download). Prints test accuracy, test loss and wall time per method."""

from __future__ import annotations

import argparse
import time

import torch
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from hf_lookbehind import Lookbehind


def make_data(seed: int):
    digits = load_digits()
    x = torch.tensor(digits.data, dtype=torch.float32) / 16.0
    y = torch.tensor(digits.target)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=0.3, random_state=seed, stratify=y
    )
    return (x_train, y_train), (x_test, y_test)


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(64, 128), nn.BatchNorm1d(128), nn.ReLU(), nn.Dropout(0.1), nn.Linear(128, 10)
    )


def train(method: str, epochs: int, seed: int, train_set, batch_size: int = 32) -> nn.Module:
    torch.manual_seed(seed)
    model = make_model()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if method == "sam":
        optimizer = Lookbehind(optimizer, method="sam", rho=0.05, model=model)
    elif method == "lookbehind":
        optimizer = Lookbehind(optimizer, k=2, alpha=0.5, rho=0.05, model=model)
    x_train, y_train = train_set
    loss_fn = nn.CrossEntropyLoss()
    for _ in range(epochs):
        model.train()
        for index in torch.randperm(len(x_train)).split(batch_size):
            inputs, labels = x_train[index], y_train[index]

            def closure(inputs=inputs, labels=labels):
                loss = loss_fn(model(inputs), labels)
                loss.backward()
                return loss

            if method == "sgd":
                optimizer.zero_grad()
                closure()
                optimizer.step()
            else:
                optimizer.step(closure)
    return model


@torch.no_grad()
def evaluate(model: nn.Module, test_set) -> tuple[float, float]:
    model.eval()
    logits = model(test_set[0])
    loss = nn.functional.cross_entropy(logits, test_set[1]).item()
    accuracy = (logits.argmax(1) == test_set[1]).float().mean().item()
    return accuracy, loss


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--seeds", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    header = f"{'method':<12}{'test acc':>10}{'test loss':>11}{'seconds':>9}"
    print(f"{header}   (mean of {args.seeds} seeds)")
    for method in ("sgd", "sam", "lookbehind"):
        accuracies, losses, seconds = [], [], []
        for seed in range(args.seeds):
            train_set, test_set = make_data(seed)
            start = time.perf_counter()
            model = train(method, args.epochs, seed, train_set)
            seconds.append(time.perf_counter() - start)
            accuracy, loss = evaluate(model, test_set)
            accuracies.append(accuracy)
            losses.append(loss)
        print(
            f"{method:<12}{100 * _mean(accuracies):>9.2f}%{_mean(losses):>11.4f}"
            f"{_mean(seconds):>9.1f}"
        )


if __name__ == "__main__":
    main()
