"""Secure aggregation in the federation: dropouts, aborts, bad messages — never silent.

Three sites (Paris, Nantes, Berlin), the real ClientApp and server loop, over the in-process grid
with failures injected into what the sites send.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest
from flwr.app import ConfigRecord, Message

from clinfed import wire
from clinfed.client import secure as site_secure
from clinfed.config import SimulationConfig
from clinfed.server.federation import run_federation
from clinfed.server.results import FederationResult
from clinfed.simulation import LocalGrid, local_grid

Demo = Callable[..., SimulationConfig]
FAST = (
    "round_timeout_s=10",
)  # a lost reply costs the full wait; room for three sites on a loaded CI machine


class Recorder:
    """Watches every (request, reply); can lose or rewrite replies of given sites and rounds."""

    def __init__(self) -> None:
        self.names: dict[int, str] = {}
        self.train_arrays: dict[int, dict[str, np.ndarray]] = {}  # round -> global model sent
        self.eval_arrays: dict[int, dict[str, np.ndarray]] = {}  # round -> model after the round
        self.secagg: dict[tuple[str, int], ConfigRecord] = {}  # (site, round) -> masked input
        self.lose: set[tuple[str, int]] = set()
        self.rewrite: dict[tuple[str, int], Callable[[Message], Message]] = {}

    def __call__(self, request: Message, reply: Message) -> Message | None:
        kind = request.metadata.message_type
        config = request.content.config_records.get(wire.CONFIG, ConfigRecord())
        node = request.metadata.dst_node_id
        if config.get(wire.Keys.QUERY) == wire.QUERY_SITE_INFO and not reply.has_error():
            self.names[node] = str(reply.content.config_records[wire.SITE]["name"])
        if kind in ("train", "evaluate"):
            rnd = int(config[wire.Keys.SERVER_ROUND])
            arrays = {k: a.numpy() for k, a in request.content.array_records[wire.ARRAYS].items()}
            (self.train_arrays if kind == "train" else self.eval_arrays)[rnd] = arrays
            if kind == "train":
                key = (self.names[node], rnd)
                if wire.SECAGG in reply.content:
                    self.secagg[key] = reply.content.config_records[wire.SECAGG]
                if key in self.lose:
                    return None
                if key in self.rewrite:
                    return self.rewrite[key](reply)
        return reply


@pytest.fixture
def updates(monkeypatch: pytest.MonkeyPatch) -> dict[tuple[int, int], tuple[float, np.ndarray]]:
    """Each site's true (weight, update) per (node, round), captured before masking."""
    seen: dict[tuple[int, int], tuple[float, np.ndarray]] = {}
    original = site_secure.mask_update

    def capture(context, request, update, *, weight, **kwargs):  # type: ignore[no-untyped-def]
        rnd = int(request["secagg.round"])
        seen[(context.node_id, rnd)] = (weight, update.copy())
        return original(context, request, update, weight=weight, **kwargs)

    monkeypatch.setattr(site_secure, "mask_update", capture)
    return seen


def _run(
    config: SimulationConfig,
    recorder: Recorder,
    between_rounds: Callable[[LocalGrid, int], None] | None = None,
) -> FederationResult:
    grid = local_grid(config)
    grid.reply_filter = recorder

    def on_round_end(result: FederationResult) -> None:
        if between_rounds is not None:
            between_rounds(grid, len(result.round_seconds))

    return run_federation(grid, config.run, on_round_end=on_round_end)


def _flat(arrays: dict[str, np.ndarray]) -> np.ndarray:
    return np.concatenate([a.ravel() for a in arrays.values()])


def _expected(recorder: Recorder, updates: dict, rnd: int, survivors: list[str]) -> np.ndarray:
    node = {name: n for n, name in recorder.names.items()}
    rows = [updates[(node[s], rnd)] for s in survivors]
    total = sum(w for w, _ in rows)
    return _flat(recorder.train_arrays[rnd]) + sum(w * u for w, u in rows) / total


def test_one_site_drops_after_keys_are_shared_and_the_survivors_sum_is_exact(
    demo_config: Demo, updates: dict
) -> None:
    recorder = Recorder()
    recorder.lose = {("berlin", 2)}

    result = _run(demo_config("rounds=2", *FAST), recorder)

    [event] = [e for e in result.events if e.kind == "secagg-dropout"]
    assert event.round == 2 and event.detail.startswith("berlin dropped")
    assert "2 exchanges" in event.detail
    got = _flat(recorder.eval_arrays[2])
    np.testing.assert_allclose(got, _expected(recorder, updates, 2, ["nantes", "paris"]), atol=1e-6)
    # and round 1, with everyone, is the exact weighted mean of all three
    np.testing.assert_allclose(
        _flat(recorder.eval_arrays[1]),
        _expected(recorder, updates, 1, ["berlin", "nantes", "paris"]),
        atol=1e-6,
    )


