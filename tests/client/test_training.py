"""The training loop: DP-SGD really clips and noises; evaluation metrics are right."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch

from clinfed.client.metrics import roc_auc
from clinfed.client.training import TrainSettings, evaluate, train
from clinfed.models import create_model


def _data(n: int = 200, d: int = 6, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g)
    y = (x[:, 0] + 0.5 * x[:, 1] > 0).long()
    return x, y


def _settings(**kw: float) -> TrainSettings:
    base = {"epochs": 1, "batch_size": 20, "lr": 0.5, "max_grad_norm": 1.0}
    base.update(kw)
    return TrainSettings(**base)  # type: ignore[arg-type]


def _trained(noise: float | None, seed: int, **kw: float) -> torch.Tensor:
    torch.manual_seed(0)
    model = create_model("logreg", num_features=6, num_classes=2)
    x, y = _data()
    train(
        model,
        x,
        y,
        settings=_settings(**kw),
        noise_multiplier=noise,
        generator=torch.Generator().manual_seed(seed),
    )
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def test_plain_training_learns() -> None:
    torch.manual_seed(0)
    model = create_model("logreg", num_features=6, num_classes=2)
    x, y = _data()

    train(
        model,
        x,
        y,
        settings=_settings(epochs=5),
        noise_multiplier=None,
        generator=torch.Generator().manual_seed(0),
    )

    assert evaluate(model, x, y).accuracy > 0.9


def test_dp_noise_is_added_and_comes_from_the_generator() -> None:
    a = _trained(1.0, seed=1)
    b = _trained(1.0, seed=1)
    c = _trained(1.0, seed=2)

    assert torch.equal(a, b)  # same secret seed, same noise
    assert not torch.allclose(a, c)  # other seed, other noise


def test_dp_noise_scales_with_the_multiplier() -> None:
    init = _trained(None, seed=0, lr=1e-12)  # the initial parameters
    low = [(_trained(0.1, seed=s) - init).norm() for s in range(5)]
    high = [(_trained(100.0, seed=s) - init).norm() for s in range(5)]

    # Noise per coordinate and step: lr * sigma * C / B = 0.5 * 100 * 1 / 20 = 2.5; 10 steps and
    # 7 parameters give a norm of about 2.5 * sqrt(70) ~ 20.9 (the data's pull is ~1).
    assert np.mean(high) == pytest.approx(2.5 * np.sqrt(70), rel=0.3)
    assert np.mean(high) > 10 * np.mean(low)


def test_each_record_is_clipped() -> None:
    # One record with a huge gradient: without clipping it would dominate the step.
    torch.manual_seed(0)
    model = create_model("logreg", num_features=6, num_classes=2)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    x = torch.zeros(1, 6)
    x[0, 0] = 1e6
    y = torch.zeros(1, dtype=torch.long)

    train(
        model,
        x,
        y,
        settings=TrainSettings(epochs=1, batch_size=1, lr=1.0, max_grad_norm=0.5),
        noise_multiplier=1e-9,
        generator=torch.Generator().manual_seed(0),
    )

    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert (after - before).norm() <= 0.5 + 1e-4  # lr * C / expected batch size 1


def test_empty_poisson_batches_still_add_noise() -> None:
    torch.manual_seed(0)
    model = create_model("logreg", num_features=6, num_classes=2)
    before = torch.cat([p.detach().flatten().clone() for p in model.parameters()])
    x, y = _data(n=2)

    # q = 1/100 of 2 records: nearly every step's batch is empty
    result = train(
        model,
        x,
        y,
        settings=TrainSettings(epochs=1, batch_size=1, lr=0.1, max_grad_norm=1.0),
        noise_multiplier=5.0,
        generator=torch.Generator().manual_seed(3),
    )

    after = torch.cat([p.detach().flatten() for p in model.parameters()])
    assert result.steps == 2
    assert not torch.allclose(before, after)


def test_fedprox_term_pulls_towards_the_global_model() -> None:
    init = _trained(None, seed=0, lr=1e-12)
    free = (_trained(None, seed=0, epochs=3) - init).norm()
    held = (_trained(None, seed=0, epochs=3, proximal_mu=1.0) - init).norm()

    assert held < free


def _auc_by_pairs(scores: np.ndarray, labels: np.ndarray) -> float:
    pos, neg = scores[labels == 1], scores[labels == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p, n in itertools.product(pos, neg))
    return float(wins / (len(pos) * len(neg)))


@pytest.mark.parametrize("seed", range(5))
def test_roc_auc_matches_the_pairwise_definition(seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, 60)
    scores = np.round(rng.random(60), 1)  # ties on purpose
    probs = np.stack([1 - scores, scores], axis=1)

    assert roc_auc(probs, labels) == pytest.approx(_auc_by_pairs(scores, labels))


def test_roc_auc_is_nan_with_one_class() -> None:
    assert np.isnan(roc_auc(np.array([[0.2, 0.8], [0.4, 0.6]]), np.array([1, 1])))
