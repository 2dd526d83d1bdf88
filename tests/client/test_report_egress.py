"""The egress guard on report replies: whitelisted keys, scalars or short per-bin lists only."""

from __future__ import annotations

import pytest
from flwr.app import ConfigRecord, Context, Message, MessageType, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from clinfed import wire
from clinfed.client.mods import egress_guard_mod
from clinfed.errors import PrivacyError

K = wire.Keys


@pytest.fixture(autouse=True)
def _identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _query() -> Message:
    msg = Message(
        RecordDict({wire.CONFIG: ConfigRecord({K.QUERY: wire.QUERY_SITE_REPORT})}),
        dst_node_id=7,
        message_type=MessageType.QUERY,
    )
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg


def _reply_with(values: dict[str, object]) -> Message:
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})
    record = MetricRecord(values)  # type: ignore[arg-type]
    return egress_guard_mod(
        _query(),
        context,
        lambda msg, ctx: Message(RecordDict({wire.REPORT: record}), reply_to=msg),
    )


def test_a_report_of_scalars_and_per_bin_counts_leaves() -> None:
    reply = _reply_with(
        {K.NUM_EXAMPLES: 45, K.ACCURACY: 0.8, K.CONFORMAL_SCORE_COUNTS: [1] * 50, K.ECE: 0.1}
    )

    assert not reply.has_error()


@pytest.mark.parametrize(
    ("values", "reason"),
    [
        ({K.NUM_EXAMPLES: 45, "patient-scores": [0.1, 0.2]}, "not on the whitelist"),
        ({K.ACCURACY: [0.8, 0.9]}, "must be one scalar"),
        ({K.CONFORMAL_SCORE_COUNTS: [1] * 101}, "at most 100 bins"),
    ],
)
def test_a_report_with_anything_else_is_refused(values: dict[str, object], reason: str) -> None:
    with pytest.raises(PrivacyError, match=reason):
        _reply_with(values)
