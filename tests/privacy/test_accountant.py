"""Privacy accounting: golden values against Opacus, calibration that never overshoots."""

from __future__ import annotations

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from clinfed.errors import PrivacyError
from clinfed.privacy.accountant import (
    RDP_ORDERS,
    DPStep,
    calibrate_noise,
    epsilon_spent,
    planned_steps,
)


@pytest.mark.parametrize(
    ("sigma", "q", "steps"),
    [(1.0, 0.01, 1000), (3.2, 0.08, 190), (0.8, 0.5, 30), (10.0, 0.19, 500)],
)
def test_rdp_epsilon_equals_opacus_rdp_accountant(sigma: float, q: float, steps: int) -> None:
    reference = RDPAccountant()
    reference.history = [(sigma, q, steps)]

    ours = epsilon_spent(
        [DPStep(noise_multiplier=sigma, sample_rate=q, steps=steps)], delta=1e-5, accountant="rdp"
    )

    assert ours == pytest.approx(
        reference.get_epsilon(delta=1e-5, alphas=list(RDP_ORDERS)), rel=1e-9
    )


def test_rdp_golden_value() -> None:
    # Opacus' RDP accountant, sigma=1.0, q=0.01, 1000 steps, delta=1e-5 (default orders): 2.4...;
    # the extended orders can only make it tighter.
    reference = RDPAccountant()
    reference.history = [(1.0, 0.01, 1000)]
    default_orders = reference.get_epsilon(delta=1e-5)

    ours = epsilon_spent(
        [DPStep(noise_multiplier=1.0, sample_rate=0.01, steps=1000)], delta=1e-5, accountant="rdp"
    )

    assert ours <= default_orders + 1e-12
    assert ours == pytest.approx(default_orders, rel=1e-6)


def test_prv_epsilon_equals_opacus_prv_accountant() -> None:
    reference = PRVAccountant()
    reference.history = [(1.2, 0.05, 200)]

    ours = epsilon_spent(
        [DPStep(noise_multiplier=1.2, sample_rate=0.05, steps=200)], delta=1e-5, accountant="prv"
    )

    assert ours == pytest.approx(reference.get_epsilon(delta=1e-5), rel=1e-6)


def test_history_composes_across_rounds() -> None:
    one = DPStep(noise_multiplier=2.0, sample_rate=0.1, steps=10)

    eps = [epsilon_spent([one] * k, delta=1e-5, accountant="rdp") for k in range(1, 6)]

    assert eps == sorted(eps) and len(set(eps)) == 5
    assert eps[-1] == pytest.approx(
        epsilon_spent(
            [DPStep(noise_multiplier=2.0, sample_rate=0.1, steps=50)], delta=1e-5, accountant="rdp"
        )
    )


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
@pytest.mark.parametrize("target", [0.1, 0.3, 1.0, 5.0])
def test_calibrated_noise_meets_the_target_without_waste(accountant: str, target: float) -> None:
    q, steps = planned_steps(num_records=199, batch_size=16, epochs_per_round=1, rounds=10)

    sigma = calibrate_noise(
        target_epsilon=target, target_delta=1e-5, sample_rate=q, steps=steps, accountant=accountant
    )
    spent = epsilon_spent(
        [DPStep(noise_multiplier=sigma, sample_rate=q, steps=steps)],
        delta=1e-5,
        accountant=accountant,
    )

    assert spent <= target
    assert spent >= 0.97 * target  # not over-noised either


def test_calibration_with_history_uses_only_what_is_left() -> None:
    q = 0.08
    taken = [DPStep(noise_multiplier=3.0, sample_rate=q, steps=100)]

    sigma = calibrate_noise(
        target_epsilon=3.0,
        target_delta=1e-5,
        sample_rate=q,
        steps=100,
        accountant="rdp",
        history=taken,
    )

    total = epsilon_spent(
        [*taken, DPStep(noise_multiplier=sigma, sample_rate=q, steps=100)],
        delta=1e-5,
        accountant="rdp",
    )
    assert 2.9 <= total <= 3.0


def test_spent_budget_is_refused() -> None:
    taken = [DPStep(noise_multiplier=0.5, sample_rate=0.5, steps=100)]

    with pytest.raises(PrivacyError, match="privacy budget is spent"):
        calibrate_noise(
            target_epsilon=1.0,
            target_delta=1e-5,
            sample_rate=0.5,
            steps=10,
            accountant="rdp",
            history=taken,
        )


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan")])
def test_a_step_without_noise_cannot_be_recorded(bad: float) -> None:
    with pytest.raises(PrivacyError, match="noise_multiplier"):
        DPStep(noise_multiplier=bad, sample_rate=0.1, steps=1)


def test_planned_steps_counts_whole_run() -> None:
    assert planned_steps(num_records=199, batch_size=16, epochs_per_round=2, rounds=10) == (
        16 / 199,
        12 * 2 * 10,
    )
