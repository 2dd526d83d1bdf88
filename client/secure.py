"""The site's side of secure aggregation, over Flower records.

Three moments: the discovery query carries the server's :class:`SetupRequest` (the site answers
with its public keys — no extra exchange), each training request carries the round's
:class:`RoundRequest` (the site answers with its masked, quantized, weighted update *instead of*
its model), and, only when a site dropped, an unmask query (the site reveals that round's pair
seeds with the dropped sites). The protocol itself lives in :mod:`clinfed.privacy.secagg`; the
site's keys and round state stay in Flower's ``context.state`` on the site.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context

from clinfed import wire
from clinfed.errors import ProtocolError
from clinfed.privacy.secagg import (
    MaskedInput,
    RoundRequest,
    SecAggConfig,
    SecAggSite,
    SetupRequest,
    UnmaskRequest,
    quantize,
)

__all__ = ["flatten_update", "mask_update", "secagg_config_from_record", "setup_keys", "unmask"]

logger = logging.getLogger(__name__)
K = wire.Keys
_STATE = "clinfed.secagg"
_SERVER = "the server"


def secagg_config_from_record(record: ConfigRecord) -> SecAggConfig:
    """The run's secure-aggregation settings as the server announced them."""
    threshold = wire.read_int(record, K.SECAGG_THRESHOLD, sender=_SERVER)
    return SecAggConfig(
        mode=wire.read_str(record, K.SECAGG_MODE, sender=_SERVER),  # type: ignore[arg-type]
        bits=wire.read_int(record, K.SECAGG_BITS, sender=_SERVER),
        clip_range=wire.read_float(record, K.SECAGG_CLIP_RANGE, sender=_SERVER),
        max_sites=wire.read_int(record, K.SECAGG_MAX_SITES, sender=_SERVER),
        threshold=threshold if threshold > 0 else None,
        on_out_of_range=wire.read_str(record, K.SECAGG_ON_OUT_OF_RANGE, sender=_SERVER),  # type: ignore[arg-type]
    )


def _save(context: Context, site: SecAggSite, settings: ConfigRecord) -> None:
    context.state.config_records[_STATE] = ConfigRecord(site.export_state())  # type: ignore[arg-type]
    context.state.config_records[_STATE + ".settings"] = settings


def _load(context: Context) -> SecAggSite:
    state = context.state.config_records.get(_STATE)
    settings = context.state.config_records.get(_STATE + ".settings")
    if state is None or settings is None:
        raise ProtocolError(
            "the server sent a secure-aggregation request before key setup; restart the run."
        )
    try:
        return SecAggSite.from_state(dict(state), config=secagg_config_from_record(settings))
    except ValueError as error:
        raise ProtocolError(f"this site's secure-aggregation state is unusable: {error}") from None


def setup_keys(context: Context, request: ConfigRecord, settings: ConfigRecord) -> ConfigRecord:
    """Answer the server's setup request with fresh public keys; keep the secrets on the site."""
    setup = SetupRequest.from_record(request)
    site = SecAggSite(
        run_id=setup.run_id, site_id=setup.site_id, config=secagg_config_from_record(settings)
    )
    advert = site.advertise_keys(setup)
    _save(context, site, settings)
    return ConfigRecord(advert.to_record())  # type: ignore[arg-type]


def mask_update(
    context: Context,
    request: ConfigRecord,
    update: npt.NDArray[np.float32],
    *,
    weight: float,
    rounding_bytes: Callable[[int], bytes] | None = None,
) -> tuple[ConfigRecord, int]:
    """Quantize ``weight * update``, mask it for the round, and return it with the clip count.

    ``rounding_bytes`` is the stochastic rounding's randomness (default: the operating system's;
    a simulation with ``noise_seed`` passes a seeded one, so that runs are reproducible).
    """
    site = _load(context)
    round_request = RoundRequest.from_record(request)
    quantized = quantize(
        update, weight=weight, config=site.config, random_bytes=rounding_bytes or _urandom
    )
    if quantized.out_of_range:
        logger.warning(
            "secure aggregation round %d: %d of %d weighted update values lay outside "
            "[-%g, %g] and were clipped (reported to the server as a round total)",
            round_request.round_id,
            quantized.out_of_range,
            update.size,
            site.config.clip_range,
            site.config.clip_range,
        )
    masked: MaskedInput = site.mask(round_request, quantized, now_ms=int(time.time() * 1000))
    _save(context, site, context.state.config_records[_STATE + ".settings"])
    return ConfigRecord(masked.to_record()), quantized.out_of_range  # type: ignore[arg-type]


def unmask(context: Context, request: ConfigRecord) -> ConfigRecord:
    """Answer an unmask request (only sent when a site dropped during a round)."""
    site = _load(context)
    response = site.unmask(UnmaskRequest.from_record(request))
    _save(context, site, context.state.config_records[_STATE + ".settings"])
    return ConfigRecord(response.to_record())  # type: ignore[arg-type]


def flatten_update(
    before: ArrayRecord, after: Mapping[str, torch.Tensor]
) -> npt.NDArray[np.float32]:
    """The site's update ``after - before``, flattened in the global model's order."""
    parts = [
        (after[name].detach().cpu().numpy().astype(np.float32) - array.numpy()).ravel()
        for name, array in before.items()
    ]
    return np.concatenate(parts) if parts else np.zeros(0, dtype=np.float32)


def _urandom(n: int) -> bytes:
    import os  # noqa: PLC0415 - a named function keeps the randomness source explicit

    return os.urandom(n)
