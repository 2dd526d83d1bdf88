"""Micro-benchmark of one secure-aggregation round, all sites in this process.

Measures only the protocol's computation (quantization, masking, unmasking); no transport. The
machines are shared and noisy: compare variants as ratios within one run, never as absolute
thresholds in tests.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass

import numpy as np

from .config import MaskingMode, SecAggConfig
from .quantize import quantize
from .server import SecAggServer
from .site import SecAggSite

__all__ = ["SecAggTimings", "benchmark_round"]


@dataclass(frozen=True)
class SecAggTimings:
    """Seconds spent per step of one round (means over sites where per site)."""

    num_sites: int
    num_params: int
    mode: MaskingMode
    dropped: int
    quantize_seconds: float
    mask_seconds: float
    site_unmask_seconds: float
    server_seconds: float
    upload_bytes: int
    exchanges: int


def benchmark_round(
    num_sites: int,
    num_params: int,
    *,
    mode: MaskingMode = "pairwise",
    dropped: int = 0,
    seed: int = 0,
) -> SecAggTimings:
    """Time one round with ``num_sites`` sites and ``num_params`` float32 parameters.

    Args:
        num_sites: participants of the round (≥ 2).
        num_params: parameters per update.
        mode: ``"pairwise"`` or ``"double"``.
        dropped: how many participants drop after the round starts (they mask nothing).
        seed: seed of the synthetic updates (the protocol itself uses ``os.urandom``).

    Returns:
        ``mask_seconds``: mean time a site spends masking (key agreement, mask expansion,
        packing); ``server_seconds``: the server's total time to accept the vectors, unmask and
        dequantize; ``site_unmask_seconds``: mean time a survivor spends answering the unmask
        request (0 when there is none).
    """
    config = SecAggConfig(mode=mode, max_sites=max(2, num_sites), clip_range=1.0)
    run_id = 1
    server = SecAggServer(run_id=run_id, config=config)
    sites = [SecAggSite(run_id=run_id, site_id=i, config=config) for i in range(1, num_sites + 1)]
    for site in sites:
        server.add_key_advertisement(
            site.advertise_keys(server.setup_request(site.site_id)), sender=site.site_id
        )
    rng = np.random.default_rng(seed)
    round_ = server.start_round(
        round_id=1,
        participants=[s.site_id for s in sites],
        num_elements=num_params,
        deadline_ms=1 << 62,
    )
    senders = sites[: num_sites - dropped]

    quantize_time = mask_time = server_time = 0.0
    masked = []
    for site in senders:
        update = rng.normal(0.0, 0.01, num_params).astype(np.float32)
        start = time.perf_counter()
        quantized = quantize(update, weight=1.0, config=config, random_bytes=os.urandom)
        middle = time.perf_counter()
        masked.append(site.mask(round_.request, quantized, now_ms=0))
        end = time.perf_counter()
        quantize_time += middle - start
        mask_time += end - middle

    start = time.perf_counter()
    for message in masked:
        round_.add_masked_input(message, sender=message.site_id)
    requests = round_.close(now_ms=1 << 62)
    server_time += time.perf_counter() - start

    unmask_time = 0.0
    responses = []
    for site in senders:
        if site.site_id in requests:
            start = time.perf_counter()
            responses.append(site.unmask(requests[site.site_id]))
            unmask_time += time.perf_counter() - start

    start = time.perf_counter()
    for response in responses:
        round_.add_unmask_response(response, sender=response.site_id)
    result = round_.result()
    server_time += time.perf_counter() - start

    return SecAggTimings(
        num_sites=num_sites,
        num_params=num_params,
        mode=mode,
        dropped=dropped,
        quantize_seconds=quantize_time / len(senders),
        mask_seconds=mask_time / len(senders),
        site_unmask_seconds=unmask_time / len(responses) if responses else 0.0,
        server_seconds=server_time,
        upload_bytes=len(masked[0].vector) + sum(map(len, masked[0].encrypted_shares)),
        exchanges=result.exchanges,
    )
