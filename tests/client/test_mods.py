"""The egress guard: nothing leaves a site that the wire whitelist does not allow."""

from __future__ import annotations

import pytest
import torch
from flwr.app import (
    ArrayRecord,
    ConfigRecord,
    Context,
    Message,
    MessageType,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from clinfed import wire
from clinfed.client.mods import egress_guard_mod
from clinfed.errors import PrivacyError


@pytest.fixture(autouse=True)
def _identity() -> None:
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1


def _request(kind: str = MessageType.TRAIN) -> Message:
    msg = Message(
        RecordDict(
            {wire.ARRAYS: ArrayRecord({"w": torch.zeros(2, 3)}), wire.CONFIG: ConfigRecord({})}
        ),
        dst_node_id=7,
        message_type=kind,
    )
    msg.metadata.__dict__["_message_id"] = "m1"
    return msg


def _context() -> Context:
    return Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})


def _handler(content: RecordDict):  # type: ignore[no-untyped-def]
    return lambda msg, ctx: Message(content, reply_to=msg)


def _good_metrics() -> MetricRecord:
    return MetricRecord({"num-examples": 10, "train-loss": 0.5, "epsilon": 0.1})


def test_a_well_formed_reply_passes() -> None:
    content = RecordDict(
        {wire.ARRAYS: ArrayRecord({"w": torch.ones(2, 3)}), wire.METRICS: _good_metrics()}
    )

    reply = egress_guard_mod(_request(), _context(), _handler(content))

    assert not reply.has_error()


@pytest.mark.parametrize(
    ("content", "reason"),
    [
        (
            RecordDict(
                {
                    wire.ARRAYS: ArrayRecord({"w": torch.ones(2, 3)}),
                    wire.METRICS: MetricRecord({"num-examples": 10, "patient-age": 63.0}),
                }
            ),
            "not on the whitelist",
        ),
        (
            RecordDict(
                {wire.ARRAYS: ArrayRecord({"w": torch.ones(5, 3)}), wire.METRICS: _good_metrics()}
            ),
            "differ in names, shapes or dtypes",
        ),
        (
            RecordDict(
                {
                    wire.ARRAYS: ArrayRecord({"w": torch.ones(2, 3), "rows": torch.ones(199, 16)}),
                    wire.METRICS: _good_metrics(),
                }
            ),
            "differ in names, shapes or dtypes",
        ),
        (
            RecordDict(
                {
                    wire.ARRAYS: ArrayRecord({"w": torch.ones(2, 3)}),
                    wire.METRICS: _good_metrics(),
                    "debug": ConfigRecord({"ids": ["a", "b"]}),
                }
            ),
            "record 'debug' may not leave",
        ),
        (
            RecordDict(
                {
                    wire.ARRAYS: ArrayRecord({"w": torch.ones(2, 3)}),
                    wire.METRICS: MetricRecord({"num-examples": 10, "epsilon": [0.1, 0.2]}),
                }
            ),
            "must be one scalar",
        ),
    ],
)
def test_anything_else_is_refused(content: RecordDict, reason: str) -> None:
    with pytest.raises(PrivacyError, match=reason):
        egress_guard_mod(_request(), _context(), _handler(content))


def test_evaluate_replies_may_not_carry_arrays() -> None:
    content = RecordDict(
        {wire.ARRAYS: ArrayRecord({"w": torch.ones(2, 3)}), wire.METRICS: _good_metrics()}
    )

    with pytest.raises(PrivacyError, match="record 'arrays' may not leave"):
        egress_guard_mod(_request(MessageType.EVALUATE), _context(), _handler(content))
