"""A short federation over the real ClientApp, server loop and Flower strategies (in process)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from opacus.accountants import RDPAccountant

from clinfed import wire
from clinfed.client.site import load_site_data
from clinfed.config import SimulationConfig, SiteGovernanceConfig
from clinfed.privacy.accountant import RDP_ORDERS, planned_steps
from clinfed.server.results import FederationResult
from clinfed.simulation import LocalGrid, run_inprocess_federation

Demo = Callable[..., SimulationConfig]
SITES = ["berlin", "nantes", "paris"]


def _recorded_run(*overrides: str) -> tuple[FederationResult, list[tuple[Message, Message]]]:
    """Run the demo federation in process, recording every (request, reply) pair."""
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
        result = run_inprocess_federation(_demo_config(*overrides))
    finally:
        LocalGrid.push_messages = original  # type: ignore[method-assign]
    return result, sent


@pytest.fixture(scope="module")
def federation() -> tuple[FederationResult, list[tuple[Message, Message]]]:
    """Five DP rounds of the demo federation (secure aggregation on, the default)."""
    return _recorded_run("rounds=5")


@pytest.fixture(scope="module")
def plain_federation() -> tuple[FederationResult, list[tuple[Message, Message]]]:
    """The same federation with secure aggregation explicitly off."""
    return _recorded_run("rounds=5", "secure_aggregation.enabled=false")


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
        if m.metadata.message_type == "query" and wire.SITE in r.content
    }
    return names[reply.metadata.src_node_id]


@pytest.mark.parametrize("which", ["federation", "plain_federation"])
def test_sites_send_only_model_arrays_and_whitelisted_scalars(
    which: str, request: pytest.FixtureRequest
) -> None:
    result, sent = request.getfixturevalue(which)
    secure = which == "federation"
    assert result.secure_aggregation is secure
    from tests.conftest import _demo_config

    record_counts = {len(load_site_data(s).y_train) for s in _demo_config().sites} | {
        len(load_site_data(s).y_test) for s in _demo_config().sites
    }
    kinds = set()
    for request_msg, reply in sent:
        kind = request_msg.metadata.message_type
        query = request_msg.content.config_records[wire.CONFIG].get(wire.Keys.QUERY)
        kinds.add(query or kind)
        assert not reply.has_error()
        content = reply.content
        model = request_msg.content.array_records.get(wire.ARRAYS)
        if kind == "train" and secure:
            # The model never leaves: only its weighted update, quantized and masked, as one
            # vector of 4 bytes per parameter (plus the masked clip count).
            assert set(content) == {wire.SECAGG, wire.METRICS}
            vector = content.config_records[wire.SECAGG]["secagg.vector"]
            num_params = sum(int(np.prod(a.shape)) for a in model.values())
            assert isinstance(vector, bytes) and len(vector) == 4 * (num_params + 1)
            _check_scalars(content.metric_records[wire.METRICS], wire.TRAIN_METRIC_KEYS)
        elif kind == "train":
            assert set(content) == {wire.ARRAYS, wire.METRICS}
            arrays = content.array_records[wire.ARRAYS]
            assert {k: a.shape for k, a in arrays.items()} == {k: a.shape for k, a in model.items()}
            _check_scalars(content.metric_records[wire.METRICS], wire.TRAIN_METRIC_KEYS)
        elif kind == "evaluate":
            assert set(content) == {wire.METRICS}
            _check_scalars(content.metric_records[wire.METRICS], wire.EVALUATE_METRIC_KEYS)
        elif query in (wire.QUERY_SITE_REPORT, wire.QUERY_SITE_CONFORMAL):
            # The end-of-run report: scalars, or one number per bin of a public grid (never per
            # record: no list is as long as a split, and the grids are the server's settings).
            assert set(content) == {wire.REPORT}
            report = content.metric_records[wire.REPORT]
            assert set(report) <= wire.REPORT_METRIC_KEYS
            for key, value in report.items():
                if isinstance(value, list):
                    assert key in wire.REPORT_LIST_KEYS
                    assert len(value) in (10, 50)  # report.reliability_bins, conformal_bins
                    assert len(value) not in record_counts
                else:
                    assert isinstance(value, int | float)
        else:
            assert query == wire.QUERY_SITE_INFO
            assert set(content) == ({wire.SITE, wire.STATS} | ({wire.SECAGG} if secure else set()))
            site = content.config_records[wire.SITE]
            assert set(site) == {"name", "schema-fingerprint", "num-features", "num-classes"}
            stats = content.metric_records[wire.STATS]
            d = int(site["num-features"])
            assert (
                len(stats["sum"]) == d and len(stats["sum-sq"]) == d
            )  # per feature, not per patient
            assert d not in record_counts
            if secure:  # public keys only
                advert = content.config_records[wire.SECAGG]
                assert all(not isinstance(v, list) for v in advert.values())
        for record in content.values():
            if isinstance(record, ArrayRecord):
                assert all(n not in record_counts for a in record.values() for n in a.shape)
    assert kinds == {
        wire.QUERY_SITE_INFO,
        "train",
        "evaluate",
        wire.QUERY_SITE_REPORT,
        wire.QUERY_SITE_CONFORMAL,
    }


def test_secure_aggregation_reaches_the_same_per_site_metrics(
    federation: tuple[FederationResult, list], plain_federation: tuple[FederationResult, list]
) -> None:
    secure = federation[0].final("evaluate")
    plain = plain_federation[0].final("evaluate")

    for site in SITES:
        assert secure[site].accuracy == pytest.approx(plain[site].accuracy, abs=0.02)
        assert secure[site].roc_auc == pytest.approx(plain[site].roc_auc, abs=0.01)


def _check_scalars(metrics: MetricRecord, allowed: frozenset[str]) -> None:
    assert set(metrics) <= allowed
    assert all(isinstance(v, int | float) for v in metrics.values())


@pytest.mark.parametrize("secure", ["true", "false"])
@pytest.mark.parametrize("strategy", ["fedprox", "fedadam", "fedyogi"])
def test_other_strategies_run(demo_config: Demo, strategy: str, secure: str) -> None:
    result = run_inprocess_federation(
        demo_config("rounds=3", f"strategy.name={strategy}", f"secure_aggregation.enabled={secure}")
    )

    assert not result.events, result.events  # e.g. FedAdam's float64 would be refused by sites
    assert all(v.dtype == torch.float32 for v in result.final_state.values())
    assert sorted(result.final("evaluate")) == SITES
    assert all(not math.isnan(m.accuracy) for m in result.final("evaluate").values())


def test_a_site_that_requires_dp_refuses_a_non_private_request(demo_config: Demo) -> None:
    config = demo_config("rounds=1", "train.dp=false")
    # No site policy here (it would refuse too): the site config's own privacy.required rules.
    relaxed = [
        dataclasses.replace(
            s,
            governance=SiteGovernanceConfig(),
            privacy=dataclasses.replace(s.privacy, required=s.name == "paris"),
        )
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
