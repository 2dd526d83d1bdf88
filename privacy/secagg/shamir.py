"""Shamir secret sharing (Shamir 1979) over the prime field GF(2^521 - 1).

The modulus is the Mersenne prime M521 = 2^521 - 1 (the field of NIST P-521), large enough to
hold a 32-byte seed as a single field element, so no chunking is needed. A secret s is the
constant term of a random polynomial f of degree ``threshold - 1`` whose other coefficients are
uniform in the field (drawn by rejection from 521 random bits: no bias); the holder with site id x
receives f(x). Any ``threshold`` shares give s by Lagrange interpolation at 0; fewer give no
information about s. Shares are 66-byte big-endian integers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Final

from .keys import RandomBytes

__all__ = ["PRIME", "SHARE_BYTES", "combine_shares", "split_secret"]

PRIME: Final = (1 << 521) - 1
SHARE_BYTES: Final = 66


def split_secret(
    secret: bytes, *, threshold: int, holders: Sequence[int], random_bytes: RandomBytes
) -> dict[int, bytes]:
    """Split ``secret`` (at most 65 bytes) into one share per holder id (ids in 1..p-1)."""
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold must be in 1..{len(holders)}. Found {threshold}.")
    if len(set(holders)) != len(holders) or any(not 0 < x < PRIME for x in holders):
        raise ValueError(f"holder ids must be distinct and in 1..p-1. Found {list(holders)}.")
    value = int.from_bytes(secret, "big")
    if value >= PRIME:
        raise ValueError(f"secret of {len(secret)} bytes does not fit the field.")
    coefficients = [value] + [_random_element(random_bytes) for _ in range(threshold - 1)]
    return {x: _evaluate(coefficients, x).to_bytes(SHARE_BYTES, "big") for x in holders}


def combine_shares(shares: Mapping[int, bytes], *, threshold: int, secret_bytes: int) -> bytes:
    """Recover a secret from at least ``threshold`` shares (holder id → share).

    Uses the ``threshold`` shares of the lowest holder ids. Raises ``ValueError`` if there are
    too few shares, a share is malformed, or the result does not fit ``secret_bytes`` (which
    means a share was corrupt).
    """
    if len(shares) < threshold:
        raise ValueError(f"need {threshold} shares, got {len(shares)}.")
    points: list[tuple[int, int]] = []
    for x in sorted(shares)[:threshold]:
        share = shares[x]
        y = int.from_bytes(share, "big")
        if len(share) != SHARE_BYTES or y >= PRIME or not 0 < x < PRIME:
            raise ValueError(f"share of holder {x} is malformed.")
        points.append((x, y))
    secret = 0
    for j, (x_j, y_j) in enumerate(points):
        numerator, denominator = 1, 1
        for m, (x_m, _) in enumerate(points):
            if m != j:
                numerator = numerator * x_m % PRIME
                denominator = denominator * (x_m - x_j) % PRIME
        secret = (secret + y_j * numerator * pow(denominator, -1, PRIME)) % PRIME
    if secret.bit_length() > 8 * secret_bytes:
        raise ValueError("shares do not interpolate to a secret of the expected size.")
    return secret.to_bytes(secret_bytes, "big")


def _evaluate(coefficients: Sequence[int], x: int) -> int:
    result = 0
    for coefficient in reversed(coefficients):  # Horner's rule
        result = (result * x + coefficient) % PRIME
    return result


def _random_element(random_bytes: RandomBytes) -> int:
    while True:
        candidate = int.from_bytes(random_bytes(SHARE_BYTES), "big") & PRIME  # 521 low bits
        if candidate < PRIME:
            return candidate
