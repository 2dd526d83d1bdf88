"""Privacy accounting for DP-SGD at a site, across all rounds of a run.

Every site trains with DP-SGD (Abadi et al., CCS 2016): Poisson sampling with rate ``q``, per-record
clipping to ``C`` and Gaussian noise ``N(0, (σC)²)``. The privacy loss of the whole run is
computed by an Opacus accountant — Rényi DP (Mironov, CSF 2017; Mironov, Talwar & Zhang 2019 for
the sampled Gaussian mechanism) or PRV (Gopi, Lee & Wutschitz, NeurIPS 2021; the upper bound is
used) — from the **full history** of ``(σ, q, steps)`` of the run. The history is kept between
rounds; a fresh accountant per round would report the ε of one round only and under-count.

The unit of privacy is **one patient record in a site's training split**; ε is per site.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
from opacus.accountants import create_accountant
from opacus.accountants.analysis import rdp as rdp_analysis

from clinfed.errors import PrivacyError

__all__ = ["RDP_ORDERS", "DPStep", "calibrate_noise", "epsilon_spent", "planned_steps"]

RDP_ORDERS: tuple[float, ...] = (
    *(1 + x / 10.0 for x in range(1, 100)),
    *range(12, 64),
    *range(64, 257, 16),
)
"""Rényi orders searched by the RDP accountant: Opacus' defaults extended to 256.

At small ε (heavy noise, many steps) the best order lies above Opacus' default maximum of 63;
the bound is valid at any order, so extending the range only makes it tighter.
"""


@functools.lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> tuple[float, ...]:
    # RDP composes additively over steps: the history's RDP is Σ steps_i · rdp(σ_i, q_i).
    # Exactly what Opacus' RDPAccountant sums, computed once per distinct (σ, q).
    rdp = rdp_analysis.compute_rdp(
        q=sample_rate, noise_multiplier=noise_multiplier, steps=1, orders=list(RDP_ORDERS)
    )
    return tuple(float(v) for v in rdp)


@dataclass(frozen=True)
class DPStep:
    """``steps`` DP-SGD steps at noise multiplier ``noise_multiplier`` and sampling rate ``sample_rate``."""

    noise_multiplier: float
    sample_rate: float
    steps: int

    def __post_init__(self) -> None:
        if not (self.noise_multiplier > 0 and math.isfinite(self.noise_multiplier)):
            raise PrivacyError(
                f"noise_multiplier must be a finite number > 0; found {self.noise_multiplier}."
            )
        if not 0 < self.sample_rate <= 1:
            raise PrivacyError(f"sample_rate must be in (0, 1]; found {self.sample_rate}.")
        if self.steps < 0:
            raise PrivacyError(f"steps must be >= 0; found {self.steps}.")


def planned_steps(
    *, num_records: int, batch_size: int, epochs_per_round: int, rounds: int, local_steps: int = 0
) -> tuple[float, int]:
    """The sampling rate and the number of DP-SGD steps a site takes over a whole run.

    An epoch is ``round(1 / q)`` steps of expected batch size ``batch_size``; ``local_steps > 0``
    fixes the steps per round instead (``epochs_per_round`` is then ignored).
    """
    if num_records < 1:
        raise PrivacyError(f"a site needs at least one training record; found {num_records}.")
    sample_rate = min(1.0, batch_size / num_records)
    if local_steps > 0:
        return sample_rate, local_steps * rounds
    steps_per_epoch = max(1, round(1 / sample_rate))
    return sample_rate, steps_per_epoch * epochs_per_round * rounds


def epsilon_spent(history: Iterable[DPStep], *, delta: float, accountant: str) -> float:
    """ε after every step in ``history`` at the given ``delta`` (0.0 for an empty history)."""
    steps = [s for s in history if s.steps > 0]
    if not steps:
        return 0.0
    if accountant == "rdp":
        total = np.zeros(len(RDP_ORDERS))
        for s in steps:
            total += s.steps * np.asarray(_rdp_per_step(s.noise_multiplier, s.sample_rate))
        eps, _ = rdp_analysis.get_privacy_spent(orders=list(RDP_ORDERS), rdp=total, delta=delta)
        return float(eps)
    acc = create_accountant(mechanism=accountant)
    acc.history = [(s.noise_multiplier, s.sample_rate, s.steps) for s in steps]
    return float(acc.get_epsilon(delta=delta))


def calibrate_noise(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    history: Sequence[DPStep] = (),
) -> float:
    """The smallest noise multiplier (to 0.2 %) that keeps ``history`` + ``steps`` within the target.

    Raises :class:`PrivacyError` when no finite noise can meet the target (the budget is too
    small for this many steps, or already spent by ``history``).
    """
    if target_epsilon <= 0 or not 0 < target_delta < 1:
        raise PrivacyError(
            f"target must have epsilon > 0 and 0 < delta < 1; found ({target_epsilon}, {target_delta})."
        )
    if history:
        spent = epsilon_spent(history, delta=target_delta, accountant=accountant)
        if spent >= target_epsilon:
            raise PrivacyError(
                f"the privacy budget is spent: epsilon {spent:.4g} of {target_epsilon:.4g} at "
                f"delta {target_delta:g}. No further training is possible under this target."
            )
    sigma = _search(
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        sample_rate=sample_rate,
        steps=steps,
        accountant=accountant,
        history=history,
    )
    planned = [*history, DPStep(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)]
    achieved = epsilon_spent(planned, delta=target_delta, accountant=accountant)
    if (
        achieved > target_epsilon
    ):  # the search guarantees this never happens; fail loudly if it does
        raise PrivacyError(
            f"calibrated noise {sigma:.4g} gives epsilon {achieved:.6g} above the target "
            f"{target_epsilon:.6g}; refusing to train."
        )
    return sigma


def _search(
    *,
    target_epsilon: float,
    target_delta: float,
    sample_rate: float,
    steps: int,
    accountant: str,
    history: Sequence[DPStep],
) -> float:
    def eps(sigma: float) -> float:
        planned = [*history, DPStep(noise_multiplier=sigma, sample_rate=sample_rate, steps=steps)]
        return epsilon_spent(planned, delta=target_delta, accountant=accountant)

    # Bisection on σ (ε decreases monotonically in σ) to 0.2 % of σ; the result is the upper
    # end, so the target always holds.
    low, high = 0.0, 1.0
    while eps(high) > target_epsilon:
        low, high = high, 2 * high
        if high > 1e4:
            raise PrivacyError(
                f"no noise level keeps epsilon within {target_epsilon:g} at delta {target_delta:g} "
                f"over {steps} steps at sampling rate {sample_rate:.4g}"
                + (" after the steps already taken" if history else "")
                + ". Plan fewer rounds or epochs, a smaller batch size, or a larger budget."
            )
    while high - low > 2e-3 * high:
        mid = (low + high) / 2
        if eps(mid) > target_epsilon:
            low = mid
        else:
            high = mid
    return high
