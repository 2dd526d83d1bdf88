"""Key agreement, key derivation and share encryption — thin wrappers over ``cryptography``.

Every secret used by the protocol is derived here with HKDF-SHA256 (RFC 5869) from an X25519
shared secret (RFC 7748) or a fresh random seed, under a distinct salt per purpose and an ``info``
that binds the run id, the round and the ordered site ids. Nothing here is a home-made primitive.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

__all__ = [
    "KEY_BYTES",
    "SEED_BYTES",
    "RandomBytes",
    "SiteKeys",
    "agree",
    "decrypt_share",
    "encrypt_share",
    "generate_site_keys",
    "pair_mask_seed",
    "public_key",
    "seed_commitment",
    "self_mask_seed",
    "share_key",
]

#: Source of randomness: ``os.urandom`` in production; tests pass a seeded generator.
RandomBytes = Callable[[int], bytes]

KEY_BYTES: Final = 32
SEED_BYTES: Final = 32
_NONCE_BYTES: Final = 12

_PAIR_SALT: Final = b"clinfed/secagg/v1/pair-mask"
_SELF_SALT: Final = b"clinfed/secagg/v1/self-mask"
_SHARE_SALT: Final = b"clinfed/secagg/v1/share-key"
_COMMIT_TAG: Final = b"clinfed/secagg/v1/self-seed-commitment"
_SHARE_AAD: Final = b"clinfed/secagg/v1/self-seed-share"


@dataclass(frozen=True, repr=False)
class SiteKeys:
    """A site's two X25519 key pairs of one key epoch (raw 32-byte private keys).

    ``mask_private`` agrees the pairwise mask secrets; ``encryption_private`` agrees the keys
    that encrypt Shamir shares to their recipient through the server. Never leaves the site.
    """

    epoch: int
    mask_private: bytes
    encryption_private: bytes

    @property
    def mask_public(self) -> bytes:
        return public_key(self.mask_private)

    @property
    def encryption_public(self) -> bytes:
        return public_key(self.encryption_private)

    def __repr__(self) -> str:
        return f"SiteKeys(epoch={self.epoch}, <private keys hidden>)"


def generate_site_keys(*, epoch: int, random_bytes: RandomBytes) -> SiteKeys:
    """Draw a fresh mask key pair and encryption key pair for key epoch ``epoch``."""
    return SiteKeys(
        epoch=epoch,
        mask_private=_private_key_bytes(random_bytes),
        encryption_private=_private_key_bytes(random_bytes),
    )


def public_key(private: bytes) -> bytes:
    """Raw X25519 public key of a raw private key."""
    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def agree(private: bytes, peer_public: bytes) -> bytes:
    """X25519 shared secret; raises ``ValueError`` for a malformed or low-order peer key."""
    peer = X25519PublicKey.from_public_bytes(peer_public)
    return X25519PrivateKey.from_private_bytes(private).exchange(peer)


def pair_mask_seed(
    shared_secret: bytes, *, run_id: int, round_id: int, site_a: int, site_b: int
) -> bytes:
    """Seed of the pair mask of two sites in one round.

    HKDF(shared secret, info = run id ‖ round ‖ lower id ‖ higher id). Revealing it (to recover
    a dropped site) reveals nothing about the pair's masks in any other round (HKDF is a PRF).
    """
    low, high = sorted((site_a, site_b))
    info = _u64(run_id) + _u64(round_id) + _u32(low) + _u32(high)
    return _hkdf(shared_secret, salt=_PAIR_SALT, info=info)


def self_mask_seed(seed: bytes, *, run_id: int, round_id: int, site_id: int) -> bytes:
    """Seed of a site's self-mask in one round, from the site's fresh per-round secret."""
    return _hkdf(seed, salt=_SELF_SALT, info=_u64(run_id) + _u64(round_id) + _u32(site_id))


def share_key(shared_secret: bytes, *, run_id: int, site_a: int, site_b: int) -> bytes:
    """AES-256-GCM key that two sites use to pass Shamir shares through the server."""
    low, high = sorted((site_a, site_b))
    return _hkdf(shared_secret, salt=_SHARE_SALT, info=_u64(run_id) + _u32(low) + _u32(high))


def seed_commitment(seed: bytes, *, run_id: int, round_id: int, site_id: int) -> bytes:
    """SHA-256 commitment to a 256-bit random seed (hiding because the seed is uniform)."""
    return hashlib.sha256(
        _COMMIT_TAG + _u64(run_id) + _u64(round_id) + _u32(site_id) + seed
    ).digest()


def encrypt_share(
    key: bytes,
    share: bytes,
    *,
    run_id: int,
    round_id: int,
    sender: int,
    recipient: int,
    random_bytes: RandomBytes,
) -> bytes:
    """AES-GCM encryption of one share; returns nonce ‖ ciphertext ‖ tag.

    The associated data binds run, round, sender and recipient, so the server can neither read
    a share nor replay it into another round or to another recipient.
    """
    nonce = random_bytes(_NONCE_BYTES)
    aad = _share_aad(run_id=run_id, round_id=round_id, sender=sender, recipient=recipient)
    return nonce + AESGCM(key).encrypt(nonce, share, aad)


def decrypt_share(
    key: bytes, blob: bytes, *, run_id: int, round_id: int, sender: int, recipient: int
) -> bytes:
    """Inverse of :func:`encrypt_share`; raises ``cryptography.exceptions.InvalidTag``."""
    aad = _share_aad(run_id=run_id, round_id=round_id, sender=sender, recipient=recipient)
    return AESGCM(key).decrypt(blob[:_NONCE_BYTES], blob[_NONCE_BYTES:], aad)


def _share_aad(*, run_id: int, round_id: int, sender: int, recipient: int) -> bytes:
    return _SHARE_AAD + _u64(run_id) + _u64(round_id) + _u32(sender) + _u32(recipient)


def _private_key_bytes(random_bytes: RandomBytes) -> bytes:
    raw = random_bytes(KEY_BYTES)
    if len(raw) != KEY_BYTES:
        raise ValueError(f"random_bytes({KEY_BYTES}) returned {len(raw)} bytes.")
    return raw


def _hkdf(ikm: bytes, *, salt: bytes, info: bytes) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=SEED_BYTES, salt=salt, info=info).derive(ikm)


def _u64(value: int) -> bytes:
    return value.to_bytes(8, "big")


def _u32(value: int) -> bytes:
    return value.to_bytes(4, "big")
