"""Dropouts, aborts, deadlines and single-use round keys with three sites."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from clinfed.errors import PrivacyError, ProtocolError
from clinfed.privacy.secagg import (
    MaskReuseError,
    RoundRequest,
    SecAggAbortedError,
    SecAggConfig,
    quantize,
)

MODES = ["pairwise", "double"]
NUM_PARAMS = 64


def _updates(seed: int = 0) -> dict[int, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {i: rng.uniform(-0.5, 0.5, NUM_PARAMS).astype(np.float32) for i in (1, 2, 3)}


WEIGHTS = {1: 1.0, 2: 0.5, 3: 0.25}


@pytest.mark.parametrize("mode", MODES)
def test_one_site_dropping_after_key_setup_gives_the_survivors_exact_sum(
    make_federation: Any, mode: str
) -> None:
    # Arrange
    federation = make_federation(3, SecAggConfig(mode=mode), seed=1)
    updates = _updates()

    # Act: site 3 is sampled but never sends its masked vector
    result = federation.run_round(1, updates, WEIGHTS, senders=[1, 2])

    # Assert
    exact = updates[1] * 1.0 + updates[2].astype(np.float64) * 0.5
    np.testing.assert_allclose(result.total, exact, atol=1e-6)
    assert result.contributors == (1, 2)
    assert result.dropped == (3,)
    assert result.exchanges == 2


@pytest.mark.parametrize("mode", MODES)
def test_site_absent_at_round_start_is_left_out_of_the_round(
    make_federation: Any, mode: str
) -> None:
    # Arrange
    federation = make_federation(3, SecAggConfig(mode=mode), seed=2)
    updates = _updates()

    # Act: the server opens the round over the two sites that are online
    result = federation.run_round(1, updates, WEIGHTS, participants=[1, 2])

    # Assert
    exact = updates[1] * 1.0 + updates[2].astype(np.float64) * 0.5
    np.testing.assert_allclose(result.total, exact, atol=1e-6)
    assert result.contributors == (1, 2)
    assert result.dropped == ()
    assert result.exchanges == (1 if mode == "pairwise" else 2)


@pytest.mark.parametrize("mode", MODES)
def test_two_of_three_sites_dropping_aborts_the_round_naming_them(
    make_federation: Any, mode: str
) -> None:
    # Arrange
    federation = make_federation(3, SecAggConfig(mode=mode), seed=3)
    round_ = federation.open_round(1, NUM_PARAMS)
    round_.add_masked_input(federation.mask(1, round_, _updates()[1], 1.0), sender=1)

    # Act / Assert
    with pytest.raises(SecAggAbortedError, match=r"missing: \[2, 3\]") as caught:
        round_.close(now_ms=federation.AFTER_DEADLINE_MS)
    assert caught.value.missing == (2, 3)
    assert isinstance(caught.value, PrivacyError)


def test_round_with_too_few_online_sites_is_refused_at_start(make_federation: Any) -> None:
    # Arrange
    federation = make_federation(3, SecAggConfig(), seed=4)

    # Act / Assert
    with pytest.raises(SecAggAbortedError) as caught:
        federation.open_round(1, NUM_PARAMS, participants=[1])
    assert caught.value.missing == (2, 3)


def test_survivor_silent_during_unmask_aborts_the_round(make_federation: Any) -> None:
    # Arrange: site 3 drops; site 2 then fails to answer the unmask request
    federation = make_federation(3, SecAggConfig(), seed=5)
    round_ = federation.open_round(1, NUM_PARAMS)
    for i in (1, 2):
        round_.add_masked_input(federation.mask(i, round_, _updates()[i], 1.0), sender=i)
    requests = round_.close(now_ms=federation.AFTER_DEADLINE_MS)
    federation.unmask_all(round_, requests, [1])

    # Act / Assert
    with pytest.raises(SecAggAbortedError, match=r"sites \[2\] did not answer") as caught:
        round_.result()
    assert caught.value.missing == (2,)


def test_double_mode_tolerates_a_silent_survivor_when_nobody_dropped(
    make_federation: Any,
) -> None:
    # Arrange: 4 sites, threshold 3; all send, one stays silent during unmasking
    federation = make_federation(4, SecAggConfig(mode="double"), seed=6)
    rng = np.random.default_rng(6)
    updates = {i: rng.uniform(-0.5, 0.5, NUM_PARAMS).astype(np.float32) for i in range(1, 5)}
    round_ = federation.open_round(1, NUM_PARAMS)
    for i in range(1, 5):
        round_.add_masked_input(federation.mask(i, round_, updates[i], 1.0), sender=i)
    requests = round_.close(now_ms=federation.BEFORE_DEADLINE_MS)

    # Act
    federation.unmask_all(round_, requests, [1, 2, 3])
    result = round_.result()

    # Assert: site 4's self-mask is rebuilt from the others' Shamir shares
    exact = sum(u.astype(np.float64) for u in updates.values())
    np.testing.assert_allclose(result.total, exact, atol=1e-6)
    assert result.contributors == (1, 2, 3, 4)


def test_pairwise_mode_refuses_to_recover_dropouts_before_the_deadline(
    make_federation: Any,
) -> None:
    # Arrange
    federation = make_federation(3, SecAggConfig(mode="pairwise"), seed=7)
    round_ = federation.open_round(1, NUM_PARAMS)
    for i in (1, 2):
        round_.add_masked_input(federation.mask(i, round_, _updates()[i], 1.0), sender=i)

    # Act / Assert: too early → refused; site 3 may still send; after that → recovered
    with pytest.raises(PrivacyError, match=r"before the round deadline"):
        round_.close(now_ms=federation.BEFORE_DEADLINE_MS)
    round_.add_masked_input(federation.mask(3, round_, _updates()[3], 1.0), sender=3)
    assert round_.close(now_ms=federation.BEFORE_DEADLINE_MS) == {}
    assert round_.result().contributors == (1, 2, 3)


def test_site_refuses_to_mask_after_the_deadline(make_federation: Any) -> None:
    # Arrange
    config = SecAggConfig()
    federation = make_federation(3, config, seed=8)
    round_ = federation.open_round(1, NUM_PARAMS)
    quantized = quantize(
        _updates()[1], weight=1.0, config=config, random_bytes=federation.random_bytes
    )

    # Act / Assert
    with pytest.raises(PrivacyError, match=r"site 1: the deadline of round 1 passed"):
        federation.sites[1].mask(round_.request, quantized, now_ms=federation.AFTER_DEADLINE_MS)
    assert federation.sites[1].last_masked_round == -1


@pytest.mark.parametrize("mode", MODES)
def test_round_keys_revealed_for_a_dropout_are_never_used_again(
    make_federation: Any, mode: str
) -> None:
    # Arrange: round 1 with site 3 late; survivors reveal their round-1 pair seeds with site 3
    config = SecAggConfig(mode=mode)
    federation = make_federation(3, config, seed=9)
    updates = _updates()
    round_ = federation.open_round(1, NUM_PARAMS)
    for i in (1, 2):
        round_.add_masked_input(federation.mask(i, round_, updates[i], 1.0), sender=i)
    late = federation.mask(3, round_, updates[3], 1.0)
    requests = round_.close(now_ms=federation.AFTER_DEADLINE_MS)
    federation.unmask_all(round_, requests, [1, 2])
    round_.result()
    replayed = RoundRequest.from_record(round_.request.to_record())

    # Act / Assert: a replayed round-1 request is refused by every site that used its keys
    for site_id in (1, 2, 3):
        quantized = quantize(
            updates[site_id], weight=1.0, config=config, random_bytes=federation.random_bytes
        )
        with pytest.raises(MaskReuseError, match=f"site {site_id}: already masked"):
            federation.sites[site_id].mask(replayed, quantized, now_ms=0)
    # ... and the late vector is not accepted into the finished round
    with pytest.raises(ProtocolError, match=r"site 3: masked input for round 1 arrived after"):
        round_.add_masked_input(late, sender=3)


def test_dropped_site_rejoins_the_next_round_without_new_keys(make_federation: Any) -> None:
    # Arrange: site 3 drops in round 1
    federation = make_federation(3, SecAggConfig(), seed=10)
    updates = _updates()
    federation.run_round(1, updates, WEIGHTS, senders=[1, 2])

    # Act: round 2 with everyone, same keys (only round-1 seeds were revealed)
    result = federation.run_round(2, updates, WEIGHTS)

    # Assert
    exact = sum(updates[i].astype(np.float64) * WEIGHTS[i] for i in (1, 2, 3))
    np.testing.assert_allclose(result.total, exact, atol=1e-6)
    assert result.exchanges == 1


def test_rotated_keys_invalidate_round_requests_with_the_old_keys(make_federation: Any) -> None:
    # Arrange: the server opened round 1, then site 2 rotates its keys
    config = SecAggConfig()
    federation = make_federation(3, config, seed=11)
    round_ = federation.open_round(1, NUM_PARAMS)
    federation.advertise(2)
    quantized = quantize(
        _updates()[2], weight=1.0, config=config, random_bytes=federation.random_bytes
    )

    # Act / Assert
    with pytest.raises(ProtocolError, match=r"site 2: round request 1 lists key epoch 1"):
        federation.sites[2].mask(round_.request, quantized, now_ms=0)
    result = federation.run_round(2, _updates(), WEIGHTS)
    assert result.contributors == (1, 2, 3)


def test_site_rejects_a_peer_key_swap_without_a_new_epoch(make_federation: Any) -> None:
    # Arrange: site 1 has seen site 2's keys in round 1
    config = SecAggConfig()
    federation = make_federation(3, config, seed=12)
    federation.run_round(1, _updates(), WEIGHTS)
    round_ = federation.open_round(2, NUM_PARAMS)
    record = round_.request.to_record()
    record["secagg.mask-pks"] = [
        record["secagg.mask-pks"][0],  # type: ignore[index]
        bytes(range(9, 41)),
        record["secagg.mask-pks"][2],  # type: ignore[index]
    ]
    swapped = RoundRequest.from_record(record)
    quantized = quantize(
        _updates()[1], weight=1.0, config=config, random_bytes=federation.random_bytes
    )

    # Act / Assert
    with pytest.raises(ProtocolError, match=r"site 1: .*changes the keys of site 2"):
        federation.sites[1].mask(swapped, quantized, now_ms=0)


def test_site_state_survives_export_and_restore(make_federation: Any) -> None:
    # Arrange: site 1 masks round 1, then its process ends (Flower starts one per message)
    config = SecAggConfig(mode="double")
    federation = make_federation(3, config, seed=13)
    updates = _updates()
    round_ = federation.open_round(1, NUM_PARAMS)
    for i in (1, 2):
        round_.add_masked_input(federation.mask(i, round_, updates[i], 1.0), sender=i)
    state = federation.sites[1].export_state()
    federation.sites[1] = type(federation.sites[1]).from_state(
        state, config=config, random_bytes=federation.random_bytes
    )

    # Act
    requests = round_.close(now_ms=federation.AFTER_DEADLINE_MS)
    federation.unmask_all(round_, requests, [1, 2])
    result = round_.result()

    # Assert
    exact = updates[1].astype(np.float64) + updates[2]
    np.testing.assert_allclose(result.total, exact, atol=1e-6)
    with pytest.raises(MaskReuseError):
        federation.mask(1, round_, updates[1], 1.0)
