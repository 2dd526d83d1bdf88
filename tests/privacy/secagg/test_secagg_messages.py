"""Wire format, strict parsing, and the protocol errors for malformed, replayed, duplicate or
out-of-place messages — each a ProtocolError whose one-line message names the site."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from flwr.app import ConfigRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from clinfed.errors import ProtocolError
from clinfed.privacy.secagg import (
    KeyAdvertisement,
    MaskedInput,
    RoundRequest,
    SecAggConfig,
    SecAggRound,
    SetupRequest,
    UnmaskRequest,
    UnmaskResponse,
    quantize,
)

NUM_PARAMS = 16
MESSAGE_TYPES: list[Any] = [
    SetupRequest,
    KeyAdvertisement,
    RoundRequest,
    MaskedInput,
    UnmaskRequest,
    UnmaskResponse,
]


def _update(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-0.5, 0.5, NUM_PARAMS).astype(np.float32)


def _round_with_dropout(federation: Any) -> tuple[SecAggRound, dict[int, Any], dict[int, Any]]:
    """Round 1 over sites 1-3 where site 3 drops; returns the round, inputs and unmask requests."""
    round_ = federation.open_round(1, NUM_PARAMS)
    inputs = {i: federation.mask(i, round_, _update(i), 1.0) for i in (1, 2)}
    for i, message in inputs.items():
        round_.add_masked_input(message, sender=i)
    requests = round_.close(now_ms=federation.AFTER_DEADLINE_MS)
    return round_, inputs, requests


@pytest.fixture
def double_transcript(make_federation: Any) -> list[Any]:
    """One message of each type, from a double-mode round where site 3 dropped."""
    federation = make_federation(3, SecAggConfig(mode="double"), seed=21)
    setup = federation.server.setup_request(1)
    advert = federation.sites[1].advertise_keys(setup)
    federation.server.add_key_advertisement(advert, sender=1)
    round_, inputs, requests = _round_with_dropout(federation)
    response = federation.sites[1].unmask(requests[1])
    return [setup, advert, round_.request, inputs[1], requests[1], response]


def test_every_message_round_trips_through_a_flower_config_record(
    double_transcript: list[Any],
) -> None:
    for message in double_transcript:
        # Act
        record = ConfigRecord(message.to_record())
        parsed = type(message).from_record(record)

        # Assert
        assert parsed == message


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_parsing_random_mutations_raises_only_protocol_errors(data: st.DataObject) -> None:
    # Arrange: a valid masked input, then one random mutation of its record
    valid = MaskedInput(run_id=7, round_id=3, site_id=2, vector=bytes(8)).to_record()
    record: dict[str, object] = dict(valid)
    key = data.draw(st.sampled_from([*sorted(record), "secagg.unknown"]))
    junk = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**70), 2**70),
        st.floats(),
        st.text(max_size=5),
        st.binary(max_size=40),
        st.lists(st.integers(-5, 70_000), max_size=4),
        st.lists(st.binary(max_size=100), max_size=4),
    )
    if data.draw(st.booleans()) and key in record:
        del record[key]
    else:
        record[key] = data.draw(junk)

    # Act / Assert: either still a valid message, or a one-line ProtocolError
    try:
        MaskedInput.from_record(record)
    except ProtocolError as error:
        assert "\n" not in str(error)
        assert str(error).startswith(("site ", "secagg masked input"))


@settings(max_examples=200, deadline=None)
@given(
    message_type=st.sampled_from(MESSAGE_TYPES),
    record=st.dictionaries(
        st.sampled_from(["secagg.type", "secagg.run", "secagg.site", "secagg.round", "x"]),
        st.one_of(st.integers(-3, 7), st.binary(max_size=9), st.lists(st.integers(0, 3))),
    ),
)
def test_parsing_arbitrary_records_raises_only_protocol_errors(
    message_type: Any, record: dict[str, object]
) -> None:
    with pytest.raises(ProtocolError):
        message_type.from_record(record)


@pytest.mark.parametrize(
    ("key", "value", "problem"),
    [
        ("secagg.round", True, "`secagg.round` of type bool"),
        ("secagg.vector", "abc", "`secagg.vector` of type str"),
        ("secagg.run", b"\x00" * 7, "`secagg.run` b'"),
        ("secagg.share-sites", [3, 1], "distinct ids in sorted order"),
        ("secagg.shares", [b"x"], "has 1 `encrypted_shares` for 0 sites"),
        ("secagg.extra", 1, "unknown keys ['secagg.extra']"),
    ],
)
def test_malformed_masked_input_names_the_site_and_the_field(
    key: str, value: object, problem: str
) -> None:
    # Arrange
    record: dict[str, object] = dict(
        MaskedInput(run_id=7, round_id=3, site_id=2, vector=bytes(8)).to_record()
    )
    record[key] = value

    # Act / Assert
    with pytest.raises(ProtocolError, match=r"^site 2: masked input") as caught:
        MaskedInput.from_record(record)
    assert problem in str(caught.value)


def test_server_rejects_duplicate_replayed_foreign_and_truncated_inputs(
    make_federation: Any,
) -> None:
    # Arrange: round 1 completes; round 2 is open
    federation = make_federation(3, SecAggConfig(), seed=22)
    round1 = federation.open_round(1, NUM_PARAMS)
    first = {i: federation.mask(i, round1, _update(i), 1.0) for i in (1, 2, 3)}
    for i, message in first.items():
        round1.add_masked_input(message, sender=i)
    round2 = federation.open_round(2, NUM_PARAMS)
    fresh = federation.mask(1, round2, _update(1), 1.0)
    round2.add_masked_input(fresh, sender=1)
    truncated = MaskedInput(
        run_id=fresh.run_id,
        round_id=2,
        site_id=2,
        vector=federation.mask(2, round2, _update(2), 1.0).vector[:-4],
    )
    other_run = MaskedInput(run_id=1, round_id=2, site_id=3, vector=fresh.vector)
    stranger = MaskedInput(run_id=fresh.run_id, round_id=2, site_id=9, vector=fresh.vector)

    # Act / Assert
    cases = [
        (fresh, 1, "site 1: already sent its masked input for round 2 (duplicate)"),
        (first[2], 2, "site 2: masked input is for round 1, expected round 2"),
        (fresh, 2, "site 2: masked input claims to come from site 1"),
        (truncated, 2, "site 2: masked vector has 64 bytes; expected 68"),
        (other_run, 3, "site 3: masked input is for run 1"),
        (stranger, 9, "site 9: is not a participant of round 2"),
    ]
    for message, sender, expected in cases:
        with pytest.raises(ProtocolError) as caught:
            round2.add_masked_input(message, sender=sender)
        assert str(caught.value).startswith(expected), str(caught.value)
    assert round2.awaiting == (2, 3)


def test_server_rejects_duplicate_and_misplaced_unmask_responses(make_federation: Any) -> None:
    # Arrange
    federation = make_federation(3, SecAggConfig(), seed=23)
    round_, _, requests = _round_with_dropout(federation)
    response = federation.sites[1].unmask(requests[1])
    round_.add_unmask_response(response, sender=1)
    wrong_round = UnmaskResponse(
        run_id=response.run_id,
        round_id=5,
        site_id=2,
        pair_sites=response.pair_sites,
        pair_seeds=response.pair_seeds,
    )
    hides_a_pair = UnmaskResponse(run_id=response.run_id, round_id=1, site_id=2)

    # Act / Assert
    with pytest.raises(ProtocolError, match=r"^site 1: already answered .* \(duplicate\)"):
        round_.add_unmask_response(response, sender=1)
    with pytest.raises(ProtocolError, match=r"^site 2: unmask response is for round 5"):
        round_.add_unmask_response(wrong_round, sender=2)
    with pytest.raises(ProtocolError, match=r"^site 2: unmask response reveals pair seeds for"):
        round_.add_unmask_response(hides_a_pair, sender=2)
    with pytest.raises(ProtocolError, match=r"^site 3: was not asked to unmask round 1"):
        round_.add_unmask_response(
            UnmaskResponse(run_id=response.run_id, round_id=1, site_id=3), sender=3
        )


def test_site_answers_one_unmask_request_per_round(make_federation: Any) -> None:
    # Arrange
    federation = make_federation(3, SecAggConfig(mode="double"), seed=24)
    _, _, requests = _round_with_dropout(federation)
    federation.sites[1].unmask(requests[1])

    # Act / Assert: a second request (e.g. naming site 3 a survivor) is refused
    with pytest.raises(ProtocolError, match=r"^site 1: already answered the unmask request"):
        federation.sites[1].unmask(requests[1])


def test_site_refuses_to_unmask_a_sum_below_the_threshold(make_federation: Any) -> None:
    # Arrange: the server claims sites 2 and 3 dropped, leaving site 1 alone
    federation = make_federation(3, SecAggConfig(), seed=25)
    _, _, requests = _round_with_dropout(federation)
    lonely = UnmaskRequest(
        run_id=requests[1].run_id, round_id=1, site_id=1, survivors=(1,), dropped=(2, 3)
    )

    # Act / Assert
    with pytest.raises(ProtocolError, match=r"^site 1: .*fewer than the round's threshold 2"):
        federation.sites[1].unmask(lonely)


def test_site_detects_a_tampered_self_mask_share(make_federation: Any) -> None:
    # Arrange: the server flips one byte of the share site 2 addressed to site 1
    federation = make_federation(3, SecAggConfig(mode="double"), seed=26)
    _, _, requests = _round_with_dropout(federation)
    record = requests[1].to_record()
    share = bytearray(record["secagg.shares"][0])  # type: ignore[index]
    share[20] ^= 1
    record["secagg.shares"] = [bytes(share)]
    tampered = UnmaskRequest.from_record(record)

    # Act / Assert
    with pytest.raises(ProtocolError, match=r"^site 1: the self-mask share from site 2"):
        federation.sites[1].unmask(tampered)


def test_site_rejects_a_round_request_with_other_settings(make_federation: Any) -> None:
    # Arrange: the server runs with bits=32, this site was configured with bits=24
    federation = make_federation(3, SecAggConfig(bits=32), seed=27)
    round_ = federation.open_round(1, NUM_PARAMS)
    local_config = SecAggConfig(bits=24)
    site = type(federation.sites[1])(run_id=federation.RUN_ID, site_id=1, config=local_config)
    update = quantize(_update(1), weight=1.0, config=local_config, random_bytes=bytes)

    # Act / Assert
    with pytest.raises(ProtocolError, match=r"^site 1: .*different secagg settings"):
        site.mask(round_.request, update, now_ms=0)


def test_server_rejects_replayed_and_forged_key_advertisements(make_federation: Any) -> None:
    # Arrange
    federation = make_federation(3, SecAggConfig(), seed=28)
    advert = federation.sites[2].advertise_keys(federation.server.setup_request(2))
    federation.server.add_key_advertisement(advert, sender=2)
    low_order = KeyAdvertisement(
        run_id=advert.run_id,
        site_id=3,
        epoch=5,
        mask_public_key=bytes(32),
        encryption_public_key=advert.encryption_public_key,
    )
    copycat = KeyAdvertisement(
        run_id=advert.run_id,
        site_id=3,
        epoch=5,
        mask_public_key=advert.mask_public_key,
        encryption_public_key=bytes(range(1, 33)),
    )

    # Act / Assert
    with pytest.raises(ProtocolError, match=r"^site 2: key advertisement has epoch 2, not newer"):
        federation.server.add_key_advertisement(advert, sender=2)
    with pytest.raises(ProtocolError, match=r"^site 3: mask public key is a low-order point"):
        federation.server.add_key_advertisement(low_order, sender=3)
    with pytest.raises(ProtocolError, match=r"^site 3: advertises a public key already registered"):
        federation.server.add_key_advertisement(copycat, sender=3)
