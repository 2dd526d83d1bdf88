"""Client mods: checks wrapped around the site's handlers, composed as Flower mods.

``egress_guard_mod`` is the site's last line of defence: whatever a handler produced, a reply
leaves the site only if it contains nothing but the records and metric keys that
:mod:`clinfed.wire` allows for its message type, and model arrays with exactly the names, shapes
and dtypes of the arrays the server sent. Anything else is refused (the reply becomes an error
naming the violation) — never silently trimmed.
"""

from __future__ import annotations

import logging

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.clientapp.typing import ClientAppCallable

from clinfed import wire
from clinfed.errors import PrivacyError, ProtocolError
from clinfed.privacy.secagg import KeyAdvertisement, MaskedInput, RoundRequest, UnmaskResponse

__all__ = ["egress_guard_mod"]

logger = logging.getLogger(__name__)

_ALLOWED: dict[str, dict[str, type]] = {
    MessageType.TRAIN: {
        wire.ARRAYS: ArrayRecord,
        wire.METRICS: MetricRecord,
        wire.SECAGG: ConfigRecord,
    },
    MessageType.EVALUATE: {wire.METRICS: MetricRecord},
    MessageType.QUERY: {
        wire.SITE: ConfigRecord,
        wire.STATS: MetricRecord,
        wire.SECAGG: ConfigRecord,
        wire.REPORT: MetricRecord,
    },
}
_METRIC_KEYS = {
    MessageType.TRAIN: wire.TRAIN_METRIC_KEYS,
    MessageType.EVALUATE: wire.EVALUATE_METRIC_KEYS,
}
_SITE_KEYS = frozenset(
    {
        wire.Keys.SITE_NAME,
        wire.Keys.SCHEMA_FINGERPRINT,
        wire.Keys.NUM_FEATURES,
        wire.Keys.NUM_CLASSES,
    }
)
_STATS_KEYS = frozenset({wire.Keys.STATS_COUNT, wire.Keys.STATS_SUM, wire.Keys.STATS_SUM_SQ})


def _check(request: Message, reply: Message) -> None:
    kind = request.metadata.message_type.split(".")[0]
    allowed = _ALLOWED.get(kind)
    if allowed is None:
        raise PrivacyError(f"no reply is allowed to leave the site for a {kind!r} message.")
    content = reply.content
    for name, record in content.items():
        if name not in allowed or not isinstance(record, allowed[name]):
            raise PrivacyError(
                f"egress refused: record {name!r} may not leave the site in a {kind} reply."
            )
    if kind == MessageType.TRAIN:
        secure = wire.SECAGG in request.content
        if secure and (wire.ARRAYS in content or wire.SECAGG not in content):
            raise PrivacyError(
                "egress refused: in a secure-aggregation round only the masked update may leave, "
                "never the model."
            )
        if not secure and wire.SECAGG in content:
            raise PrivacyError("egress refused: a masked update in reply to a plain round.")
    if wire.SECAGG in content:
        _check_secagg(request, content.config_records[wire.SECAGG])
    if wire.METRICS in content:
        extra = set(content.metric_records[wire.METRICS]) - _METRIC_KEYS[kind]
        if extra:
            raise PrivacyError(
                f"egress refused: metric(s) {sorted(extra)} are not on the whitelist."
            )
        for key, value in content.metric_records[wire.METRICS].items():
            if not isinstance(value, int | float):
                raise PrivacyError(f"egress refused: metric {key!r} must be one scalar.")
    if wire.SITE in content and set(content.config_records[wire.SITE]) - _SITE_KEYS:
        raise PrivacyError("egress refused: unexpected key in the site description.")
    if wire.STATS in content and set(content.metric_records[wire.STATS]) - _STATS_KEYS:
        raise PrivacyError("egress refused: unexpected key in the feature aggregates.")
    if wire.REPORT in content:
        _check_report(content.metric_records[wire.REPORT])
    if wire.ARRAYS in content:
        sent = request.content.array_records.get(wire.ARRAYS)
        got = content.array_records[wire.ARRAYS]
        if sent is None:
            raise PrivacyError(
                "egress refused: model arrays in a reply to a request that had none."
            )
        expected = {k: (tuple(a.shape), a.dtype) for k, a in sent.items()}
        actual = {k: (tuple(a.shape), a.dtype) for k, a in got.items()}
        if expected != actual:
            raise PrivacyError(
                "egress refused: the reply's model arrays differ in names, shapes or dtypes from "
                "the global model the server sent."
            )


_MAX_REPORT_LIST = 100
"""Longest per-bin list a report may hold (the site's finest grid, see clinfed.client.report)."""


def _check_report(record: MetricRecord) -> None:
    """Report aggregates: whitelisted keys; scalars, or short per-bin lists where allowed."""
    extra = set(record) - wire.REPORT_METRIC_KEYS
    if extra:
        raise PrivacyError(
            f"egress refused: report key(s) {sorted(extra)} are not on the whitelist."
        )
    for key, value in record.items():
        if isinstance(value, list):
            if key not in wire.REPORT_LIST_KEYS or len(value) > _MAX_REPORT_LIST:
                raise PrivacyError(
                    f"egress refused: report key {key!r} must be one scalar, or one number per bin "
                    f"of a grid of at most {_MAX_REPORT_LIST} bins."
                )
        elif not isinstance(value, int | float):
            raise PrivacyError(f"egress refused: report key {key!r} must be a number.")


def _check_secagg(request: Message, record: ConfigRecord) -> None:
    """The secure-aggregation record must be exactly one well-formed protocol answer."""
    kind = request.metadata.message_type.split(".")[0]
    try:
        if kind == MessageType.TRAIN:
            masked = MaskedInput.from_record(record)
            asked = RoundRequest.from_record(request.content.config_records[wire.SECAGG])
            if masked.round_id != asked.round_id:
                raise PrivacyError("egress refused: masked update for another round.")
        elif wire.SECAGG_SETTINGS in request.content:
            KeyAdvertisement.from_record(record)
        else:
            UnmaskResponse.from_record(record)
    except ProtocolError as error:
        raise PrivacyError(
            f"egress refused: malformed secure-aggregation answer ({error})."
        ) from None


def egress_guard_mod(msg: Message, context: Context, call_next: ClientAppCallable) -> Message:
    """Let a reply leave the site only if it holds exactly what :mod:`clinfed.wire` allows."""
    reply = call_next(msg, context)
    if reply.has_error():
        return reply
    _check(msg, reply)
    return reply
