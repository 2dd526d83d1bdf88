"""Membership-inference audit: sees a leak when there is one, none when there is none."""

from __future__ import annotations

import dataclasses
import logging
import math
from collections.abc import Iterator

import pytest
import torch
from torch import nn

from clinfed.client.training import TrainSettings, train
from clinfed.errors import PrivacyError
from clinfed.models import create_model
from clinfed.privacy.mia import MembershipAudit, audit_membership, dp_auc_bound


@pytest.fixture(autouse=True)
def _one_torch_thread() -> Iterator[None]:
    # Tiny models: one thread is faster, and a second one spins when the machine is busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _random_task(n: int, seed: int, features: int = 10) -> tuple[torch.Tensor, torch.Tensor]:
    """Features with labels that are pure noise: a model can only fit them by memorising."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, features, generator=g), torch.randint(0, 2, (n,), generator=g)


def _mlp(features: int = 10, hidden: int = 64) -> nn.Module:
    torch.manual_seed(0)
    return create_model("mlp", num_features=features, num_classes=2, hidden=[hidden])


def _settings(epochs: int, lr: float = 0.5) -> TrainSettings:
    return TrainSettings(epochs=epochs, batch_size=40, lr=lr, max_grad_norm=1.0)


def test_every_package_name_resolves() -> None:
    import clinfed.privacy.mia as module

    assert all(hasattr(module, name) for name in module.__all__)


def test_a_model_that_memorised_its_records_is_caught_by_both_attacks() -> None:
    members, non_members = _random_task(40, seed=1, features=20), _random_task(60, 2, 20)
    model = _mlp(features=20, hidden=32)
    settings = _settings(200, lr=2.0)
    train(
        model,
        *members,
        settings=settings,
        noise_multiplier=None,
        generator=torch.Generator().manual_seed(0),
    )

    audit = audit_membership(
        model,
        members=members,
        non_members=non_members,
        reference_settings=settings,
        reference_models=2,
        seed=0,
    )

    # Random labels: members are fitted exactly, non-members right half of the time, so even a
    # perfect loss attack stays near 0.75-0.85 here; a model that leaks nothing gives 0.5.
    assert audit.members == audit.non_members == 40
    assert audit.loss_auc > 0.75
    assert audit.calibrated_auc > 0.65


def test_a_model_that_never_saw_the_records_leaks_nothing() -> None:
    members, non_members = _random_task(200, seed=3), _random_task(200, seed=4)
    model = _mlp()  # untrained: membership cannot show in its losses

    audit = audit_membership(
        model,
        members=members,
        non_members=non_members,
        reference_settings=_settings(10),
        reference_models=2,
        seed=0,
    )

    # One AUC of a blind attack on 200 + 200 records has a standard deviation of 0.029.
    assert abs(audit.loss_auc - 0.5) < 0.1
    assert abs(audit.calibrated_auc - 0.5) < 0.1


def test_only_aggregates_leave_the_audit_and_the_model_is_untouched(
    caplog: pytest.LogCaptureFixture,
) -> None:
    members, non_members = _random_task(30, seed=5), _random_task(20, seed=6)
    model = _mlp()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    with caplog.at_level(logging.DEBUG, logger="clinfed"):
        audit = audit_membership(
            model,
            members=members,
            non_members=non_members,
            reference_settings=_settings(5),
            reference_models=2,
            seed=0,
        )

    assert {f.name: type(getattr(audit, f.name)) for f in dataclasses.fields(MembershipAudit)} == {
        "members": int,
        "non_members": int,
        "reference_models": int,
        "loss_auc": float,
        "calibrated_auc": float,
    }
    assert [r.getMessage().count(",") for r in caplog.records] == [1]
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_the_audit_is_reproducible_from_its_seed() -> None:
    members, non_members = _random_task(30, seed=7), _random_task(30, seed=8)

    def run() -> MembershipAudit:
        return audit_membership(
            _mlp(),
            members=members,
            non_members=non_members,
            reference_settings=_settings(5),
            reference_models=2,
            seed=3,
        )

    assert run() == run()


@pytest.mark.parametrize(
    ("references", "sizes", "words"),
    [(3, (20, 20), "even"), (0, (20, 20), "even"), (2, (1, 20), "at least 2")],
)
def test_bad_audit_settings_are_refused(
    references: int, sizes: tuple[int, int], words: str
) -> None:
    with pytest.raises(PrivacyError, match=words):
        audit_membership(
            _mlp(),
            members=_random_task(sizes[0], seed=0),
            non_members=_random_task(sizes[1], seed=1),
            reference_settings=_settings(1),
            reference_models=references,
            seed=0,
        )


def test_a_layer_that_cannot_be_reinitialised_is_refused() -> None:
    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.ones(10))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.weight

    model = nn.Sequential(Scale(), nn.Linear(10, 1))

    with pytest.raises(PrivacyError, match="reset_parameters"):
        audit_membership(
            model,
            members=_random_task(10, seed=0),
            non_members=_random_task(10, seed=1),
            reference_settings=_settings(1),
            reference_models=2,
            seed=0,
        )


def test_the_dp_auc_bound_matches_its_closed_form_without_delta() -> None:
    e = math.e
    knee = (1 - 1 / e) / (e - 1 / e)  # where e^eps * FPR meets 1 - e^-eps * (1 - FPR)
    closed = e * knee**2 / 2 + (1 - knee) - (1 - knee) ** 2 / (2 * e)

    assert dp_auc_bound(epsilon=1.0, delta=0.0) == pytest.approx(closed, abs=1e-6)
    assert dp_auc_bound(epsilon=0.0, delta=0.0) == pytest.approx(0.5, abs=1e-9)


def test_the_dp_auc_bound_grows_with_epsilon_and_delta() -> None:
    bounds = [dp_auc_bound(epsilon=eps, delta=1e-5) for eps in (0.1, 0.5, 1.0, 3.0, 8.0)]

    assert bounds == sorted(bounds) and bounds[-1] < 1.0
    assert dp_auc_bound(epsilon=1.0, delta=0.01) > dp_auc_bound(epsilon=1.0, delta=0.0)
    with pytest.raises(PrivacyError):
        dp_auc_bound(epsilon=math.inf, delta=0.0)
