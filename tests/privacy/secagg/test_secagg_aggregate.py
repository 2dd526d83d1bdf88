"""The secure aggregate equals the plain weighted sum within the stated quantization bound."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from clinfed.privacy.secagg import SecAggConfig, quantization_error_bound
from clinfed.privacy.secagg.quantize import dequantize, quantize

MAX_EXAMPLES_PER_SITE = 10_000  # public upper bound on a site's example count


@settings(max_examples=60, deadline=None)
@given(
    num_sites=st.integers(2, 10),
    num_params=st.integers(1, 40),
    mode=st.sampled_from(["pairwise", "double"]),
    rounding=st.sampled_from(["stochastic", "deterministic"]),
    bits=st.sampled_from([20, 32, 64]),
    data=st.data(),
)
def test_secure_sum_matches_plain_weighted_sum_within_bound(
    make_federation: Any,
    num_sites: int,
    num_params: int,
    mode: str,
    rounding: str,
    bits: int,
    data: st.DataObject,
) -> None:
    # Arrange: float32 updates in [-1, 1], example counts as weights, some sites dropping
    config = SecAggConfig(mode=mode, rounding=rounding, bits=bits, clip_range=1.0, max_sites=10)
    federation = make_federation(num_sites, config, seed=data.draw(st.integers(0, 2**16)))
    ids = list(federation.sites)
    update_strategy = hnp.arrays(
        np.float32, num_params, elements=st.floats(-1, 1, width=32, allow_subnormal=False)
    )
    updates = {i: data.draw(update_strategy) for i in ids}
    counts = {i: data.draw(st.integers(1, MAX_EXAMPLES_PER_SITE)) for i in ids}
    weights = {i: counts[i] / MAX_EXAMPLES_PER_SITE for i in ids}
    threshold = config.threshold_for(num_sites)
    dropped = data.draw(st.sets(st.sampled_from(ids), max_size=num_sites - threshold))
    senders = [i for i in ids if i not in dropped]

    # Act
    result = federation.run_round(1, updates, weights, senders=senders)

    # Assert: correctly rounded weighted sum over the survivors vs the secure float32 total
    products = [updates[i].astype(np.float64) * weights[i] for i in senders]
    exact = np.array([math.fsum(column) for column in zip(*products, strict=True)])
    bound = quantization_error_bound(config, num_sites=len(senders))
    tolerance = bound + 2.0**-24 * (np.abs(exact) + bound) + 2.0**-149
    assert result.contributors == tuple(senders)
    assert result.dropped == tuple(sorted(dropped))
    assert result.out_of_range == 0
    assert result.total.dtype == np.float32
    assert np.all(np.abs(result.total.astype(np.float64) - exact) <= tolerance)
    expected_exchanges = 1 if mode == "pairwise" and not dropped else 2
    assert result.exchanges == expected_exchanges


def test_survivor_sum_is_exactly_the_sum_of_quantized_vectors(make_federation: Any) -> None:
    # Arrange: deterministic rounding, so each site's quantized vector is known here
    config = SecAggConfig(rounding="deterministic", clip_range=4.0)
    federation = make_federation(3, config, seed=5)
    rng = np.random.default_rng(5)
    updates = {i: rng.normal(0, 1, 1000).astype(np.float32) for i in (1, 2, 3)}
    weights = {1: 0.5, 2: 1.0, 3: 0.25}

    # Act: site 3 drops after keys were shared
    result = federation.run_round(1, updates, weights, senders=[1, 2])

    # Assert: bit-exact equality with the dequantized sum of the two quantized vectors
    quantized = [
        quantize(
            updates[i],
            weight=weights[i],
            config=config,
            random_bytes=make_federation.seeded_random_bytes(0),
        )
        for i in (1, 2)
    ]
    ring_sum = (quantized[0].values + quantized[1].values) & np.uint32(0xFFFFFFFF)
    np.testing.assert_array_equal(result.total, dequantize(ring_sum, config=config))


def test_many_rounds_reuse_the_keys_of_one_setup(make_federation: Any) -> None:
    # Arrange
    config = SecAggConfig()
    federation = make_federation(4, config, seed=9)
    rng = np.random.default_rng(9)
    weights = dict.fromkeys(federation.sites, 1.0)

    for round_id in range(1, 6):
        updates = {i: rng.uniform(-0.2, 0.2, 50).astype(np.float32) for i in federation.sites}

        # Act
        result = federation.run_round(round_id, updates, weights)

        # Assert
        exact = sum(u.astype(np.float64) for u in updates.values())
        np.testing.assert_allclose(result.total, exact, atol=1e-6)
        assert result.exchanges == 1
