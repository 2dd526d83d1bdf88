"""A site's masked vector looks uniform over Z_{2^32} to anyone without the other sites' secrets.

All randomness is seeded, so the statistics are fixed numbers: the tests cannot flake. Each test
also checks its own power, by showing the same statistic rejects the unmasked quantized vector.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from scipy import stats

from clinfed.privacy.secagg import SecAggConfig, quantize

NUM_PARAMS = 1 << 18  # 1 MiB of masked vector at 32 bits
P_THRESHOLD = 1e-3


def _update() -> np.ndarray:
    # A realistic, very non-uniform update: small values around 0.
    return np.random.default_rng(31).normal(0.0, 0.01, NUM_PARAMS).astype(np.float32)


def _masked_words(federation: Any, site_id: int, round_id: int) -> np.ndarray:
    round_ = federation.open_round(round_id, NUM_PARAMS)
    message = federation.mask(site_id, round_, _update(), 1.0)
    return np.frombuffer(message.vector, dtype="<u4")


def _byte_chi2_pvalue(words: np.ndarray) -> float:
    counts = np.bincount(words.view(np.uint8), minlength=256)
    return float(stats.chisquare(counts).pvalue)


def _bit_chi2_pvalue(words: np.ndarray) -> float:
    """Each of the 32 bit positions is a fair coin: sum of squared z-scores ~ chi2(32)."""
    ones = np.array([np.count_nonzero((words >> np.uint32(k)) & np.uint32(1)) for k in range(32)])
    z = (ones - words.size / 2) / np.sqrt(words.size / 4)
    return float(stats.chi2.sf(np.sum(z**2), df=32))


@pytest.mark.parametrize("mode", ["pairwise", "double"])
def test_masked_vector_is_indistinguishable_from_uniform(make_federation: Any, mode: str) -> None:
    # Arrange
    config = SecAggConfig(mode=mode)
    federation = make_federation(3, config, seed=31)

    # Act
    words = _masked_words(federation, site_id=1, round_id=1)

    # Assert: byte histogram, per-bit balance, and KS on the values scaled to [0, 1)
    assert _byte_chi2_pvalue(words) > P_THRESHOLD
    assert _bit_chi2_pvalue(words) > P_THRESHOLD
    assert stats.kstest(words / 2.0**32, "uniform").pvalue > P_THRESHOLD


def test_the_same_statistics_reject_an_unmasked_update() -> None:
    # Arrange
    config = SecAggConfig()
    plain = quantize(_update(), weight=1.0, config=config, random_bytes=bytes).values

    # Act / Assert: each test rejects at the threshold the masked vector passes
    assert _byte_chi2_pvalue(plain) < P_THRESHOLD
    assert _bit_chi2_pvalue(plain) < P_THRESHOLD
    assert stats.kstest(plain / 2.0**32, "uniform").pvalue < P_THRESHOLD


def test_the_same_update_masks_differently_in_two_rounds(make_federation: Any) -> None:
    # Arrange
    federation = make_federation(3, SecAggConfig(), seed=32)

    # Act
    first = _masked_words(federation, site_id=2, round_id=1)
    second = _masked_words(federation, site_id=2, round_id=2)

    # Assert: about 2^-32 of positions coincide by chance; their difference is uniform too
    assert np.count_nonzero(first == second) <= 2
    assert _byte_chi2_pvalue(first - second) > P_THRESHOLD
