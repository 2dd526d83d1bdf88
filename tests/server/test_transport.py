"""PromptGrid: the server loop over any Grid, noticing replies within tens of milliseconds."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from flwr.app import ConfigRecord, Message, RecordDict

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
