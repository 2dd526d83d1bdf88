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


def _opacus_reference_train(
    model: torch.nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    settings: TrainSettings,
    noise_multiplier: float,
    generator: torch.Generator,
) -> None:
    """DP-SGD exactly as Opacus does it: GradSampleModule + DPOptimizer, Poisson batches.

    The reference the project's loop must match, parameter for parameter (same generator, same
    draws): it exists only here, in the test.
    """
    from opacus import GradSampleModule
    from opacus.optimizers import DPOptimizer

    from clinfed.client.training import _loss, _poisson_batch

    n = len(labels)
    q = min(1.0, settings.batch_size / n)
    steps = max(1, round(1 / q)) * settings.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    sgd = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)
    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    optimizer = DPOptimizer(
        sgd,
        noise_multiplier=noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        # as opacus.PrivacyEngine.make_private computes it for a Poisson loader
        expected_batch_size=max(1, round(q * n)),
        loss_reduction="mean",
        generator=generator,
    )
    model.train()
    for _ in range(steps):
        batch = _poisson_batch(n, q, generator)
        optimizer.zero_grad(set_to_none=True)
        if len(batch) == 0:
            for p in params:
                p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)  # type: ignore[attr-defined]
        else:
            _loss(gsm(features[batch]), labels[batch]).backward()  # type: ignore[no-untyped-call]
        optimizer.step()
    gsm.to_standard_module()


@pytest.mark.parametrize(
    ("name", "num_features", "num_classes", "batch_size"),
    [
        ("logreg", 6, 2, 20),
        ("logreg", 6, 4, 20),
        ("mlp", 6, 2, 20),
        ("mlp", 6, 3, 7),
        ("cnn", 64, 2, 8),
        # batch_size above the site's 60 records: q = 1, Opacus averages over 60, not 100
        ("logreg", 6, 2, 100),
    ],
)
def test_dp_step_equals_opacus_dpoptimizer(
    name: str, num_features: int, num_classes: int, batch_size: int
) -> None:
    # Arrange: two identical models, the same data, two generators with the same seed
    g = torch.Generator().manual_seed(5)
    x = torch.randn(60, num_features, generator=g) * 3
    y = torch.randint(0, num_classes, (60,), generator=g)
    torch.manual_seed(0)
    ours = create_model(name, num_features=num_features, num_classes=num_classes, hidden=[8])
    reference = create_model(name, num_features=num_features, num_classes=num_classes, hidden=[8])
    reference.load_state_dict(ours.state_dict())
    settings = TrainSettings(epochs=2, batch_size=batch_size, lr=0.3, max_grad_norm=0.7)

    # Act
    train(
        ours,
        x,
        y,
        settings=settings,
        noise_multiplier=1.3,
        generator=torch.Generator().manual_seed(11),
    )
    _opacus_reference_train(
        reference,
        x,
        y,
        settings=settings,
        noise_multiplier=1.3,
        generator=torch.Generator().manual_seed(11),
    )

    # Assert: the same parameters, up to float32 rounding
    for (key, a), (_, b) in zip(
        ours.state_dict().items(), reference.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=key)
