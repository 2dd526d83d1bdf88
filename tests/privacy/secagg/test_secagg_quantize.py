"""Quantization: range accounting (never a silent clip), no overflow, settings validation."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinfed.errors import ConfigError, PrivacyError
from clinfed.privacy.secagg import QuantizationRangeError, SecAggConfig, quantize
from clinfed.privacy.secagg.quantize import dequantize


def _zeros(n: int) -> bytes:
    return bytes(n)


def test_out_of_range_values_are_clipped_and_counted() -> None:
    # Arrange: 3 of 6 weighted values leave [-1, 1]
    config = SecAggConfig(clip_range=1.0, rounding="deterministic")
    update = np.array([0.5, -0.5, 1.5, -3.0, 2.0, 0.0], dtype=np.float32)

    # Act
    quantized = quantize(update, weight=1.0, config=config, random_bytes=_zeros)

    # Assert
    assert quantized.out_of_range == 3
    np.testing.assert_allclose(
        dequantize(quantized.values, config=config), [0.5, -0.5, 1.0, -1.0, 1.0, 0.0], atol=1e-7
    )


def test_out_of_range_values_can_fail_the_update() -> None:
    config = SecAggConfig(clip_range=1.0, on_out_of_range="raise")
    update = np.array([0.5, 1.5], dtype=np.float32)

    with pytest.raises(QuantizationRangeError, match=r"1 of 2 weighted values lie outside"):
        quantize(update, weight=1.0, config=config, random_bytes=_zeros)


def test_non_finite_values_are_refused_whatever_the_policy() -> None:
    update = np.array([0.5, np.nan, np.inf], dtype=np.float32)

    with pytest.raises(QuantizationRangeError, match=r"2 non-finite values") as caught:
        quantize(update, weight=1.0, config=SecAggConfig(), random_bytes=_zeros)
    assert isinstance(caught.value, PrivacyError)


def test_server_learns_the_total_out_of_range_count(make_federation: Any) -> None:
    # Arrange: site 1 has 2 values outside the range, site 2 has 1, site 3 none
    federation = make_federation(3, SecAggConfig(clip_range=1.0), seed=41)
    updates = {
        1: np.array([2.0, -2.0, 0.1], dtype=np.float32),
        2: np.array([0.1, 5.0, 0.1], dtype=np.float32),
        3: np.array([0.1, 0.1, 0.1], dtype=np.float32),
    }

    # Act
    result = federation.run_round(1, updates, dict.fromkeys(updates, 1.0))

    # Assert
    assert result.out_of_range == 3
    np.testing.assert_allclose(result.total, [1.2, 0.1, 0.3], atol=1e-6)


@settings(max_examples=50, deadline=None)
@given(
    bits=st.integers(8, 64),
    max_sites=st.integers(2, 30),
    sign=st.sampled_from([-1.0, 1.0]),
)
def test_sum_of_max_sites_extreme_values_never_wraps(
    bits: int, max_sites: int, sign: float
) -> None:
    # Arrange: every site at the edge of the range, the worst case for overflow
    config = SecAggConfig(bits=bits, max_sites=max_sites, clip_range=2.5)
    if config.level < 1:
        return
    quantized = quantize(np.array([sign * 2.5]), weight=1.0, config=config, random_bytes=_zeros)
    modulus = 1 << bits

    # Act
    total = np.array([int(quantized.values[0]) * max_sites % modulus], dtype=np.uint64)

    # Assert: decodes to max_sites x the edge value, with the sign intact
    decoded = dequantize(total.astype(quantized.values.dtype), config=config)
    np.testing.assert_allclose(decoded, [sign * 2.5 * max_sites], rtol=1e-6)


def test_stochastic_rounding_is_unbiased() -> None:
    # Arrange: a value a third of the way between two steps
    config = SecAggConfig(bits=8, max_sites=2, clip_range=1.0)  # level 63, step 1/63
    value = np.full(200_000, (10 + 1 / 3) / config.scale)

    # Act
    quantized = quantize(
        value, weight=1.0, config=config, random_bytes=np.random.default_rng(0).bytes
    )

    # Assert
    mean = dequantize(quantized.values, config=config).astype(np.float64).mean()
    assert abs(mean * config.scale - (10 + 1 / 3)) < 0.01


@pytest.mark.parametrize(
    ("settings_", "problem"),
    [
        ({"bits": 4}, "`bits` must be an integer in 8..64"),
        ({"bits": 32.0}, "`bits` must be an integer in 8..64"),
        ({"clip_range": 0.0}, "`clip_range` must be a finite number > 0"),
        ({"clip_range": float("inf")}, "`clip_range` must be a finite number > 0"),
        ({"max_sites": 1}, "`max_sites` must be an integer in 2..65535"),
        ({"threshold": 1}, "`threshold` must be null or an integer in 2..max_sites"),
        ({"mode": "triple"}, "`mode` must be one of pairwise, double"),
        ({"bits": 8, "max_sites": 200}, "leaves no quantization levels"),
    ],
)
def test_invalid_settings_raise_config_errors(settings_: dict[str, Any], problem: str) -> None:
    with pytest.raises(ConfigError, match=r"^secagg ") as caught:
        SecAggConfig(**settings_)
    assert problem in str(caught.value)


def test_threshold_defaults_to_a_majority_of_at_least_two() -> None:
    config = SecAggConfig()

    assert [config.threshold_for(n) for n in (2, 3, 4, 5, 10, 30)] == [2, 2, 3, 3, 6, 16]
    assert SecAggConfig(threshold=4).threshold_for(10) == 4
