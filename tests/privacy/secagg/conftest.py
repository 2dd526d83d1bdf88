"""Shared helpers: a seeded randomness source and an in-process federation that drives rounds
through the wire format (every message goes through ``to_record``/``from_record``)."""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import numpy.typing as npt
import pytest

from clinfed.privacy.secagg import (
    KeyAdvertisement,
    MaskedInput,
    RoundRequest,
    SecAggConfig,
    SecAggResult,
    SecAggRound,
    SecAggServer,
    SecAggSite,
    UnmaskRequest,
    UnmaskResponse,
    quantize,
)

RUN_ID = 0xC11F_ED00_0000_0042
DEADLINE_MS = 1_000_000
BEFORE_DEADLINE_MS = DEADLINE_MS - 1
AFTER_DEADLINE_MS = DEADLINE_MS + 1


def seeded_random_bytes(seed: int) -> Callable[[int], bytes]:
    """Deterministic stand-in for ``os.urandom`` (tests only: not a cryptographic source)."""
    return random.Random(seed).randbytes


class Federation:
    """A server and ``num_sites`` sites in one process (the ``make_federation`` fixture)."""

    RUN_ID = RUN_ID
    DEADLINE_MS = DEADLINE_MS
    BEFORE_DEADLINE_MS = BEFORE_DEADLINE_MS
    AFTER_DEADLINE_MS = AFTER_DEADLINE_MS
    seeded_random_bytes = staticmethod(seeded_random_bytes)

    def __init__(self, num_sites: int, config: SecAggConfig, *, seed: int = 0) -> None:
        self.config = config
        self.server = SecAggServer(run_id=RUN_ID, config=config)
        self.sites = {
            i: SecAggSite(
                run_id=RUN_ID,
                site_id=i,
                config=config,
                random_bytes=seeded_random_bytes(seed * 1000 + i),
            )
            for i in range(1, num_sites + 1)
        }
        self.random_bytes = seeded_random_bytes(seed)
        for site in self.sites.values():
            self.advertise(site.site_id)

    def advertise(self, site_id: int) -> None:
        site = self.sites[site_id]
        message = site.advertise_keys(self.server.setup_request(site_id))
        self.server.add_key_advertisement(
            KeyAdvertisement.from_record(message.to_record()), sender=site_id
        )

    def open_round(
        self, round_id: int, num_elements: int, participants: Iterable[int] | None = None
    ) -> SecAggRound:
        chosen = list(self.sites) if participants is None else list(participants)
        return self.server.start_round(
            round_id=round_id,
            participants=chosen,
            num_elements=num_elements,
            deadline_ms=DEADLINE_MS,
        )

    def mask(
        self, site_id: int, round_: SecAggRound, update: npt.NDArray[np.floating], weight: float
    ) -> MaskedInput:
        request = RoundRequest.from_record(round_.request.to_record())
        quantized = quantize(
            update, weight=weight, config=self.config, random_bytes=self.random_bytes
        )
        message = self.sites[site_id].mask(request, quantized, now_ms=0)
        return MaskedInput.from_record(message.to_record())

    def unmask_all(
        self, round_: SecAggRound, requests: Mapping[int, UnmaskRequest], responders: Iterable[int]
    ) -> None:
        for site_id in responders:
            request = UnmaskRequest.from_record(requests[site_id].to_record())
            response = self.sites[site_id].unmask(request)
            round_.add_unmask_response(
                UnmaskResponse.from_record(response.to_record()), sender=site_id
            )

    def run_round(
        self,
        round_id: int,
        updates: Mapping[int, npt.NDArray[np.floating]],
        weights: Mapping[int, float],
        *,
        participants: Iterable[int] | None = None,
        senders: Iterable[int] | None = None,
    ) -> SecAggResult:
        """Open a round, let ``senders`` (default: all participants) send, unmask, return."""
        num_elements = next(iter(updates.values())).size
        round_ = self.open_round(round_id, num_elements, participants)
        chosen = round_.participants if senders is None else tuple(senders)
        for site_id in chosen:
            round_.add_masked_input(
                self.mask(site_id, round_, updates[site_id], weights[site_id]), sender=site_id
            )
        requests = round_.close(now_ms=AFTER_DEADLINE_MS)
        self.unmask_all(round_, requests, requests)
        return round_.result()


@pytest.fixture(scope="session")
def make_federation() -> type[Federation]:
    return Federation
