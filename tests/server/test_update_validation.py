"""Bad updates and failing sites: rejected or tolerated, the site named, the round completes.

The real ClientApp and server loop over the in-process grid; failures are injected into what a
site sends (``LocalGrid.reply_filter``) or into its local training.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.supercore.task_identity import TaskIdentity

from clinfed import wire
from clinfed.client import app as client_app
from clinfed.config import RobustAggregationConfig, SimulationConfig, load_run_config
from clinfed.errors import ConfigError
from clinfed.server.federation import run_federation
from clinfed.server.results import FederationResult
from clinfed.server.validation import robust_reply
from clinfed.simulation import local_grid

Demo = Callable[..., SimulationConfig]
PLAIN = ("secure_aggregation.enabled=false",)
TIMEOUT = 2.0


@pytest.fixture(autouse=True)
def _server_identity() -> None:
    """Flower stamps a Message's sender from TaskIdentity, as a ServerApp process has it."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, SUPERLINK_NODE_ID


class Sabotage:
    """Rewrites or loses the training reply of one site in given rounds."""

    def __init__(self, site: str, rounds: set[int], action: Callable[[Message], Message | None]):
        self.site, self.rounds, self.action = site, rounds, action
        self.names: dict[int, str] = {}

    def __call__(self, request: Message, reply: Message) -> Message | None:
        config = request.content.config_records.get(wire.CONFIG, ConfigRecord())
        if config.get(wire.Keys.QUERY) == wire.QUERY_SITE_INFO and not reply.has_error():
            self.names[request.metadata.dst_node_id] = str(
                reply.content.config_records[wire.SITE]["name"]
            )
        if (
            request.metadata.message_type == "train"
            and self.names.get(request.metadata.dst_node_id) == self.site
            and int(config[wire.Keys.SERVER_ROUND]) in self.rounds
        ):
            return self.action(reply)
        return reply


def _arrays(transform: Callable[[str, np.ndarray], np.ndarray]) -> Callable[[Message], Message]:
    def rewrite(reply: Message) -> Message:
        arrays = reply.content.array_records[wire.ARRAYS]
        reply.content[wire.ARRAYS] = ArrayRecord(
            {k: torch.from_numpy(transform(k, a.numpy())) for k, a in arrays.items()}
        )
        return reply

    return rewrite


def _run(config: SimulationConfig, sabotage: Sabotage | None = None) -> FederationResult:
    grid = local_grid(config)
    grid.reply_filter = sabotage
    return run_federation(grid, config.run)


def _finite(result: FederationResult) -> bool:
    return all(bool(torch.isfinite(t).all()) for t in result.final_state.values())


def _nan(name: str, a: np.ndarray) -> np.ndarray:
    out = a.copy()
    out.flat[0] = np.nan
    return out


def _wrong_shape(name: str, a: np.ndarray) -> np.ndarray:
    # The model travels packed (one flat array): a wrong shape is a wrong number of values.
    return np.zeros((a.size + 1,), dtype=a.dtype)


@pytest.mark.parametrize(
    ("transform", "reason"),
    [
        pytest.param(_nan, "NaN/Inf", id="nan"),
        pytest.param(_wrong_shape, "packed model of", id="wrong-shape"),
        pytest.param(
            lambda k, a: a + np.float32(1e5), "exceeds validation.max_update_norm", id="norm"
        ),
        pytest.param(lambda k, a: a.astype(np.float64), "float64 values", id="dtype"),
    ],
)
def test_a_bad_update_is_rejected_the_site_named_and_the_round_completes(
    demo_config: Demo, transform: Callable[[str, np.ndarray], np.ndarray], reason: str
) -> None:
    config = demo_config("rounds=2", *PLAIN)

    result = _run(config, Sabotage("berlin", {1}, _arrays(transform)))

    [event] = [e for e in result.events if e.kind == "update-rejected"]
    assert event.round == 1 and event.detail.startswith("berlin: ") and reason in event.detail
    assert [(r.round, r.status) for r in result.rounds] == [(1, "completed"), (2, "completed")]
    assert "rejected: berlin" in result.rounds[0].detail
    assert _finite(result)
    assert "update-rejected: berlin" in "\n".join(f"{e.kind}: {e.detail}" for e in result.events)