def test_a_site_down_at_round_start_is_simply_not_part_of_the_round(
    demo_config: Demo, updates: dict
) -> None:
    recorder = Recorder()

    def take_berlin_down(grid: LocalGrid, finished_round: int) -> None:
        if finished_round == 1:
            grid.dropped = {n for n, name in recorder.names.items() if name == "berlin"}

    result = _run(demo_config("rounds=2", *FAST), recorder, take_berlin_down)

    assert not [
        e for e in result.events if e.kind.startswith("secagg-")
    ]  # one exchange, no recovery
    np.testing.assert_allclose(
        _flat(recorder.eval_arrays[2]),
        _expected(recorder, updates, 2, ["nantes", "paris"]),
        atol=1e-6,
    )
    assert {m.site for m in result.metrics if m.round == 2 and m.phase == "train"} == {
        "nantes",
        "paris",
    }


def test_two_sites_drop_and_the_round_is_aborted_keeping_the_model(demo_config: Demo) -> None:
    recorder = Recorder()
    recorder.lose = {("berlin", 2), ("nantes", 2)}

    result = _run(demo_config("rounds=3", *FAST), recorder)

    [event] = [e for e in result.events if e.kind == "secagg-aborted"]
    assert event.round == 2 and "berlin" in event.detail and "nantes" in event.detail
    np.testing.assert_array_equal(_flat(recorder.eval_arrays[2]), _flat(recorder.train_arrays[2]))
    assert len(result.round_seconds) == 3  # the run went on (on_abort=continue)
    assert not np.array_equal(_flat(recorder.eval_arrays[3]), _flat(recorder.train_arrays[3]))


def test_abort_can_stop_the_run(demo_config: Demo) -> None:
    recorder = Recorder()
    recorder.lose = {("berlin", 1), ("nantes", 1)}

    result = _run(demo_config("rounds=3", "secure_aggregation.on_abort=stop", *FAST), recorder)

    assert [e.kind for e in result.events] == ["secagg-aborted", "run-stopped"]
    assert len(result.round_seconds) == 1


def _replay_round_1(recorder: Recorder) -> Callable[[Message], Message]:
    def rewrite(reply: Message) -> Message:
        reply.content[wire.SECAGG] = recorder.secagg[("berlin", 1)]
        return reply

    return rewrite


def _truncate(reply: Message) -> Message:
    record = reply.content.config_records[wire.SECAGG]
    record["secagg.vector"] = bytes(record["secagg.vector"])[:-4]  # type: ignore[arg-type]
    return reply


@pytest.mark.parametrize("attack", ["replayed", "malformed"])
def test_a_replayed_or_malformed_update_is_rejected_naming_the_site(
    demo_config: Demo, updates: dict, attack: str
) -> None:
    recorder = Recorder()
    recorder.rewrite = {
        ("berlin", 2): _replay_round_1(recorder) if attack == "replayed" else _truncate
    }

    result = _run(demo_config("rounds=2", *FAST), recorder)

    [rejected] = [e for e in result.events if e.kind == "secagg-rejected"]
    assert rejected.round == 2 and rejected.detail.startswith("berlin: ")
    np.testing.assert_allclose(
        _flat(recorder.eval_arrays[2]),
        _expected(recorder, updates, 2, ["nantes", "paris"]),
        atol=1e-6,
    )


def test_out_of_range_values_are_counted_and_reported(demo_config: Demo) -> None:
    result = _run(demo_config("rounds=1", "secure_aggregation.clip_range=1e-6"), Recorder())

    [event] = [e for e in result.events if e.kind == "secagg-out-of-range"]
    count = int(event.detail.split()[0])
    assert count > 0 and "clipped" in event.detail


def test_out_of_range_values_can_fail_the_round(demo_config: Demo) -> None:
    recorder = Recorder()

    result = _run(
        demo_config(
            "rounds=1",
            "secure_aggregation.clip_range=1e-6",
            "secure_aggregation.on_out_of_range=fail-round",
        ),
        recorder,
    )

    assert [e.kind for e in result.events] == ["secagg-out-of-range-failed"]
    np.testing.assert_array_equal(_flat(recorder.eval_arrays[1]), _flat(recorder.train_arrays[1]))


def test_turning_secure_aggregation_off_is_explicit_and_reported(demo_config: Demo) -> None:
    from clinfed.server.results import format_summary

    result = _run(demo_config("rounds=1", "secure_aggregation.enabled=false"), Recorder())

    assert result.secure_aggregation is False
    assert "secure aggregation OFF" in format_summary(result)
    assert not math.isnan(result.final("evaluate")["paris"].accuracy)
