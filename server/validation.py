"""Update validation before aggregation, and optional robust aggregation — around any strategy.

Plain mode (secure aggregation off): every training reply is checked before the strategy sees
it — the arrays must have exactly the global model's names, shapes and dtypes, hold only finite
values, and differ from the global model by at most ``validation.max_update_norm`` (L2); the
record count must be between 1 and what the site declared at discovery. A failing reply is
dropped and the site named; the round goes on with the others. With
``robust_aggregation.method`` set, the kept updates are combined coordinate-wise (median or
trimmed mean) and handed to the strategy as one reply, as secure aggregation does with its sum,
so FedAvg, FedProx and FedAdam work unchanged on top (wrap, don't subclass).

Secure aggregation: the server never sees one update, so it can check only what travels in clear
or in the protocol's framing — the masked vector's length and encoding (rejected by the protocol
parser, :mod:`clinfed.privacy.secagg.messages`) and the clear record count. Finiteness and the
norm bound are checked by each site on its own update before masking
(:func:`clinfed.client.site.check_own_update`); a site that fails refuses to send.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import ArrayRecord, Message, MessageType, MetricRecord, RecordDict

from clinfed import wire
from clinfed.config import RobustAggregationConfig
from clinfed.errors import ProtocolError

__all__ = ["RejectedUpdate", "check_update", "robust_reply", "validate_replies"]

logger = logging.getLogger(__name__)
K = wire.Keys


@dataclass(frozen=True)
class RejectedUpdate:
    """A site's training reply that did not pass validation, and why (one line)."""

    site: str
    reason: str


def check_update(
    reply: Message,
    global_arrays: ArrayRecord,
    *,
    max_update_norm: float,
    max_examples: int | None,
) -> str | None:
    """Why ``reply`` cannot be aggregated, or ``None`` when it can (plain mode)."""
    arrays = reply.content.array_records.get(wire.ARRAYS)
    if arrays is None:
        return "no model arrays in the reply"
    if wire.is_packed(arrays) and not wire.is_packed(global_arrays):
        # still packed: the transport could not unpack it (wrong size or dtype)
        try:
            arrays = wire.unpack_arrays(arrays, global_arrays, sender="the site")
        except ProtocolError as error:
            return str(error).removeprefix("the site ")
    if set(arrays) != set(global_arrays):
        missing = sorted(set(global_arrays) - set(arrays))
        extra = sorted(set(arrays) - set(global_arrays))
        return f"wrong parameter names (missing {missing}, unexpected {extra})"
    squared = 0.0
    for name, expected in global_arrays.items():
        got = arrays[name]
        if tuple(got.shape) != tuple(expected.shape):
            return (
                f"parameter {name!r} has shape {tuple(got.shape)}, expected {tuple(expected.shape)}"
            )
        if got.dtype != expected.dtype:
            return f"parameter {name!r} has dtype {got.dtype}, expected {expected.dtype}"
        try:
            values = got.numpy()
        except Exception as error:  # noqa: BLE001 - undecodable bytes from the network
            return f"parameter {name!r} cannot be decoded ({type(error).__name__})"
        if not np.isfinite(values).all():
            bad = int(np.count_nonzero(~np.isfinite(values)))
            return f"parameter {name!r} holds {bad} NaN/Inf value(s)"
        diff = values.astype(np.float64) - expected.numpy().astype(np.float64)
        squared += float(np.dot(diff.ravel(), diff.ravel()))
    norm = math.sqrt(squared)
    if not norm <= max_update_norm:
        return f"update norm {norm:.4g} exceeds validation.max_update_norm {max_update_norm:g}"
    metrics = reply.content.metric_records.get(wire.METRICS, MetricRecord())
    try:
        count = wire.read_int(metrics, K.NUM_EXAMPLES, sender="the site")
    except ProtocolError as error:
        return str(error)
    if count < 1 or (max_examples is not None and count > max_examples):
        return (
            f"claims {count} training records, but declared {max_examples} at discovery "
            "(the weight must be between 1 and the declared count)"
        )
    return None


def validate_replies(
    replies: Sequence[Message],
    global_arrays: ArrayRecord,
    *,
    names: Mapping[int, str],
    max_update_norm: float,
    declared_examples: Mapping[str, int],
) -> tuple[list[Message], list[RejectedUpdate]]:
    """Split training replies into the ones to aggregate and the rejected ones (named)."""
    kept: list[Message] = []
    rejected: list[RejectedUpdate] = []
    for reply in replies:
        if reply.has_error():
            continue
        site = names.get(reply.metadata.src_node_id, f"node-{reply.metadata.src_node_id}")
        reason = check_update(
            reply,
            global_arrays,
            max_update_norm=max_update_norm,
            max_examples=declared_examples.get(site),
        )
        if reason is None:
            kept.append(reply)
        else:
            rejected.append(RejectedUpdate(site, reason))
            logger.error("rejected the update of site %s: %s", site, reason)
    return kept, rejected


def _combine(
    stack: npt.NDArray[np.float64], config: RobustAggregationConfig
) -> npt.NDArray[np.float64]:
    if config.method == "median":
        return np.asarray(np.median(stack, axis=0), dtype=np.float64)
    cut = int(config.trim_fraction * stack.shape[0])
    ordered = np.sort(stack, axis=0)
    return np.asarray(ordered[cut : stack.shape[0] - cut].mean(axis=0), dtype=np.float64)


def robust_reply(replies: Sequence[Message], config: RobustAggregationConfig) -> Message:
    """One reply holding the coordinate-wise median or trimmed mean of the replies' models.

    Unweighted (as Flower's FedMedian and FedTrimmedAvg): a robust statistic should not let one
    site's (unverifiable) record count decide the result. The reply's record count is the sum.
    """
    first = replies[0].content.array_records[wire.ARRAYS]
    combined: dict[str, torch.Tensor] = {}
    for name, array in first.items():
        stack = np.stack(
            [r.content.array_records[wire.ARRAYS][name].numpy() for r in replies]
        ).astype(np.float64)
        combined[name] = torch.from_numpy(
            np.asarray(_combine(stack, config)).astype(array.numpy().dtype)
        )
    counts = [
        wire.read_int(r.content.metric_records[wire.METRICS], K.NUM_EXAMPLES, sender="a site")
        for r in replies
    ]
    losses = [
        wire.read_float(
            r.content.metric_records[wire.METRICS], K.TRAIN_LOSS, sender="a site", default=math.nan
        )
        for r in replies
    ]
    total = sum(counts)
    loss = sum(n * v for n, v in zip(counts, losses, strict=True)) / total if total else math.nan
    content = RecordDict(
        {
            wire.ARRAYS: ArrayRecord(combined),
            wire.METRICS: MetricRecord({K.NUM_EXAMPLES: total, K.TRAIN_LOSS: loss}),
        }
    )
    return Message(content, dst_node_id=0, message_type=MessageType.TRAIN)