def test_a_site_claiming_more_records_than_it_declared_is_rejected(demo_config: Demo) -> None:
    def inflate(reply: Message) -> Message:
        metrics = dict(reply.content.metric_records[wire.METRICS])
        metrics[wire.Keys.NUM_EXAMPLES] = 10**9
        reply.content[wire.METRICS] = MetricRecord(metrics)  # type: ignore[arg-type]
        return reply

    result = _run(demo_config("rounds=1", *PLAIN), Sabotage("paris", {1}, inflate))

    [event] = [e for e in result.events if e.kind == "update-rejected"]
    assert event.detail.startswith("paris: claims 1000000000 training records")
    assert result.rounds[0].status == "completed"


def test_a_malformed_reply_is_named_and_the_run_goes_on(demo_config: Demo) -> None:
    def garble(reply: Message) -> Message:
        reply.content[wire.METRICS] = MetricRecord({wire.Keys.NUM_EXAMPLES: 1.5})
        return reply

    result = _run(demo_config("rounds=1", *PLAIN), Sabotage("nantes", {1}, garble))

    [event] = [e for e in result.events if e.kind == "train-malformed"]
    assert event.detail.startswith("nantes: ")
    assert result.rounds[0].status == "completed"


def test_a_site_whose_training_diverges_refuses_to_send_under_secure_aggregation(
    demo_config: Demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Arrange: Berlin's local training produces NaN in round 1 (the server cannot see it: masked)
    original = client_app.run_round

    def diverging(model, data, request, plan, *, site, state):  # type: ignore[no-untyped-def]
        out = original(model, data, request, plan, site=site, state=state)
        if site.name == "berlin" and request.server_round == 1:
            with torch.no_grad():
                next(model.parameters()).fill_(math.nan)
        return out

    monkeypatch.setattr(client_app, "run_round", diverging)

    # Act
    result = _run(demo_config("rounds=2", f"round_timeout_s={TIMEOUT}"))

    # Assert: Berlin's refusal reaches the server with its reason; the others' sum is used
    [refusal] = [e for e in result.events if e.kind == "train-refused"]
    assert refusal.round == 1 and refusal.detail.startswith("berlin: site berlin refuses")
    assert "NaN/Inf" in refusal.detail
    assert [(r.round, r.status) for r in result.rounds] == [(1, "completed"), (2, "completed")]
    assert result.rounds[0].detail == "sum of nantes, paris"
    assert _finite(result)


@pytest.mark.parametrize("secure", [True, False], ids=["secagg", "plain"])
def test_a_site_killed_mid_round_the_round_completes_with_the_others_within_the_timeout(
    demo_config: Demo, secure: bool
) -> None:
    extra = () if secure else PLAIN
    config = demo_config("rounds=2", f"round_timeout_s={TIMEOUT}", *extra)

    started = time.monotonic()
    result = _run(config, Sabotage("berlin", {2}, lambda reply: None))  # its reply never comes
    elapsed = time.monotonic() - started

    assert [(r.round, r.status) for r in result.rounds] == [(1, "completed"), (2, "completed")]
    if secure:
        assert any(e.kind == "secagg-dropout" and e.round == 2 for e in result.events)
    assert elapsed < 4 * TIMEOUT + 30  # bounded: no wait without a deadline


def test_two_sites_killed_mid_round_abort_it_cleanly_and_keep_the_model(
    demo_config: Demo,
) -> None:
    config = demo_config("rounds=2", f"round_timeout_s={TIMEOUT}", *PLAIN)
    lost = Sabotage("berlin", {2}, lambda reply: None)
    also = Sabotage("nantes", {2}, lambda reply: None)
    grid = local_grid(config)

    def both(request: Message, reply: Message) -> Message | None:
        first = lost(request, reply)
        return None if first is None else also(request, first)

    grid.reply_filter = both
    result = run_federation(grid, config.run)

    assert [(r.round, r.status) for r in result.rounds] == [(1, "completed"), (2, "aborted")]
    assert "only 1 valid update(s) (paris), min_sites is 2" in result.rounds[1].detail
    assert any(e.kind == "round-aborted" and e.round == 2 for e in result.events)


def test_a_crashing_site_is_reported_and_the_round_completes(
    demo_config: Demo, monkeypatch: pytest.MonkeyPatch
) -> None:
    original = client_app.run_round

    def crash(model, data, request, plan, *, site, state):  # type: ignore[no-untyped-def]
        if site.name == "nantes":
            raise RuntimeError("segfault in a BLAS kernel")
        return original(model, data, request, plan, site=site, state=state)

    monkeypatch.setattr(client_app, "run_round", crash)

    result = _run(demo_config("rounds=1", f"round_timeout_s={TIMEOUT}"))

    [refusal] = [e for e in result.events if e.kind == "train-refused"]
    assert refusal.detail.startswith("nantes: ") and "segfault" in refusal.detail
    assert result.rounds[0].status == "completed"


def test_robust_median_ignores_one_outlying_site(demo_config: Demo) -> None:
    # Berlin's update stays inside the norm bound but points far away: the median ignores it
    config = demo_config(
        "rounds=1", *PLAIN, "robust_aggregation.method=median", "validation.max_update_norm=1000"
    )
    result = _run(config, Sabotage("berlin", {1}, _arrays(lambda k, a: a + np.float32(50.0))))
    plain = _run(
        demo_config("rounds=1", *PLAIN, "validation.max_update_norm=1000"),
        Sabotage("berlin", {1}, _arrays(lambda k, a: a + np.float32(50.0))),
    )

    weight = (
        "linear.weight" if "linear.weight" in result.final_state else next(iter(result.final_state))
    )
    assert float(result.final_state[weight].abs().max()) < 3
    assert float(plain.final_state[weight].abs().max()) > 5


def test_robust_reply_is_the_coordinate_wise_median_and_trimmed_mean() -> None:
    values = [np.array([[1.0, -5.0]], dtype=np.float32) * k for k in (1, 2, 3, 4, 100)]
    replies = [
        Message(
            content=RecordDict(
                {
                    wire.ARRAYS: ArrayRecord({"w": torch.from_numpy(v)}),
                    wire.METRICS: MetricRecord(
                        {wire.Keys.NUM_EXAMPLES: 10, wire.Keys.TRAIN_LOSS: 1.0}
                    ),
                }
            ),
            dst_node_id=0,
            message_type="train",
        )
        for v in values
    ]

    median = robust_reply(replies, RobustAggregationConfig(method="median"))
    trimmed = robust_reply(
        replies, RobustAggregationConfig(method="trimmed-mean", trim_fraction=0.2)
    )

    np.testing.assert_allclose(
        median.content.array_records[wire.ARRAYS]["w"].numpy(), [[3.0, -15.0]]
    )
    np.testing.assert_allclose(
        trimmed.content.array_records[wire.ARRAYS]["w"].numpy(), [[3.0, -15.0]]
    )
    assert median.content.metric_records[wire.METRICS][wire.Keys.NUM_EXAMPLES] == 50


def test_robust_aggregation_with_secure_aggregation_is_refused_in_one_line() -> None:
    with pytest.raises(ConfigError) as error:
        load_run_config(None, ["robust_aggregation.method=trimmed-mean"])

    message = str(error.value)
    assert "cannot be combined with secure aggregation" in message and "\n" not in message
    assert (
        load_run_config(
            None, ["robust_aggregation.method=median", "secure_aggregation.enabled=false"]
        ).robust_aggregation.method
        == "median"
    )


def test_too_few_connected_sites_skips_the_round_within_the_timeout(demo_config: Demo) -> None:
    config = demo_config("rounds=2", "round_timeout_s=1", *PLAIN)
    grid = local_grid(config)

    def drop_two(result: FederationResult) -> None:
        if len(result.rounds) == 1:
            grid.dropped = set(list(grid.get_node_ids())[:2])

    started = time.monotonic()
    result = run_federation(grid, config.run, on_round_end=drop_two)

    assert [(r.round, r.status) for r in result.rounds] == [(1, "completed"), (2, "aborted")]
    assert "only 1 site(s) connected" in result.rounds[1].detail
    assert time.monotonic() - started < 60


def test_a_site_vanishing_between_the_check_and_the_strategys_sampling_cannot_hang_the_round(
    demo_config: Demo,
) -> None:
    # Flower's sample_nodes waits with no time limit for min_sites nodes; here two sites vanish
    # right after the server checked that enough were connected. The strategy sees the fixed
    # snapshot, the messages to the vanished sites go unanswered, the round ends at its deadline.
    config = demo_config("rounds=1", "round_timeout_s=1", *PLAIN)
    grid = local_grid(config)
    real = grid.get_node_ids
    calls = {"n": 0}

    def flaky() -> list[int]:
        calls["n"] += 1
        nodes = list(real())
        return nodes if calls["n"] <= 2 else nodes[:1]  # discovery + the round's check

    grid.get_node_ids = flaky  # type: ignore[method-assign]
    outcome: list[FederationResult] = []
    worker = threading.Thread(target=lambda: outcome.append(run_federation(grid, config.run)))

    worker.start()
    worker.join(timeout=120)

    assert not worker.is_alive(), "the round hung"
    assert [r.status for r in outcome[0].rounds] == ["completed"]
