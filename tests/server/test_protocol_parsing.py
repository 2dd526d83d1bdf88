"""Property-based tests of what the server parses from the network: wire readers, the discovery
reply, training replies before aggregation, and checkpoints read back from disk.

Whatever arrives, the result is a value or a one-line ProtocolError/ConfigError (or, for a
training reply, a rejection reason) — never another exception that would stop the server.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from clinfed import wire
from clinfed.config import load_run_config
from clinfed.errors import ConfigError, ProtocolError
from clinfed.server.checkpoint import checkpoint_path, load_checkpoint
from clinfed.server.federation import SiteInfo, _parse_site_info
from clinfed.server.validation import check_update

K = wire.Keys


@pytest.fixture(autouse=True)
def _server_identity() -> None:
    """Flower stamps a Message's sender from TaskIdentity, as a ServerApp process has it."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


config_values = (
    st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.booleans()
    | st.text(max_size=8)
    | st.binary(max_size=8)
    | st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=4)
    | st.lists(st.floats(allow_nan=True), max_size=4)
    | st.lists(st.text(max_size=4), max_size=3)
)
metric_values = (
    st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.lists(st.integers(min_value=-(2**63), max_value=2**63 - 1), max_size=4)
    | st.lists(st.floats(allow_nan=True), max_size=4)
)
SITE_KEYS = [K.SITE_NAME, K.SCHEMA_FINGERPRINT, K.NUM_FEATURES, K.NUM_CLASSES, "other"]
STATS_KEYS = [K.STATS_COUNT, K.STATS_SUM, K.STATS_SUM_SQ, "other"]


@settings(max_examples=300, deadline=None)
@given(record=st.dictionaries(st.sampled_from(["a", "b", "c"]), config_values, max_size=3))
def test_every_wire_reader_returns_its_type_or_raises_protocol_error(
    record: dict[str, Any],
) -> None:
    readers = [
        (wire.read_int, int),
        (wire.read_float, float),
        (wire.read_str, str),
        (wire.read_bool, bool),
        (wire.read_floats, list),
        (wire.read_ints, list),
    ]
    for reader, kind in readers:
        try:
            value = reader(record, "a", sender="node 7")
        except ProtocolError as error:
            assert "node 7" in str(error) and "\n" not in str(error)
        else:
            assert isinstance(value, kind)
            if kind is int:
                assert not isinstance(value, bool)


@settings(max_examples=300, deadline=None)
@given(
    site=st.dictionaries(st.sampled_from(SITE_KEYS), config_values, max_size=5),
    stats=st.dictionaries(st.sampled_from(STATS_KEYS), metric_values, max_size=4),
    with_site=st.booleans(),
    with_stats=st.booleans(),
)
def test_any_discovery_reply_parses_or_raises_protocol_error(
    site: dict[str, Any], stats: dict[str, Any], with_site: bool, with_stats: bool
) -> None:
    content = RecordDict()
    if with_site:
        content[wire.SITE] = ConfigRecord(site)
    if with_stats:
        content[wire.STATS] = MetricRecord(stats)
    reply = Message(content, dst_node_id=0, message_type=MessageType.QUERY)
    try:
        info = _parse_site_info(reply)
    except ProtocolError as error:
        assert "\n" not in str(error)
    else:
        assert isinstance(info, SiteInfo)
        assert len(info.stats.total) == len(info.stats.total_sq) == info.num_features


GLOBAL = ArrayRecord({"w": torch.zeros(2, 3), "b": torch.zeros(2)})


@settings(max_examples=300, deadline=None)
@given(
    arrays=st.dictionaries(
        st.sampled_from(["w", "b", "x"]),
        hnp.arrays(
            dtype=st.sampled_from([np.float32, np.float64]),
            shape=st.sampled_from([(2, 3), (2,), (3, 2), (6,)]),
            elements=st.floats(allow_nan=True, allow_infinity=True, width=32),
        ),
        max_size=3,
    ),
    count=st.integers(min_value=-5, max_value=10**6) | st.floats(allow_nan=True),
    with_arrays=st.booleans(),
)
def test_any_training_reply_is_accepted_only_when_sound(
    arrays: dict[str, np.ndarray], count: float, with_arrays: bool
) -> None:
    content = RecordDict({wire.METRICS: MetricRecord({K.NUM_EXAMPLES: count})})
    if with_arrays:
        content[wire.ARRAYS] = ArrayRecord(
            {k: torch.from_numpy(v.copy()) for k, v in arrays.items()}
        )
    reply = Message(content, dst_node_id=0, message_type=MessageType.TRAIN)

    reason = check_update(reply, GLOBAL, max_update_norm=10.0, max_examples=1000)

    sound = (
        with_arrays
        and set(arrays) == {"w", "b"}
        and all(
            arrays[k].shape == GLOBAL[k].shape and arrays[k].dtype == np.float32 for k in arrays
        )
        and all(np.isfinite(a).all() for a in arrays.values())
        and float(np.sqrt(sum(np.square(a.astype(np.float64)).sum() for a in arrays.values())))
        <= 10
        and isinstance(count, int)
        and 1 <= count <= 1000
    )
    assert (reason is None) == sound, reason
    if reason is not None:
        assert "\n" not in reason


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(data=st.binary(max_size=300))
def test_any_bytes_as_a_checkpoint_raise_one_line_config_error(tmp_path: Path, data: bytes) -> None:
    config = load_run_config(None, [f"checkpoint.dir={tmp_path}", "checkpoint.run_id=r1"])
    path = checkpoint_path(config)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    try:
        load_checkpoint(config)
    except ConfigError as error:
        assert "\n" not in str(error)
    else:  # pragma: no cover - random bytes are never a torch archive
        raise AssertionError("random bytes loaded as a checkpoint")
