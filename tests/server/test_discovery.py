"""Who takes part in a run: discovery waits for the expected sites and names every one it misses.

Flower's simulation engine starts the ServerApp thread before it registers the nodes, one by one,
so the server can see two of three nodes at first (this once left Berlin out of a CI run without
a word). These tests reproduce that with nodes that appear one at a time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

import pytest
from flwr.app import Message

from clinfed import wire
from clinfed.config import SimulationConfig
from clinfed.server.federation import run_federation
from clinfed.server.results import FederationResult, format_summary
from clinfed.simulation import LocalGrid, local_grid

Demo = Callable[..., SimulationConfig]
SITES = ["berlin", "nantes", "paris"]
FAST = ("rounds=1", "report.enabled=false")


class _Staggered(LocalGrid):
    """A grid whose nodes connect one at a time: two at first, one more per look."""

    def __init__(self, grid: LocalGrid, first: int = 2) -> None:
        super().__init__(grid._client_app, list(grid._contexts.values()))
        self._visible = first

    def get_node_ids(self) -> Iterable[int]:
        nodes = list(super().get_node_ids())[: self._visible]
        self._visible += 1
        return nodes


def _kinds(result: FederationResult) -> dict[str, list[str]]:
    kinds: dict[str, list[str]] = {}
    for event in result.events:
        kinds.setdefault(event.kind, []).append(event.detail)
    return kinds


def test_simulation_waits_for_every_site_even_when_nodes_connect_one_by_one(
    demo_config: Demo,
) -> None:
    config = demo_config(*FAST)
    assert config.run.expected_sites == 3  # the simulation expects all its sites

    result = run_federation(_Staggered(local_grid(config)), config.run)

    assert result.sites == SITES
    assert sorted(result.final("evaluate")) == SITES
    assert not [e for e in result.events if e.kind.startswith(("discovery", "late"))]


def test_a_site_that_connects_after_discovery_is_named_not_silently_left_out(
    demo_config: Demo,
) -> None:
    config = demo_config(*FAST, "expected_sites=2")

    result = run_federation(_Staggered(local_grid(config)), config.run)

    assert len(result.sites) == 2
    late = _kinds(result)["late-node-ignored"]
    assert len(late) == 1 and "connected after discovery" in late[0]
    assert "late-node-ignored" in format_summary(result)


def test_an_expected_site_that_never_connects_ends_the_wait_at_the_deadline(
    demo_config: Demo, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="clinfed")
    config = demo_config(*FAST, "round_timeout_s=1")
    grid = local_grid(config)
    grid.dropped = {next(iter(grid.get_node_ids()))}

    started = time.monotonic()
    result = run_federation(grid, config.run)

    assert len(result.sites) == 2 and len(result.final("evaluate")) == 2
    (detail,) = _kinds(result)["discovery-incomplete"]
    assert detail.startswith("only 2 of the 3 expected sites connected within 1 s")
    assert "discovery: 2 of 3 expected sites connected; waiting at most 1 s more" in caplog.text
    assert time.monotonic() - started < 60


def test_a_site_that_does_not_answer_discovery_is_named(demo_config: Demo) -> None:
    config = demo_config(*FAST, "round_timeout_s=1")
    grid = local_grid(config)
    silent = next(iter(grid.get_node_ids()))

    def lose_its_discovery_answer(request: Message, reply: Message) -> Message | None:
        query = request.content.config_records.get(wire.CONFIG, {}).get(wire.Keys.QUERY)
        is_discovery = query == wire.QUERY_SITE_INFO
        return None if is_discovery and request.metadata.dst_node_id == silent else reply

    grid.reply_filter = lose_its_discovery_answer
    result = run_federation(grid, config.run)

    assert len(result.sites) == 2
    (detail,) = _kinds(result)["discovery-no-answer"]
    assert detail == f"node {silent}: no answer to the discovery query within 1 s"
