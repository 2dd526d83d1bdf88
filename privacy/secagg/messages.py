"""Wire messages of secure aggregation and their strict parsing.

Each message is a frozen dataclass that converts to and from a flat record whose values are
``int``, ``bytes``, ``list[int]`` or ``list[bytes]`` — valid Flower ``ConfigRecord`` values. The
record keys below are the only wire keys of the protocol (defined once, used by both sides).

Parsing is strict: a missing or unknown key, a wrong type (``bool`` is not an ``int``), a wrong
length, an unsorted or misaligned list raises :class:`clinfed.errors.ProtocolError` with a one-line
message naming the sending site when it is known. Checks that need context (the run, the round,
who already sent) are made by the protocol state objects in :mod:`.protocol`.

Every message carries the run id (8 bytes), and every message but the setup request carries the
round or key epoch and the sender or recipient site id, so a replayed message is recognised.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final, NoReturn, Self

from clinfed.errors import ProtocolError

from .config import MAX_SITE_ID
from .keys import KEY_BYTES, SEED_BYTES
from .shamir import SHARE_BYTES

__all__ = [
    "ENCRYPTED_SHARE_BYTES",
    "KeyAdvertisement",
    "MaskedInput",
    "RoundRequest",
    "SetupRequest",
    "UnmaskRequest",
    "UnmaskResponse",
    "WireRecord",
    "WireValue",
]

WireValue = int | bytes | list[int] | list[bytes]
WireRecord = dict[str, WireValue]

#: nonce (12) ‖ AES-GCM ciphertext of one Shamir share (66) ‖ tag (16)
ENCRYPTED_SHARE_BYTES: Final = 12 + SHARE_BYTES + 16
_DIGEST_BYTES: Final = 16
_COMMITMENT_BYTES: Final = 32
_MAX_INT64: Final = (1 << 63) - 1

# Wire keys. New meaning → new key; never change what an existing key means.
KEY_TYPE: Final = "secagg.type"
KEY_RUN: Final = "secagg.run"
KEY_ROUND: Final = "secagg.round"
KEY_SITE: Final = "secagg.site"
KEY_CONFIG: Final = "secagg.config"
KEY_EPOCH: Final = "secagg.epoch"
KEY_MASK_PK: Final = "secagg.mask-pk"
KEY_ENC_PK: Final = "secagg.enc-pk"
KEY_PARTICIPANTS: Final = "secagg.participants"
KEY_EPOCHS: Final = "secagg.epochs"
KEY_MASK_PKS: Final = "secagg.mask-pks"
KEY_ENC_PKS: Final = "secagg.enc-pks"
KEY_THRESHOLD: Final = "secagg.threshold"
KEY_NUM_ELEMENTS: Final = "secagg.num-elements"
KEY_DEADLINE_MS: Final = "secagg.deadline-ms"
KEY_VECTOR: Final = "secagg.vector"
KEY_SHARE_SITES: Final = "secagg.share-sites"
KEY_SHARES: Final = "secagg.shares"
KEY_COMMITMENT: Final = "secagg.commitment"
KEY_SURVIVORS: Final = "secagg.survivors"
KEY_DROPPED: Final = "secagg.dropped"
KEY_PAIR_SITES: Final = "secagg.pair-sites"
KEY_PAIR_SEEDS: Final = "secagg.pair-seeds"


@dataclass(frozen=True)
class SetupRequest:
    """Server → site: assigns the site its id and asks it to advertise (new) keys."""

    TYPE: ClassVar[int] = 1
    run_id: int
    site_id: int
    config_digest: bytes

    def __post_init__(self) -> None:
        check = _Checker("setup request", self.site_id)
        check.run_id(self.run_id)
        check.site_id(self.site_id)
        check.blob("config_digest", self.config_digest, _DIGEST_BYTES)

    def to_record(self) -> WireRecord:
        return {
            KEY_TYPE: self.TYPE,
            KEY_RUN: _run_bytes(self.run_id),
            KEY_SITE: self.site_id,
            KEY_CONFIG: self.config_digest,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> Self:
        read = _Reader(record, "setup request", cls.TYPE, (KEY_RUN, KEY_SITE, KEY_CONFIG))
        return cls(
            run_id=read.run_id(),
            site_id=read.site_id(),
            config_digest=read.blob(KEY_CONFIG),
        )


@dataclass(frozen=True)
class KeyAdvertisement:
    """Site → server (setup, once per key epoch): the site's two X25519 public keys."""

    TYPE: ClassVar[int] = 2
    run_id: int
    site_id: int
    epoch: int
    mask_public_key: bytes
    encryption_public_key: bytes

    def __post_init__(self) -> None:
        check = _Checker("key advertisement", self.site_id)
        check.run_id(self.run_id)
        check.site_id(self.site_id)
        check.integer("epoch", self.epoch, 1, _MAX_INT64)
        check.blob("mask_public_key", self.mask_public_key, KEY_BYTES)
        check.blob("encryption_public_key", self.encryption_public_key, KEY_BYTES)
        if self.mask_public_key == self.encryption_public_key:
            check.fail("uses the same public key for masking and for share encryption")

    def to_record(self) -> WireRecord:
        return {
            KEY_TYPE: self.TYPE,
            KEY_RUN: _run_bytes(self.run_id),
            KEY_SITE: self.site_id,
            KEY_EPOCH: self.epoch,
            KEY_MASK_PK: self.mask_public_key,
            KEY_ENC_PK: self.encryption_public_key,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> Self:
        keys = (KEY_RUN, KEY_SITE, KEY_EPOCH, KEY_MASK_PK, KEY_ENC_PK)
        read = _Reader(record, "key advertisement", cls.TYPE, keys)
        return cls(
            run_id=read.run_id(),
            site_id=read.site_id(),
            epoch=read.integer(KEY_EPOCH),
            mask_public_key=read.blob(KEY_MASK_PK),
            encryption_public_key=read.blob(KEY_ENC_PK),
        )


@dataclass(frozen=True)
class RoundRequest:
    """Server → every participant: opens a round (carried by the round's training request).

    ``participants`` (sorted) is the round's participant set; the keys of participant
    ``participants[k]`` are ``epochs[k]``, ``mask_public_keys[k]``, ``encryption_public_keys[k]``.
    Masks are taken over exactly this set. A site refuses to mask after ``deadline_ms``
    (Unix time in milliseconds).
    """

    TYPE: ClassVar[int] = 3
    run_id: int
    round_id: int
    config_digest: bytes
    participants: tuple[int, ...]
    epochs: tuple[int, ...]
    mask_public_keys: tuple[bytes, ...]
    encryption_public_keys: tuple[bytes, ...]
    threshold: int
    num_elements: int
    deadline_ms: int

    def __post_init__(self) -> None:
        check = _Checker(f"round request for round {self.round_id}", None)
        check.run_id(self.run_id)
        check.integer("round_id", self.round_id, 0, _MAX_INT64)
        check.blob("config_digest", self.config_digest, _DIGEST_BYTES)
        check.site_ids("participants", self.participants, min_length=2)
        count = len(self.participants)
        check.aligned("epochs", self.epochs, count)
        for epoch in self.epochs:
            check.integer("epochs", epoch, 1, _MAX_INT64)
        check.blobs("mask_public_keys", self.mask_public_keys, KEY_BYTES, count)
        check.blobs("encryption_public_keys", self.encryption_public_keys, KEY_BYTES, count)
        check.integer("threshold", self.threshold, 2, count)
        check.integer("num_elements", self.num_elements, 1, _MAX_INT64)
        check.integer("deadline_ms", self.deadline_ms, 0, _MAX_INT64)

    def keys_of(self, site_id: int) -> tuple[int, bytes, bytes]:
        """(epoch, mask public key, encryption public key) of a participant."""
        k = self.participants.index(site_id)
        return self.epochs[k], self.mask_public_keys[k], self.encryption_public_keys[k]

    def to_record(self) -> WireRecord:
        return {
            KEY_TYPE: self.TYPE,
            KEY_RUN: _run_bytes(self.run_id),
            KEY_ROUND: self.round_id,
            KEY_CONFIG: self.config_digest,
            KEY_PARTICIPANTS: list(self.participants),
            KEY_EPOCHS: list(self.epochs),
            KEY_MASK_PKS: list(self.mask_public_keys),
            KEY_ENC_PKS: list(self.encryption_public_keys),
            KEY_THRESHOLD: self.threshold,
            KEY_NUM_ELEMENTS: self.num_elements,
            KEY_DEADLINE_MS: self.deadline_ms,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> Self:
        keys = (
            KEY_RUN,
            KEY_ROUND,
            KEY_CONFIG,
            KEY_PARTICIPANTS,
            KEY_EPOCHS,
            KEY_MASK_PKS,
            KEY_ENC_PKS,
            KEY_THRESHOLD,
            KEY_NUM_ELEMENTS,
            KEY_DEADLINE_MS,
        )
        read = _Reader(record, "round request", cls.TYPE, keys)
        return cls(
            run_id=read.run_id(),
            round_id=read.integer(KEY_ROUND),
            config_digest=read.blob(KEY_CONFIG),
            participants=read.integers(KEY_PARTICIPANTS),
            epochs=read.integers(KEY_EPOCHS),
            mask_public_keys=read.blobs(KEY_MASK_PKS),
            encryption_public_keys=read.blobs(KEY_ENC_PKS),
            threshold=read.integer(KEY_THRESHOLD),
            num_elements=read.integer(KEY_NUM_ELEMENTS),
            deadline_ms=read.integer(KEY_DEADLINE_MS),
        )


@dataclass(frozen=True)
class MaskedInput:
    """Site → server, the one message of a round: the site's masked quantized vector.

    ``vector`` packs ``num_elements + 1`` elements of Z_{2^bits} (``ceil(bits/8)`` bytes each,
    little-endian): the weighted update, then the site's out-of-range count, all masked. In
    ``double`` mode it also carries one AES-GCM-encrypted Shamir share of the site's fresh
    self-mask seed per other participant (``share_recipients`` sorted, ``encrypted_shares``
    aligned), and a commitment to that seed; in ``pairwise`` mode those three are empty.
    """

    TYPE: ClassVar[int] = 4
    run_id: int
    round_id: int
    site_id: int
    vector: bytes
    share_recipients: tuple[int, ...] = ()
    encrypted_shares: tuple[bytes, ...] = ()
    seed_commitment: bytes = b""

    def __post_init__(self) -> None:
        check = _Checker(f"masked input for round {self.round_id}", self.site_id)
        check.run_id(self.run_id)
        check.site_id(self.site_id)
        check.integer("round_id", self.round_id, 0, _MAX_INT64)
        check.blob("vector", self.vector, None)
        check.site_ids("share_recipients", self.share_recipients, min_length=0)
        check.blobs(
            "encrypted_shares",
            self.encrypted_shares,
            ENCRYPTED_SHARE_BYTES,
            len(self.share_recipients),
        )
        expected = _COMMITMENT_BYTES if self.share_recipients else 0
        check.blob("seed_commitment", self.seed_commitment, expected)

    def to_record(self) -> WireRecord:
        return {
            KEY_TYPE: self.TYPE,
            KEY_RUN: _run_bytes(self.run_id),
            KEY_ROUND: self.round_id,
            KEY_SITE: self.site_id,
            KEY_VECTOR: self.vector,
            KEY_SHARE_SITES: list(self.share_recipients),
            KEY_SHARES: list(self.encrypted_shares),
            KEY_COMMITMENT: self.seed_commitment,
        }

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> Self:
        keys = (
            KEY_RUN,
            KEY_ROUND,
            KEY_SITE,
            KEY_VECTOR,
            KEY_SHARE_SITES,
            KEY_SHARES,
            KEY_COMMITMENT,
        )
        read = _Reader(record, "masked input", cls.TYPE, keys)
        return cls(
            run_id=read.run_id(),
            site_id=read.site_id(),
            round_id=read.integer(KEY_ROUND),
            vector=read.blob(KEY_VECTOR),
            share_recipients=read.integers(KEY_SHARE_SITES),
            encrypted_shares=read.blobs(KEY_SHARES),
            seed_commitment=read.blob(KEY_COMMITMENT),
        )


@dataclass(frozen=True)
class UnmaskRequest:
    """Server → one surviving participant (``site_id``): who survived and who dropped.

    Sent only when the server must remove something: pair masks shared with ``dropped`` sites,
    and in ``double`` mode the survivors' self-masks. ``share_senders``/``encrypted_shares`` are
    the self-mask-seed shares addressed to ``site_id`` by the other survivors (``double`` only).
    """

    TYPE: ClassVar[int] = 5
    run_id: int
    round_id: int
    site_id: int
    survivors: tuple[int, ...]
    dropped: tuple[int, ...]
    share_senders: tuple[int, ...] = ()
    encrypted_shares: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        check = _Checker(f"unmask request for round {self.round_id}", self.site_id)
        check.run_id(self.run_id)
        check.site_id(self.site_id)
        check.integer("round_id", self.round_id, 0, _MAX_INT64)
        check.site_ids("survivors", self.survivors, min_length=1)
        check.site_ids("dropped", self.dropped, min_length=0)
        check.site_ids("share_senders", self.share_senders, min_length=0)
        check.blobs(
            "encrypted_shares",
            self.encrypted_shares,
            ENCRYPTED_SHARE_BYTES,
            len(self.share_senders),
        )
        if set(self.survivors) & set(self.dropped):
            check.fail("lists a site both as survivor and as dropped")
        if self.site_id not in self.survivors:
            check.fail("is addressed to a site that is not among the survivors")

    def to_record(self) -> WireRecord:
        return {
            KEY_TYPE: self.TYPE,
            KEY_RUN: _run_bytes(self.run_id),
            KEY_ROUND: self.round_id,
            KEY_SITE: self.site_id,
            KEY_SURVIVORS: list(self.survivors),
            KEY_DROPPED: list(self.dropped),
            KEY_SHARE_SITES: list(self.share_senders),
            KEY_SHARES: list(self.encrypted_shares),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> Self:
        keys = (
            KEY_RUN,
            KEY_ROUND,
            KEY_SITE,
            KEY_SURVIVORS,
            KEY_DROPPED,
            KEY_SHARE_SITES,
            KEY_SHARES,
        )
        read = _Reader(record, "unmask request", cls.TYPE, keys)
        return cls(
            run_id=read.run_id(),
            site_id=read.site_id(),
            round_id=read.integer(KEY_ROUND),
            survivors=read.integers(KEY_SURVIVORS),
            dropped=read.integers(KEY_DROPPED),
            share_senders=read.integers(KEY_SHARE_SITES),
            encrypted_shares=read.blobs(KEY_SHARES),
        )


@dataclass(frozen=True)
class UnmaskResponse:
    """Survivor → server: what the server needs to remove the masks of one round.

    This round's pair-mask seed shared with each dropped site (``pair_sites`` sorted,
    ``pair_seeds`` aligned) and, in ``double`` mode, the site's Shamir share of each survivor's
    self-mask seed (``share_owners`` sorted, ``seed_shares`` aligned).
    """

    TYPE: ClassVar[int] = 6
    run_id: int
    round_id: int
    site_id: int
    pair_sites: tuple[int, ...] = ()
    pair_seeds: tuple[bytes, ...] = ()
    share_owners: tuple[int, ...] = ()
    seed_shares: tuple[bytes, ...] = ()

    def __post_init__(self) -> None:
        check = _Checker(f"unmask response for round {self.round_id}", self.site_id)
        check.run_id(self.run_id)
        check.site_id(self.site_id)
        check.integer("round_id", self.round_id, 0, _MAX_INT64)
        check.site_ids("pair_sites", self.pair_sites, min_length=0)
        check.blobs("pair_seeds", self.pair_seeds, SEED_BYTES, len(self.pair_sites))
        check.site_ids("share_owners", self.share_owners, min_length=0)
        check.blobs("seed_shares", self.seed_shares, SHARE_BYTES, len(self.share_owners))

    def to_record(self) -> WireRecord:
        return {
            KEY_TYPE: self.TYPE,
            KEY_RUN: _run_bytes(self.run_id),
            KEY_ROUND: self.round_id,
            KEY_SITE: self.site_id,
            KEY_PAIR_SITES: list(self.pair_sites),
            KEY_PAIR_SEEDS: list(self.pair_seeds),
            KEY_SHARE_SITES: list(self.share_owners),
            KEY_SHARES: list(self.seed_shares),
        }

    @classmethod
    def from_record(cls, record: Mapping[str, object]) -> Self:
        keys = (
            KEY_RUN,
            KEY_ROUND,
            KEY_SITE,
            KEY_PAIR_SITES,
            KEY_PAIR_SEEDS,
            KEY_SHARE_SITES,
            KEY_SHARES,
        )
        read = _Reader(record, "unmask response", cls.TYPE, keys)
        return cls(
            run_id=read.run_id(),
            site_id=read.site_id(),
            round_id=read.integer(KEY_ROUND),
            pair_sites=read.integers(KEY_PAIR_SITES),
            pair_seeds=read.blobs(KEY_PAIR_SEEDS),
            share_owners=read.integers(KEY_SHARE_SITES),
            seed_shares=read.blobs(KEY_SHARES),
        )


def _run_bytes(run_id: int) -> bytes:
    return run_id.to_bytes(8, "big")


class _Checker:
    """Structural checks of a message's fields; failures name the site and the field."""

    def __init__(self, kind: str, site_id: object) -> None:
        valid_site = type(site_id) is int and 1 <= site_id <= MAX_SITE_ID
        self.prefix = f"site {site_id}: {kind}" if valid_site else f"secagg {kind}"

    def fail(self, problem: str) -> NoReturn:
        raise ProtocolError(f"{self.prefix} {problem}")

    def run_id(self, value: object) -> None:
        self.integer("run_id", value, 0, (1 << 64) - 1)

    def site_id(self, value: object) -> None:
        self.integer("site_id", value, 1, MAX_SITE_ID)

    def integer(self, name: str, value: object, low: int, high: int) -> None:
        if type(value) is not int or not low <= value <= high:
            self.fail(f"has `{name}` {_show(value)}; expected an integer in {low}..{high}")

    def blob(self, name: str, value: object, size: int | None) -> None:
        if type(value) is not bytes:
            self.fail(f"has `{name}` of type {type(value).__name__}; expected bytes")
        elif size is not None and len(value) != size:
            self.fail(f"has `{name}` of {len(value)} bytes; expected {size}")

    def aligned(self, name: str, values: Sequence[object], count: int) -> None:
        if type(values) is not tuple:
            self.fail(f"has `{name}` of type {type(values).__name__}; expected a tuple")
        if len(values) != count:
            self.fail(f"has {len(values)} `{name}` for {count} sites")

    def blobs(self, name: str, values: Sequence[object], size: int, count: int) -> None:
        self.aligned(name, values, count)
        for value in values:
            self.blob(name, value, size)

    def site_ids(self, name: str, values: Sequence[object], *, min_length: int) -> None:
        if type(values) is not tuple:
            self.fail(f"has `{name}` of type {type(values).__name__}; expected a tuple")
        if len(values) < min_length:
            self.fail(f"has `{name}` {_show(values)}; expected at least {min_length} site ids")
        previous = 0
        for value in values:
            if type(value) is not int or not 1 <= value <= MAX_SITE_ID or value <= previous:
                self.fail(f"has `{name}` {_show(values)}; expected distinct ids in sorted order")
            previous = value


class _Reader:
    """Reads a wire record with exact keys and exact value types."""

    def __init__(
        self, record: Mapping[str, object], kind: str, type_code: int, keys: Sequence[str]
    ) -> None:
        if not isinstance(record, Mapping):
            raise ProtocolError(f"secagg {kind}: expected a record, got {type(record).__name__}")
        self._record = record
        self._prefix = _Checker(kind, record.get(KEY_SITE)).prefix
        found = record.get(KEY_TYPE)
        if type(found) is not int or found != type_code:
            self._fail(f"has message type {_show(found)}; expected {type_code}")
        expected = {KEY_TYPE, *keys}
        unknown = sorted(set(map(str, record)) - expected)
        missing = sorted(expected - set(record))
        if unknown:
            self._fail(f"has unknown keys {unknown}")
        if missing:
            self._fail(f"lacks keys {missing}")

    def _fail(self, problem: str) -> NoReturn:
        raise ProtocolError(f"{self._prefix} {problem}")

    def run_id(self) -> int:
        value = self._record[KEY_RUN]
        if type(value) is not bytes or len(value) != 8:
            self._fail(f"has `{KEY_RUN}` {_show(value)}; expected 8 bytes")
        return int.from_bytes(value, "big")

    def site_id(self) -> int:
        return self.integer(KEY_SITE)

    def integer(self, key: str) -> int:
        value = self._record[key]
        if type(value) is not int:
            self._fail(f"has `{key}` of type {type(value).__name__}; expected int")
        return value

    def blob(self, key: str) -> bytes:
        value = self._record[key]
        if type(value) is not bytes:
            self._fail(f"has `{key}` of type {type(value).__name__}; expected bytes")
        return value

    def integers(self, key: str) -> tuple[int, ...]:
        values = self._list(key)
        if any(type(v) is not int for v in values):
            self._fail(f"has `{key}` with non-int items; expected list[int]")
        return tuple(v for v in values if isinstance(v, int))

    def blobs(self, key: str) -> tuple[bytes, ...]:
        values = self._list(key)
        if any(type(v) is not bytes for v in values):
            self._fail(f"has `{key}` with non-bytes items; expected list[bytes]")
        return tuple(v for v in values if isinstance(v, bytes))

    def _list(self, key: str) -> list[object]:
        value = self._record[key]
        if type(value) is not list:
            self._fail(f"has `{key}` of type {type(value).__name__}; expected a list")
        return value


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."
