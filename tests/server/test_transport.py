"""PromptGrid: the server loop over any Grid, noticing replies within tens of milliseconds."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, RecordDict

from clinfed import wire
from clinfed.config import SimulationConfig
from clinfed.server.federation import run_federation
from clinfed.server.transport import PromptGrid
from clinfed.simulation import local_grid


def test_a_federation_over_a_prompt_grid_ends_like_one_over_the_grid_itself(
    demo_config: Callable[..., SimulationConfig],
) -> None:
    config = demo_config("rounds=2")

    direct = run_federation(local_grid(config), config.run)
    prompt = run_federation(PromptGrid(local_grid(config)), config.run)

    assert sorted(prompt.final()) == sorted(direct.final()) == ["berlin", "nantes", "paris"]
    assert len(prompt.round_seconds) == len(direct.round_seconds) == 2
    assert not prompt.events
    assert all(m.roc_auc > 0.6 for m in prompt.final().values())


def _query(grid: PromptGrid, node: int) -> Message:
    content = RecordDict({wire.CONFIG: ConfigRecord({wire.Keys.QUERY: wire.QUERY_SITE_INFO})})
    return grid.create_message(content, "query", node, "test")


def test_a_lost_reply_costs_the_timeout_and_the_others_are_returned(
    demo_config: Callable[..., SimulationConfig],
) -> None:
    inner = local_grid(demo_config())
    nodes = sorted(inner.get_node_ids())
    inner.reply_filter = lambda request, reply: (
        None if request.metadata.dst_node_id == nodes[0] else reply
    )
    grid = PromptGrid(inner, poll_s=0.05)

    started = time.monotonic()
    replies = list(grid.send_and_receive([_query(grid, n) for n in nodes], timeout=0.5))
    took = time.monotonic() - started

    assert sorted(r.metadata.src_node_id for r in replies) == nodes[1:]
    assert 0.5 <= took < 5


def test_the_poll_interval_must_be_sensible() -> None:
    with pytest.raises(ValueError, match="poll_s"):
        PromptGrid(None, poll_s=0)  # type: ignore[arg-type]


def test_the_model_travels_packed_and_a_packed_reply_that_does_not_fit_is_rejected(
    demo_config: Callable[..., SimulationConfig],
) -> None:
    config = demo_config("rounds=1", "secure_aggregation.enabled=false")
    grid = local_grid(config)
    seen: list[tuple[str, list[str]]] = []
    first = sorted(grid.get_node_ids())[0]

    def shorten_first(request: Message, reply: Message) -> Message:
        arrays = request.content.array_records.get(wire.ARRAYS)
        if arrays is not None:
            seen.append((request.metadata.message_type, list(arrays.keys())))
        if request.metadata.message_type == "train" and request.metadata.dst_node_id == first:
            flat = reply.content.array_records[wire.ARRAYS][wire.PACKED].numpy()
            reply.content[wire.ARRAYS] = ArrayRecord({wire.PACKED: Array(flat[:-1].copy())})
        return reply

    grid.reply_filter = shorten_first
    result = run_federation(grid, config.run)

    # every model on the wire, both ways, is one packed array
    assert seen and all(keys == [wire.PACKED] for _, keys in seen)
    [event] = [e for e in result.events if e.kind == "update-rejected"]
    assert "packed model of" in event.detail and event.detail.split(":")[0] in result.sites
    assert [r.status for r in result.rounds] == ["completed"]


def test_pack_and_unpack_are_inverse_and_refuse_what_does_not_fit() -> None:
    import numpy as np

    from clinfed.errors import ProtocolError

    layout = ArrayRecord(
        {
            "w": Array(np.arange(6, dtype=np.float32).reshape(2, 3)),
            "b": Array(np.ones(2, dtype=np.float32)),
        }
    )
    packed = wire.pack_arrays(layout)
    back = wire.unpack_arrays(packed, layout, sender="site x")
    assert {k: a.numpy().tolist() for k, a in back.items()} == {
        k: a.numpy().tolist() for k, a in layout.items()
    }
    with pytest.raises(ProtocolError, match="site x"):
        wire.unpack_arrays(
            ArrayRecord({wire.PACKED: Array(np.zeros(7, dtype=np.float32))}),
            layout,
            sender="site x",
        )
    with pytest.raises(ProtocolError, match="float64"):
        wire.unpack_arrays(ArrayRecord({wire.PACKED: Array(np.zeros(8))}), layout, sender="site x")
    with pytest.raises(ValueError, match="one dtype"):
        wire.pack_arrays(ArrayRecord({"a": Array(np.zeros(1)), "b": Array(np.zeros(1, np.int64))}))
