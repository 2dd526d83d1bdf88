"""The coordinating server's side of secure aggregation.

:class:`SecAggServer` keeps the roster of advertised public keys and opens rounds;
:class:`SecAggRound` collects one round's masked inputs, decides who survived, asks the survivors
to unmask when needed, and returns the exact sum of the survivors' quantized updates, dequantized
to float32 — or raises :class:`SecAggAbortedError` naming the missing sites. The server never
holds a site's private key or a Shamir share in the clear except those it needs for this round.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, NoReturn

import numpy as np
import numpy.typing as npt

from clinfed.errors import PrivacyError, ProtocolError

from .config import SecAggConfig
from .errors import SecAggAbortedError
from .keys import SEED_BYTES, agree, seed_commitment, self_mask_seed
from .masking import MaskAccumulator, element_bytes, unpack_vector
from .messages import (
    KeyAdvertisement,
    MaskedInput,
    RoundRequest,
    SetupRequest,
    UnmaskRequest,
    UnmaskResponse,
)
from .quantize import dequantize
from .shamir import combine_shares

__all__ = ["SecAggResult", "SecAggRound", "SecAggServer"]

logger = logging.getLogger(__name__)

# Any fixed scalar serves to test a public key: X25519 with a low-order point fails for all.
_PROBE_PRIVATE_KEY: Final = bytes(range(1, 33))


@dataclass(frozen=True)
class SecAggResult:
    """Outcome of one secure-aggregation round.

    Attributes:
        round_id: the round.
        total: float32 sum over ``contributors`` of each site's weighted update (weight × update,
            as quantized by the site), flattened; divide by the contributors' total weight for
            a weighted mean. Within :func:`quantization_error_bound` of the exact sum.
        contributors: sites whose update is in ``total`` (the survivors).
        dropped: participants whose masked input did not arrive in time.
        out_of_range: total number of values the contributors clipped to [-r, r]; the server
            learns only this total, not which site clipped.
        exchanges: message exchanges the round used (1, or 2 with an unmask step).
    """

    round_id: int
    total: npt.NDArray[np.float32]
    contributors: tuple[int, ...]
    dropped: tuple[int, ...]
    out_of_range: int
    exchanges: int


class SecAggServer:
    """Server state of one run: the key roster and the round counter.

    Args:
        run_id: the Flower run id, bound into every message and key derivation.
        config: the run's secure-aggregation settings (must equal the sites').
    """

    def __init__(self, *, run_id: int, config: SecAggConfig) -> None:
        if type(run_id) is not int or not 0 <= run_id < 1 << 64:
            raise ValueError(f"run_id must be an integer in 0..2^64-1. Found {run_id!r}.")
        self.run_id = run_id
        self.config = config
        self._roster: dict[int, KeyAdvertisement] = {}
        self._last_round = -1

    @property
    def registered_sites(self) -> tuple[int, ...]:
        """Sites whose keys are registered, in id order."""
        return tuple(sorted(self._roster))

    def setup_request(self, site_id: int) -> SetupRequest:
        """The message asking a site to advertise (new) keys; also tells the site its id."""
        return SetupRequest(run_id=self.run_id, site_id=site_id, config_digest=self.config.digest)

    def add_key_advertisement(self, message: KeyAdvertisement, *, sender: int) -> None:
        """Register a site's public keys (a newer key epoch replaces the older one).

        Args:
            message: the parsed advertisement.
            sender: the site id the transport authenticated (from the Flower node id).
        """
        site = message.site_id
        _check_sender(message.site_id, sender, "key advertisement")
        if message.run_id != self.run_id:
            _fail(site, f"key advertisement is for run {message.run_id}, this is run {self.run_id}")
        known = self._roster.get(site)
        if known is not None and message.epoch <= known.epoch:
            _fail(
                site,
                f"key advertisement has epoch {message.epoch}, not newer than the registered "
                f"epoch {known.epoch} (replayed or stale)",
            )
        for name, key in (
            ("mask", message.mask_public_key),
            ("encryption", message.encryption_public_key),
        ):
            try:
                agree(_PROBE_PRIVATE_KEY, key)
            except ValueError:
                _fail(site, f"{name} public key is a low-order point")
        for other, advert in self._roster.items():
            if other != site and {advert.mask_public_key, advert.encryption_public_key} & {
                message.mask_public_key,
                message.encryption_public_key,
            }:
                _fail(site, f"advertises a public key already registered by site {other}")
        self._roster[site] = message
        logger.info("secagg: registered keys of site %d (epoch %d)", site, message.epoch)

    def start_round(
        self,
        *,
        round_id: int,
        participants: Sequence[int],
        num_elements: int,
        deadline_ms: int,
    ) -> SecAggRound:
        """Open a round over ``participants`` (sites present at round start).

        Args:
            round_id: strictly greater than every round id used before in this run (a round id
                is never reused, also not to retry an aborted round).
            participants: registered site ids; masks are taken over exactly this set.
            num_elements: number of float parameters each site sends (flattened model size).
            deadline_ms: Unix time (ms) after which sites send nothing for this round; in
                ``pairwise`` mode dropouts are recovered only after it. Set the transport's
                message TTL to the same instant (Flower's SuperLink then refuses late replies).

        Raises:
            SecAggAbortedError: fewer participants than the threshold (e.g. sites offline).
        """
        if type(round_id) is not int or round_id <= self._last_round:
            raise ValueError(
                f"round_id must be an integer above the last used round id {self._last_round}. "
                f"Found {round_id!r}; never reuse a round id, also not for a retry."
            )
        chosen = tuple(sorted(set(participants)))
        unregistered = [j for j in chosen if j not in self._roster]
        if unregistered:
            raise ValueError(
                f"sites {unregistered} have not advertised keys; open rounds only over "
                f"registered sites {self.registered_sites}."
            )
        if len(chosen) > self.config.max_sites:
            raise ValueError(
                f"round {round_id} has {len(chosen)} participants, above secagg max_sites "
                f"{self.config.max_sites}; raise max_sites (it sets the quantization scale)."
            )
        threshold = self.config.threshold_for(len(chosen))
        self._last_round = round_id
        absent = tuple(j for j in self._roster if j not in chosen)
        if len(chosen) < threshold:
            raise SecAggAbortedError(
                f"round {round_id}: {len(chosen)} participants, fewer than the threshold "
                f"{threshold}; absent sites: {list(absent)}",
                round_id=round_id,
                missing=absent,
            )
        adverts = [self._roster[j] for j in chosen]
        request = RoundRequest(
            run_id=self.run_id,
            round_id=round_id,
            config_digest=self.config.digest,
            participants=chosen,
            epochs=tuple(a.epoch for a in adverts),
            mask_public_keys=tuple(a.mask_public_key for a in adverts),
            encryption_public_keys=tuple(a.encryption_public_key for a in adverts),
            threshold=threshold,
            num_elements=num_elements,
            deadline_ms=deadline_ms,
        )
        return SecAggRound(config=self.config, request=request)


_Phase = Literal["collecting", "unmasking", "finished", "aborted"]


class SecAggRound:
    """One round on the server: collect → (unmask) → result.

    Send :attr:`request` to every participant with the round's training message, feed each
    reply to :meth:`add_masked_input`, then call :meth:`close` once every participant answered
    or the deadline passed. If it returns unmask requests, send each to its site, feed the
    replies to :meth:`add_unmask_response`, then call :meth:`result`; otherwise call
    :meth:`result` directly. Every ``add_*`` method raises :class:`ProtocolError` naming the
    sender for a malformed, replayed, duplicate or late message, and keeps nothing from it.
    """

    def __init__(self, *, config: SecAggConfig, request: RoundRequest) -> None:
        self.config = config
        self.request = request
        self._vectors: dict[int, npt.NDArray[np.unsignedinteger]] = {}
        self._inputs: dict[int, MaskedInput] = {}
        self._responses: dict[int, UnmaskResponse] = {}
        self._survivors: tuple[int, ...] = ()
        self._dropped: tuple[int, ...] = ()
        self._phase: _Phase = "collecting"
        self._needs_unmask = False
        self._closed = False

    @property
    def round_id(self) -> int:
        return self.request.round_id

    @property
    def participants(self) -> tuple[int, ...]:
        return self.request.participants

    @property
    def threshold(self) -> int:
        return self.request.threshold

    @property
    def awaiting(self) -> tuple[int, ...]:
        """Sites whose message the current step still waits for."""
        if self._phase == "collecting" and not self._closed:
            return tuple(j for j in self.participants if j not in self._vectors)
        if self._phase == "unmasking":
            return tuple(j for j in self._survivors if j not in self._responses)
        return ()

    def add_masked_input(self, message: MaskedInput, *, sender: int) -> None:
        """Accept one participant's masked vector (sender = transport-authenticated site id)."""
        site = message.site_id
        _check_sender(site, sender, "masked input")
        self._check_binding(site, message.run_id, message.round_id, "masked input")
        if site not in self.participants:
            _fail(site, f"is not a participant of round {self.round_id} ({self.participants})")
        if site in self._vectors:
            _fail(site, f"already sent its masked input for round {self.round_id} (duplicate)")
        if self._phase != "collecting" or self._closed:
            _fail(
                site,
                f"masked input for round {self.round_id} arrived after collection closed; "
                "discarded (the site counts as dropped)",
            )
        bits = self.config.bits
        width = element_bytes(bits)
        expected = (self.request.num_elements + 1) * width
        vector = (
            unpack_vector(message.vector, bits=bits) if len(message.vector) == expected else None
        )
        if vector is None:
            _fail(
                site,
                f"masked vector has {len(message.vector)} bytes; expected {expected} "
                f"({self.request.num_elements + 1} elements of {width} bytes, high bits zero)",
            )
        others = tuple(j for j in self.participants if j != site)
        if self.config.mode == "double":
            if message.share_recipients != others:
                _fail(
                    site,
                    f"masked input carries self-mask shares for {message.share_recipients}; "
                    f"expected one for each other participant {others}",
                )
        elif message.share_recipients:
            _fail(site, "masked input carries self-mask shares, but the run is in pairwise mode")
        self._vectors[site] = vector
        self._inputs[site] = message

    def close(self, *, now_ms: int) -> dict[int, UnmaskRequest]:
        """End collection; return the unmask request for each survivor (empty if none needed).

        Raises:
            SecAggAbortedError: fewer survivors than the threshold.
            PrivacyError: ``pairwise`` mode, a site is missing and the deadline has not passed
                (recovering it now would let its late vector be unmasked); call again later.
        """
        if self._phase != "collecting" or self._closed:
            raise RuntimeError(f"round {self.round_id} is already closed ({self._phase}).")
        survivors = tuple(j for j in self.participants if j in self._vectors)
        dropped = tuple(j for j in self.participants if j not in self._vectors)
        if len(survivors) < self.threshold:
            self._abort()
            raise SecAggAbortedError(
                f"round {self.round_id}: only {len(survivors)} of {len(self.participants)} sites "
                f"sent masked inputs (missing: {list(dropped)}); the threshold is "
                f"{self.threshold}; keep the previous model",
                round_id=self.round_id,
                missing=dropped,
            )
        double = self.config.mode == "double"
        if dropped and not double and now_ms < self.request.deadline_ms:
            raise PrivacyError(
                f"round {self.round_id}: cannot recover dropped sites {list(dropped)} before the "
                f"round deadline (in {self.request.deadline_ms - now_ms} ms); in pairwise mode a "
                "vector arriving after recovery would expose its site's update — wait for the "
                "deadline or use mode 'double'"
            )
        self._closed = True
        self._survivors, self._dropped = survivors, dropped
        if dropped:
            logger.info(
                "secagg round %d: sites %s dropped; asking %d survivors to unmask",
                self.round_id,
                list(dropped),
                len(survivors),
            )
        if not dropped and not double:
            return {}
        self._phase = "unmasking"
        self._needs_unmask = True
        return {s: self._unmask_request(s) for s in survivors}

    def add_unmask_response(self, message: UnmaskResponse, *, sender: int) -> None:
        """Accept one survivor's answer to its unmask request."""
        site = message.site_id
        _check_sender(site, sender, "unmask response")
        self._check_binding(site, message.run_id, message.round_id, "unmask response")
        if self._phase != "unmasking":
            _fail(site, f"unmask response for round {self.round_id} is unexpected ({self._phase})")
        if site not in self._survivors:
            _fail(site, f"was not asked to unmask round {self.round_id}")
        if site in self._responses:
            _fail(site, f"already answered the unmask request of round {self.round_id} (duplicate)")
        if message.pair_sites != self._dropped:
            _fail(
                site,
                f"unmask response reveals pair seeds for {message.pair_sites}; expected the "
                f"dropped sites {self._dropped}",
            )
        expected_owners = self._survivors if self.config.mode == "double" else ()
        if message.share_owners != expected_owners:
            _fail(
                site,
                f"unmask response carries shares for {message.share_owners}; expected "
                f"{expected_owners}",
            )
        self._responses[site] = message

    def result(self) -> SecAggResult:
        """The exact sum of the survivors' quantized updates, dequantized to float32.

        Raises:
            SecAggAbortedError: survivors needed for unmasking did not answer (all survivors
                must answer when a site dropped; otherwise at least ``threshold``).
            ProtocolError: a reconstructed self-mask seed contradicts its commitment.
        """
        if not self._closed or self._phase in ("finished", "aborted"):
            raise RuntimeError(
                f"round {self.round_id}: result() needs a closed, unfinished round ({self._phase})."
            )
        survivors, dropped = self._survivors, self._dropped
        if self._needs_unmask:
            self._check_enough_responses()
        num_elements = self.request.num_elements
        accumulator = MaskAccumulator(num_elements + 1, bits=self.config.bits)
        for s in survivors:
            accumulator.add(self._vectors[s])
            if dropped:
                # Site s added its pair mask with d if s < d and subtracted it otherwise; undo
                # that (pair_sites == dropped was checked when the response arrived).
                for d, seed in zip(dropped, self._responses[s].pair_seeds, strict=True):
                    accumulator.add_mask(seed, negate=s < d)
        if self.config.mode == "double":
            for s in survivors:
                accumulator.add_mask(self._self_mask_seed(s), negate=True)
        total = accumulator.reduced()
        out_of_range = int(total[num_elements])
        summed = dequantize(total[:num_elements], config=self.config)
        self._phase = "finished"
        self._forget_inputs()
        if out_of_range:
            logger.warning(
                "secagg round %d: %d values were outside [-%s, %s] and were clipped",
                self.round_id,
                out_of_range,
                self.config.clip_range,
                self.config.clip_range,
            )
        return SecAggResult(
            round_id=self.round_id,
            total=summed,
            contributors=survivors,
            dropped=dropped,
            out_of_range=out_of_range,
            exchanges=2 if self._needs_unmask else 1,
        )

    # -- helpers -------------------------------------------------------------------------------

    def _check_binding(self, site: int, run_id: int, round_id: int, what: str) -> None:
        if run_id != self.request.run_id:
            _fail(site, f"{what} is for run {run_id}, this is run {self.request.run_id}")
        if round_id != self.round_id:
            _fail(
                site,
                f"{what} is for round {round_id}, expected round {self.round_id} "
                "(stale or replayed)",
            )

    def _unmask_request(self, site: int) -> UnmaskRequest:
        senders: tuple[int, ...] = ()
        shares: list[bytes] = []
        if self.config.mode == "double":
            senders = tuple(s for s in self._survivors if s != site)
            for s in senders:
                sent = self._inputs[s]
                shares.append(sent.encrypted_shares[sent.share_recipients.index(site)])
        return UnmaskRequest(
            run_id=self.request.run_id,
            round_id=self.round_id,
            site_id=site,
            survivors=self._survivors,
            dropped=self._dropped,
            share_senders=senders,
            encrypted_shares=tuple(shares),
        )

    def _check_enough_responses(self) -> None:
        silent = tuple(s for s in self._survivors if s not in self._responses)
        if self._dropped and silent:
            self._abort()
            raise SecAggAbortedError(
                f"round {self.round_id}: sites {list(silent)} did not answer the unmask request; "
                f"only they hold their pair masks with the dropped sites {list(self._dropped)}, "
                "so the sum cannot be recovered; keep the previous model",
                round_id=self.round_id,
                missing=silent,
            )
        if len(self._responses) < self.threshold:
            self._abort()
            raise SecAggAbortedError(
                f"round {self.round_id}: {len(self._responses)} unmask answers, fewer than the "
                f"threshold {self.threshold} (silent: {list(silent)}); keep the previous model",
                round_id=self.round_id,
                missing=silent,
            )

    def _self_mask_seed(self, owner: int) -> bytes:
        index = self._survivors.index(owner)
        shares = {u: r.seed_shares[index] for u, r in self._responses.items()}
        try:
            secret = combine_shares(shares, threshold=self.threshold, secret_bytes=SEED_BYTES)
        except ValueError:
            secret = b""
        commitment = seed_commitment(
            secret, run_id=self.request.run_id, round_id=self.round_id, site_id=owner
        )
        if not secret or commitment != self._inputs[owner].seed_commitment:
            self._abort()
            _fail(
                owner,
                f"self-mask seed of round {self.round_id} rebuilt from the shares of sites "
                f"{sorted(shares)} does not match its commitment: at least one share is corrupt",
            )
        return self_mask_seed(
            secret, run_id=self.request.run_id, round_id=self.round_id, site_id=owner
        )

    def _abort(self) -> None:
        self._phase = "aborted"
        self._forget_inputs()

    def _forget_inputs(self) -> None:
        """Drop the masked vectors and shares once the round is decided."""
        self._vectors.clear()
        self._inputs.clear()
        self._responses.clear()


def _check_sender(claimed: int, sender: int, what: str) -> None:
    if claimed != sender:
        _fail(sender, f"{what} claims to come from site {claimed}")


def _fail(site: int, problem: str) -> NoReturn:
    raise ProtocolError(f"site {site}: {problem}")
