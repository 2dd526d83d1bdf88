"""The site's side of secure aggregation: one state object per site and run.

A :class:`SecAggSite` holds the site's long-term keys, the keys it has seen for the other sites,
and what it needs to answer the unmask request of the last round it masked. It never masks two
vectors with the keys of one round, and it answers at most one unmask request per round. Its state
survives between Flower messages through :meth:`SecAggSite.export_state` /
:meth:`SecAggSite.from_state` (e.g. in the ClientApp's ``context.state``; it holds private keys,
so it must stay on the site).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Final, NoReturn

from cryptography.exceptions import InvalidTag

from clinfed.errors import PrivacyError, ProtocolError

from .config import MAX_SITE_ID, SecAggConfig
from .errors import MaskReuseError
from .keys import (
    KEY_BYTES,
    SEED_BYTES,
    RandomBytes,
    SiteKeys,
    agree,
    decrypt_share,
    encrypt_share,
    generate_site_keys,
    pair_mask_seed,
    seed_commitment,
    self_mask_seed,
    share_key,
)
from .masking import MaskAccumulator, pack_vector
from .messages import (
    KeyAdvertisement,
    MaskedInput,
    RoundRequest,
    SetupRequest,
    UnmaskRequest,
    UnmaskResponse,
    WireRecord,
)
from .quantize import QuantizedUpdate
from .shamir import SHARE_BYTES, split_secret

__all__ = ["SecAggSite"]

logger = logging.getLogger(__name__)

_STATE_VERSION: Final = 2


@dataclass
class _PendingRound:
    """What a site keeps about the last round it masked, to answer that round's unmask request.

    Only round-specific secrets are kept (pair seeds and share keys), never long-term keys, so a
    key rotation between masking and unmasking is harmless.
    """

    round_id: int
    participants: tuple[int, ...]
    threshold: int
    pair_seeds: dict[int, bytes]
    share_keys: dict[int, bytes] = field(default_factory=dict)
    own_share: bytes = b""
    answered: bool = False


class SecAggSite:
    """Secure-aggregation state of one site in one run.

    Use it in this order: :meth:`advertise_keys` once (and again to rotate keys), then per round
    :meth:`mask`, and :meth:`unmask` when the server asks (only after a dropout, or every round in
    ``double`` mode). Every method validates the server's message against the site's own state
    and raises :class:`~clinfed.errors.ProtocolError` naming this site and the problem.

    Args:
        run_id: the Flower run id (0 ≤ id < 2^64); bound into every key derivation and message.
        site_id: the id the server assigned to this site (1..65535).
        config: the run's secure-aggregation settings (must equal the server's).
        random_bytes: source of randomness (``os.urandom``; tests pass a seeded generator).
    """

    def __init__(
        self,
        *,
        run_id: int,
        site_id: int,
        config: SecAggConfig,
        random_bytes: RandomBytes = os.urandom,
    ) -> None:
        if type(site_id) is not int or not 1 <= site_id <= MAX_SITE_ID:
            raise ValueError(f"site_id must be an integer in 1..{MAX_SITE_ID}. Found {site_id!r}.")
        if type(run_id) is not int or not 0 <= run_id < 1 << 64:
            raise ValueError(f"run_id must be an integer in 0..2^64-1. Found {run_id!r}.")
        self.run_id = run_id
        self.site_id = site_id
        self.config = config
        self._random_bytes = random_bytes
        self._keys: SiteKeys | None = None
        self._peers: dict[int, tuple[int, bytes, bytes]] = {}  # id → (epoch, mask pk, enc pk)
        # X25519 secret shared with each peer's mask key under this site's current keys:
        # id → (peer mask pk, secret). Per-round seeds come from it through HKDF, so it is
        # agreed once per key epoch, not once per round; new keys on either side replace it.
        self._pair_secrets: dict[int, tuple[bytes, bytes]] = {}
        self._last_round = -1
        self._pending: _PendingRound | None = None

    @property
    def key_epoch(self) -> int:
        """Epoch of the site's current keys (0 before the first :meth:`advertise_keys`)."""
        return 0 if self._keys is None else self._keys.epoch

    @property
    def last_masked_round(self) -> int:
        """The last round this site masked a vector for (-1 if none); rounds are single-use."""
        return self._last_round

    def advertise_keys(self, request: SetupRequest) -> KeyAdvertisement:
        """Draw fresh key pairs (a new key epoch) and advertise their public halves."""
        self._check_run(request.run_id, "setup request")
        if request.site_id != self.site_id:
            self._fail(f"setup request is addressed to site {request.site_id}")
        self._check_digest(request.config_digest, "setup request")
        self._keys = generate_site_keys(epoch=self.key_epoch + 1, random_bytes=self._random_bytes)
        self._pair_secrets.clear()
        logger.info("secagg site %d: advertising key epoch %d", self.site_id, self._keys.epoch)
        return KeyAdvertisement(
            run_id=self.run_id,
            site_id=self.site_id,
            epoch=self._keys.epoch,
            mask_public_key=self._keys.mask_public,
            encryption_public_key=self._keys.encryption_public,
        )

    def mask(self, request: RoundRequest, update: QuantizedUpdate, *, now_ms: int) -> MaskedInput:
        """Mask a quantized update for the round ``request`` opens; the round's one message.

        Args:
            request: the server's round request (participants and their public keys).
            update: this site's weighted, quantized update (:func:`quantize`).
            now_ms: the current Unix time in milliseconds; no vector leaves after the deadline.

        Raises:
            ProtocolError: the request does not fit this site (run, settings, keys, size).
            MaskReuseError: this site already masked a vector for this round or a later one.
            PrivacyError: the round's deadline has passed.
        """
        keys = self._check_round_request(request, update, now_ms=now_ms)
        self._pin_peer_keys(request)
        round_id, participants = request.round_id, request.participants
        num_elements = request.num_elements
        accumulator = MaskAccumulator(num_elements + 1, bits=self.config.bits)
        accumulator.values[:num_elements] = update.values
        accumulator.values[num_elements] = min(update.out_of_range, self.config.level)
        pending = _PendingRound(
            round_id=round_id, participants=participants, threshold=request.threshold, pair_seeds={}
        )
        others = tuple(j for j in participants if j != self.site_id)
        for j in others:
            _, mask_pk, _ = request.keys_of(j)
            cached = self._pair_secrets.get(j)
            if cached is not None and cached[0] == mask_pk:
                shared = cached[1]
            else:
                shared = self._agree(keys.mask_private, mask_pk, peer=j, purpose="mask")
                self._pair_secrets[j] = (mask_pk, shared)
            seed = pair_mask_seed(
                shared, run_id=self.run_id, round_id=round_id, site_a=self.site_id, site_b=j
            )
            pending.pair_seeds[j] = seed
            # The lower id adds the pair mask and the higher id subtracts it: they cancel in a sum.
            accumulator.add_mask(seed, negate=self.site_id > j)
        encrypted_shares: tuple[bytes, ...] = ()
        commitment = b""
        if self.config.mode == "double":
            encrypted_shares, commitment = self._add_self_mask(accumulator, request, keys, pending)

        vector = pack_vector(accumulator.reduced(), bits=self.config.bits)
        self._last_round = round_id
        self._pending = pending
        return MaskedInput(
            run_id=self.run_id,
            round_id=round_id,
            site_id=self.site_id,
            vector=vector,
            share_recipients=others if self.config.mode == "double" else (),
            encrypted_shares=encrypted_shares,
            seed_commitment=commitment,
        )

    def unmask(self, request: UnmaskRequest) -> UnmaskResponse:
        """Answer the server's unmask request for the round this site masked last.

        Reveals this round's pair-mask seeds shared with each dropped site and, in ``double``
        mode, this site's Shamir share of each survivor's self-mask seed. Never both for one
        site: a site is either dropped or a survivor in the single answer given per round.
        """
        round_id = request.round_id
        what = f"unmask request for round {round_id}"
        self._check_run(request.run_id, what)
        if request.site_id != self.site_id:
            self._fail(f"{what} is addressed to site {request.site_id}")
        pending = self._pending
        if pending is None or pending.round_id != round_id:
            self._fail(f"{what} does not match the last masked round {self._last_round}")
        if pending.answered:
            self._fail(
                f"already answered the unmask request of round {round_id}; a second answer could "
                "reveal both the pair masks and the self-mask of one site"
            )
        survivors, dropped = request.survivors, request.dropped
        if sorted(survivors + dropped) != list(pending.participants):
            self._fail(
                f"{what} splits the participants {pending.participants} into survivors "
                f"{survivors} and dropped {dropped}"
            )
        if len(survivors) < pending.threshold:
            self._fail(
                f"{what} names {len(survivors)} survivors, fewer than the round's threshold "
                f"{pending.threshold}; refusing to help reveal a sum over so few sites"
            )
        double = self.config.mode == "double"
        if not double and not dropped:
            self._fail(f"{what} names no dropped site; in pairwise mode there is nothing to unmask")

        seed_shares: list[bytes] = []
        if double:
            senders = tuple(s for s in survivors if s != self.site_id)
            if request.share_senders != senders:
                self._fail(
                    f"{what} carries shares from sites {request.share_senders}; expected one from "
                    f"each other survivor {senders}"
                )
            received = dict(zip(request.share_senders, request.encrypted_shares, strict=True))
            for owner in survivors:
                if owner == self.site_id:
                    seed_shares.append(pending.own_share)
                    continue
                try:
                    share = decrypt_share(
                        pending.share_keys[owner],
                        received[owner],
                        run_id=self.run_id,
                        round_id=round_id,
                        sender=owner,
                        recipient=self.site_id,
                    )
                except InvalidTag:
                    self._fail(
                        f"the self-mask share from site {owner} for round {round_id} failed "
                        "authentication (tampered, replayed or misrouted)"
                    )
                seed_shares.append(share)
        elif request.share_senders:
            self._fail(f"{what} carries self-mask shares, but the run is in pairwise mode")

        pending.answered = True
        return UnmaskResponse(
            run_id=self.run_id,
            round_id=round_id,
            site_id=self.site_id,
            pair_sites=dropped,
            pair_seeds=tuple(pending.pair_seeds[d] for d in dropped),
            share_owners=survivors if double else (),
            seed_shares=tuple(seed_shares),
        )

    def export_state(self) -> WireRecord:
        """The site's state as a flat record (Flower ``ConfigRecord`` values). Holds secrets."""
        keys = self._keys
        pending = self._pending
        peers = sorted(self._peers)
        participants = pending.participants if pending else ()
        return {
            "version": _STATE_VERSION,
            "run": self.run_id.to_bytes(8, "big"),
            "site": self.site_id,
            "config": self.config.digest,
            "last-round": self._last_round,
            "epoch": keys.epoch if keys else 0,
            "mask-sk": keys.mask_private if keys else b"",
            "enc-sk": keys.encryption_private if keys else b"",
            "peer-ids": peers,
            "peer-epochs": [self._peers[j][0] for j in peers],
            "peer-mask-pks": [self._peers[j][1] for j in peers],
            "peer-enc-pks": [self._peers[j][2] for j in peers],
            "pair-ids": sorted(self._pair_secrets),
            "pair-pks": [self._pair_secrets[j][0] for j in sorted(self._pair_secrets)],
            "pair-secrets": [self._pair_secrets[j][1] for j in sorted(self._pair_secrets)],
            "pending-round": pending.round_id if pending else -1,
            "pending-participants": list(participants),
            "pending-threshold": pending.threshold if pending else 0,
            "pending-pair-seeds": [
                pending.pair_seeds.get(j, b"") if pending else b"" for j in participants
            ],
            "pending-share-keys": [
                pending.share_keys.get(j, b"") if pending else b"" for j in participants
            ],
            "pending-own-share": pending.own_share if pending else b"",
            "pending-answered": int(pending.answered) if pending else 0,
        }

    @classmethod
    def from_state(
        cls,
        state: Mapping[str, object],
        *,
        config: SecAggConfig,
        random_bytes: RandomBytes = os.urandom,
    ) -> SecAggSite:
        """Rebuild a site from :meth:`export_state`; raises ``ValueError`` if it is corrupt."""
        read = _StateReader(state)
        if read.integer("version") != _STATE_VERSION:
            raise ValueError(f"secagg site state has version {state.get('version')!r}.")
        if read.blob("config") != config.digest:
            raise ValueError("secagg site state was saved under different secagg settings.")
        site = cls(
            run_id=int.from_bytes(read.blob("run", 8), "big"),
            site_id=read.integer("site"),
            config=config,
            random_bytes=random_bytes,
        )
        site._last_round = read.integer("last-round")
        epoch = read.integer("epoch")
        if epoch:
            site._keys = SiteKeys(
                epoch=epoch,
                mask_private=read.blob("mask-sk", KEY_BYTES),
                encryption_private=read.blob("enc-sk", KEY_BYTES),
            )
        peer_ids = read.integers("peer-ids")
        peer_epochs = read.integers("peer-epochs", len(peer_ids))
        mask_pks = read.blobs("peer-mask-pks", len(peer_ids), KEY_BYTES)
        enc_pks = read.blobs("peer-enc-pks", len(peer_ids), KEY_BYTES)
        site._peers = {
            j: (e, m, k)
            for j, e, m, k in zip(peer_ids, peer_epochs, mask_pks, enc_pks, strict=True)
        }
        pair_ids = read.integers("pair-ids")
        pair_pks = read.blobs("pair-pks", len(pair_ids), KEY_BYTES)
        pair_secrets = read.blobs("pair-secrets", len(pair_ids), KEY_BYTES)
        site._pair_secrets = {
            j: (pk, secret) for j, pk, secret in zip(pair_ids, pair_pks, pair_secrets, strict=True)
        }
        pending_round = read.integer("pending-round")
        if pending_round >= 0:
            participants = read.integers("pending-participants")
            seeds = read.blobs("pending-pair-seeds", len(participants), None)
            share_keys = read.blobs("pending-share-keys", len(participants), None)
            own_share = read.blob("pending-own-share")
            if own_share and len(own_share) != SHARE_BYTES:
                raise ValueError("secagg site state has a malformed own share.")
            site._pending = _PendingRound(
                round_id=pending_round,
                participants=tuple(participants),
                threshold=read.integer("pending-threshold"),
                pair_seeds={j: s for j, s in zip(participants, seeds, strict=True) if s},
                share_keys={j: k for j, k in zip(participants, share_keys, strict=True) if k},
                own_share=own_share,
                answered=bool(read.integer("pending-answered")),
            )
        return site

    # -- helpers -------------------------------------------------------------------------------

    def _check_round_request(
        self, request: RoundRequest, update: QuantizedUpdate, *, now_ms: int
    ) -> SiteKeys:
        """Everything that must hold before this site masks for ``request``; returns its keys."""
        round_id, participants = request.round_id, request.participants
        what = f"round request for round {round_id}"
        self._check_run(request.run_id, what)
        self._check_digest(request.config_digest, what)
        keys = self._keys
        if keys is None:
            self._fail(f"{what} arrived before the site advertised keys (no setup yet)")
        if self.site_id not in participants:
            self._fail(f"{what} does not list this site among participants {participants}")
        if len(participants) > self.config.max_sites:
            self._fail(f"{what} has {len(participants)} participants, above max_sites")
        expected_threshold = self.config.threshold_for(len(participants))
        if request.threshold != expected_threshold:
            self._fail(
                f"{what} has threshold {request.threshold}; the shared settings give "
                f"{expected_threshold} for {len(participants)} participants"
            )
        if round_id <= self._last_round:
            raise MaskReuseError(
                f"site {self.site_id}: already masked a vector for round {self._last_round}; "
                f"refusing to mask for round {round_id} with keys that may have been revealed "
                "— the server must open a new, higher round id"
            )
        if now_ms >= request.deadline_ms:
            raise PrivacyError(
                f"site {self.site_id}: the deadline of round {round_id} passed "
                f"{now_ms - request.deadline_ms} ms ago; a vector sent now could arrive after the "
                "server recovered this site as dropped, so none is sent"
            )
        if update.bits != self.config.bits or update.values.size != request.num_elements:
            self._fail(
                f"{what} expects {request.num_elements} values of {self.config.bits} bits; the "
                f"local update has {update.values.size} values of {update.bits} bits"
            )
        self._check_own_keys(request, keys)
        return keys

    def _add_self_mask(
        self,
        accumulator: MaskAccumulator,
        request: RoundRequest,
        keys: SiteKeys,
        pending: _PendingRound,
    ) -> tuple[tuple[bytes, ...], bytes]:
        """Add a fresh self-mask; return its seed's encrypted shares and commitment."""
        round_id = request.round_id
        secret = self._random_bytes(SEED_BYTES)
        accumulator.add_mask(
            self_mask_seed(secret, run_id=self.run_id, round_id=round_id, site_id=self.site_id)
        )
        shares = split_secret(
            secret,
            threshold=request.threshold,
            holders=request.participants,
            random_bytes=self._random_bytes,
        )
        encrypted: list[bytes] = []
        for j in request.participants:
            if j == self.site_id:
                continue
            _, _, enc_pk = request.keys_of(j)
            shared = self._agree(keys.encryption_private, enc_pk, peer=j, purpose="encryption")
            key = share_key(shared, run_id=self.run_id, site_a=self.site_id, site_b=j)
            pending.share_keys[j] = key
            encrypted.append(
                encrypt_share(
                    key,
                    shares[j],
                    run_id=self.run_id,
                    round_id=round_id,
                    sender=self.site_id,
                    recipient=j,
                    random_bytes=self._random_bytes,
                )
            )
        pending.own_share = shares[self.site_id]
        commitment = seed_commitment(
            secret, run_id=self.run_id, round_id=round_id, site_id=self.site_id
        )
        return tuple(encrypted), commitment

    def _fail(self, problem: str) -> NoReturn:
        raise ProtocolError(f"site {self.site_id}: {problem}")

    def _check_run(self, run_id: int, what: str) -> None:
        if run_id != self.run_id:
            self._fail(f"{what} is for run {run_id}; this site is in run {self.run_id}")

    def _check_digest(self, digest: bytes, what: str) -> None:
        if digest != self.config.digest:
            self._fail(
                f"{what} was made with different secagg settings (mode, bits, clip_range, "
                "max_sites or threshold); both sides must read the same run config"
            )

    def _check_own_keys(self, request: RoundRequest, keys: SiteKeys) -> None:
        epoch, mask_pk, enc_pk = request.keys_of(self.site_id)
        if (epoch, mask_pk, enc_pk) != (keys.epoch, keys.mask_public, keys.encryption_public):
            self._fail(
                f"round request {request.round_id} lists key epoch {epoch} for this site, which "
                f"holds epoch {keys.epoch}; the server must register the site's latest keys"
            )

    def _pin_peer_keys(self, request: RoundRequest) -> None:
        """Trust on first use: a peer's keys may change only with a higher key epoch."""
        for j in request.participants:
            if j == self.site_id:
                continue
            entry = request.keys_of(j)
            known = self._peers.get(j)
            if known is not None and known != entry and entry[0] <= known[0]:
                self._fail(
                    f"round request {request.round_id} changes the keys of site {j} without a "
                    f"new key epoch (epoch {entry[0]}, known {known[0]})"
                )
        for j in request.participants:
            if j != self.site_id:
                self._peers[j] = request.keys_of(j)

    def _agree(self, private: bytes, peer_public: bytes, *, peer: int, purpose: str) -> bytes:
        try:
            return agree(private, peer_public)
        except ValueError:
            self._fail(f"the {purpose} public key of site {peer} is invalid (a low-order point)")


