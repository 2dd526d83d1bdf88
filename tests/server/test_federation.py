"""A short federation over the real ClientApp, server loop and Flower strategies (in process)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from opacus.accountants import RDPAccountant

from clinfed import wire
from clinfed.client.site import load_site_data
from clinfed.config import SimulationConfig
from clinfed.privacy.accountant import RDP_ORDERS, planned_steps
from clinfed.server.results import FederationResult
from clinfed.simulation import LocalGrid, run_inprocess_federation

Demo = Callable[..., SimulationConfig]
SITES = ["berlin", "nantes", "paris"]


@pytest.fixture(scope="module")
def federation() -> tuple[FederationResult, list[tuple[Message, Message]]]:
    """Five DP rounds of the demo federation, recording every message a site sends."""
    from tests.conftest import _demo_config

    sent: list[tuple[Message, Message]] = []
    original = LocalGrid.push_messages

    def recording_push(self: LocalGrid, messages: Iterable[Message]) -> Iterable[str]:
        messages = list(messages)
        ids = list(original(self, messages))
        for msg in messages:
            reply = self._replies.get(msg.metadata.message_id)
            if reply is not None:
                sent.append((msg, reply))
        return ids

    LocalGrid.push_messages = recording_push  # type: ignore[method-assign]
    try:
        result = run_inprocess_federation(_demo_config("rounds=5"))
    finally:
        LocalGrid.push_messages = original  # type: ignore[method-assign]
    return result, sent


def test_every_site_has_its_own_metrics_and_auc_above_0_6(
    federation: tuple[FederationResult, list],
) -> None:
    result, _ = federation

    final = result.final("evaluate")
    assert sorted(final) == SITES
    for site, m in final.items():
        assert m.num_examples > 0, site
        assert m.roc_auc > 0.6, f"{site}: ROC AUC {m.roc_auc:.3f}"
        assert 0.5 < m.accuracy <= 1.0, site
    rounds = {(m.round, m.site) for m in result.metrics if m.phase == "evaluate"}
    assert rounds == {(r, s) for r in range(1, 6) for s in SITES}


def test_reported_epsilon_equals_an_independent_opacus_accountant_and_grows(
    federation: tuple[FederationResult, list],
) -> None:
    from tests.conftest import _demo_config

    _, sent = federation
    config = _demo_config("rounds=5")
    for site in config.sites:
        n = len(load_site_data(site).y_train)
        q, total = planned_steps(
            num_records=n, batch_size=config.run.train.batch_size, epochs_per_round=1, rounds=5
        )
        train_replies = [
            r.content.metric_records[wire.METRICS]
            for m, r in sent
            if m.metadata.message_type == "train" and _site_of(r, sent) == site.name
        ]
        assert len(train_replies) == 5
        sigma = float(train_replies[0][wire.Keys.NOISE_MULTIPLIER])
        reported = [float(m[wire.Keys.EPSILON]) for m in train_replies]
        for k, eps in enumerate(reported, start=1):
            independent = RDPAccountant()
            independent.history = [(sigma, q, total // 5 * k)]
            assert eps == pytest.approx(
                independent.get_epsilon(delta=site.privacy.delta, alphas=list(RDP_ORDERS)), rel=1e-9
            )
        assert reported == sorted(reported) and len(set(reported)) == 5
        assert reported[-1] <= site.privacy.epsilon


def _site_of(reply: Message, sent: list[tuple[Message, Message]]) -> str:
    """The site name a node gave in its discovery reply."""
    names = {
        r.metadata.src_node_id: str(r.content.config_records[wire.SITE][wire.Keys.SITE_NAME])
        for m, r in sent
        if m.metadata.message_type == "query"
    }
    return names[reply.metadata.src_node_id]


def test_sites_send_only_model_arrays_and_whitelisted_scalars(
    federation: tuple[FederationResult, list],
) -> None:
    _, sent = federation
    from tests.conftest import _demo_config

    record_counts = {len(load_site_data(s).y_train) for s in _demo_config().sites} | {
        len(load_site_data(s).y_test) for s in _demo_config().sites
    }
    kinds = set()
    for request, reply in sent:
        kind = request.metadata.message_type
        kinds.add(kind)
        assert not reply.has_error()
        content = reply.content
        if kind == "train":
            assert set(content) == {wire.ARRAYS, wire.METRICS}
            arrays = content.array_records[wire.ARRAYS]
            model = request.content.array_records[wire.ARRAYS]
            assert {k: a.shape for k, a in arrays.items()} == {k: a.shape for k, a in model.items()}
            _check_scalars(content.metric_records[wire.METRICS], wire.TRAIN_METRIC_KEYS)
        elif kind == "evaluate":
            assert set(content) == {wire.METRICS}
            _check_scalars(content.metric_records[wire.METRICS], wire.EVALUATE_METRIC_KEYS)
        else:
            assert kind == "query"
            assert set(content) == {wire.SITE, wire.STATS}
            site = content.config_records[wire.SITE]
            assert set(site) == {"name", "schema-fingerprint", "num-features", "num-classes"}
            stats = content.metric_records[wire.STATS]
            d = int(site["num-features"])
            assert (
                len(stats["sum"]) == d and len(stats["sum-sq"]) == d
            )  # per feature, not per patient
            assert d not in record_counts
        for record in content.values():
            if isinstance(record, ArrayRecord):
                assert all(n not in record_counts for a in record.values() for n in a.shape)
    assert kinds == {"query", "train", "evaluate"}


def _check_scalars(metrics: MetricRecord, allowed: frozenset[str]) -> None:
    assert set(metrics) <= allowed
    assert all(isinstance(v, int | float) for v in metrics.values())


@pytest.mark.parametrize("strategy", ["fedprox", "fedadam"])
def test_other_strategies_run(demo_config: Demo, strategy: str) -> None:
    result = run_inprocess_federation(demo_config("rounds=2", f"strategy.name={strategy}"))

    assert sorted(result.final("evaluate")) == SITES
    assert all(not math.isnan(m.accuracy) for m in result.final("evaluate").values())


def test_a_site_that_requires_dp_refuses_a_non_private_request(demo_config: Demo) -> None:
    config = demo_config("rounds=1", "train.dp=false")
    relaxed = [
        dataclasses.replace(s, privacy=dataclasses.replace(s.privacy, required=False))
        if s.name != "paris"
        else s
        for s in config.sites
    ]
    config = dataclasses.replace(config, sites=tuple(relaxed))

    result = run_inprocess_federation(config)

    refused = [e for e in result.events if e.kind == "train-refused"]
    assert len(refused) == 1 and refused[0].detail.startswith("paris: ")
    assert "requires differential privacy" in refused[0].detail
    assert sorted(result.final("train")) == ["berlin", "nantes"]
    assert math.isinf(result.final("train")["nantes"].epsilon)


def test_config_record_is_not_mutated_between_rounds(demo_config: Demo) -> None:
    # Flower strategies write "server-round" into the config they are given.
    result = run_inprocess_federation(demo_config("rounds=2"))
    assert isinstance(result.config_yaml, str) and "rounds: 2" in result.config_yaml
    assert ConfigRecord  # imported for the type of records above
