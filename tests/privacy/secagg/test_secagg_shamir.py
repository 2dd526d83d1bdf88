"""Shamir secret sharing over GF(2^521 - 1), and the package's public surface."""

from __future__ import annotations

import importlib
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinfed.privacy.secagg.shamir import PRIME, SHARE_BYTES, combine_shares, split_secret


@settings(max_examples=100, deadline=None)
@given(
    secret=st.binary(min_size=32, max_size=32),
    holders=st.sets(st.integers(1, 65_535), min_size=2, max_size=30),
    data=st.data(),
)
def test_any_threshold_subset_recovers_the_secret(
    secret: bytes, holders: set[int], data: st.DataObject
) -> None:
    # Arrange
    ordered = sorted(holders)
    threshold = data.draw(st.integers(1, len(ordered)))
    shares = split_secret(
        secret, threshold=threshold, holders=ordered, random_bytes=random.Random(0).randbytes
    )
    subset = data.draw(st.sets(st.sampled_from(ordered), min_size=threshold))

    # Act
    recovered = combine_shares({x: shares[x] for x in subset}, threshold=threshold, secret_bytes=32)

    # Assert
    assert recovered == secret
    assert all(len(share) == SHARE_BYTES for share in shares.values())


def test_fewer_than_threshold_shares_are_refused() -> None:
    shares = split_secret(
        bytes(32), threshold=3, holders=[1, 2, 3], random_bytes=random.Random(1).randbytes
    )

    with pytest.raises(ValueError, match="need 3 shares, got 2"):
        combine_shares({1: shares[1], 2: shares[2]}, threshold=3, secret_bytes=32)


def test_a_corrupt_share_is_detected_by_the_secret_size() -> None:
    shares = split_secret(
        bytes(32), threshold=2, holders=[1, 2], random_bytes=random.Random(2).randbytes
    )
    corrupt = {1: shares[1], 2: (int.from_bytes(shares[2], "big") ^ 1 << 300).to_bytes(66, "big")}

    with pytest.raises(ValueError, match="expected size"):
        combine_shares(corrupt, threshold=2, secret_bytes=32)


def test_field_is_the_mersenne_prime_m521() -> None:
    assert PRIME == 2**521 - 1
    assert pow(3, PRIME - 1, PRIME) == 1  # Fermat check (M521 is a known Mersenne prime)


def test_every_public_name_resolves() -> None:
    package = importlib.import_module("clinfed.privacy.secagg")

    for name in package.__all__:
        assert getattr(package, name) is not None