class _StateReader:
    def __init__(self, state: Mapping[str, object]) -> None:
        self._state = state

    def _get(self, key: str) -> object:
        if key not in self._state:
            raise ValueError(f"secagg site state lacks `{key}`.")
        return self._state[key]

    def integer(self, key: str) -> int:
        value = self._get(key)
        if type(value) is not int:
            raise ValueError(f"secagg site state has a non-integer `{key}`.")
        return value

    def blob(self, key: str, size: int | None = None) -> bytes:
        value = self._get(key)
        if type(value) is not bytes or (size is not None and len(value) != size):
            raise ValueError(f"secagg site state has a malformed `{key}`.")
        return value

    def integers(self, key: str, count: int | None = None) -> list[int]:
        value = self._get(key)
        if type(value) is not list or any(type(v) is not int for v in value):
            raise ValueError(f"secagg site state has a malformed `{key}`.")
        if count is not None and len(value) != count:
            raise ValueError(f"secagg site state has a misaligned `{key}`.")
        return [v for v in value if isinstance(v, int)]

    def blobs(self, key: str, count: int, size: int | None) -> list[bytes]:
        value = self._get(key)
        if type(value) is not list or len(value) != count:
            raise ValueError(f"secagg site state has a malformed `{key}`.")
        blobs = [v for v in value if type(v) is bytes]
        if len(blobs) != count or (size is not None and any(len(b) != size for b in blobs)):
            raise ValueError(f"secagg site state has a malformed `{key}`.")
        return blobs
