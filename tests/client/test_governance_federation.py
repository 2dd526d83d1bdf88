"""The hospital's controls in a running federation: policy refusals, budget, ledger, audit.

In-process federation over the real ClientApp; each site has its own policy, ledger and audit log
in a temporary folder, as a deployed site has on its own machine.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from clinfed.client.audit import verify_audit_log
from clinfed.config import SimulationConfig, SiteGovernanceConfig
from clinfed.server.results import FederationResult
from clinfed.simulation import run_inprocess_federation

Demo = Callable[..., SimulationConfig]
DEMO_POLICY = Path(__file__).resolve().parents[2] / "conf" / "policies" / "demo-policy.yaml"


def _governed(config: SimulationConfig, folder: Path, **policy_changes: str) -> SimulationConfig:
    """Every site gets ``folder/<site>/{policy.yaml,ledger.jsonl,audit.jsonl}``."""
    text = DEMO_POLICY.read_text()
    for old, new in policy_changes.items():
        assert old in text, old
        text = text.replace(old, new)
    sites = []
    for site in config.sites:
        home = folder / site.name
        home.mkdir(parents=True, exist_ok=True)
        (home / "policy.yaml").write_text(text)
        governance = SiteGovernanceConfig(
            policy=str(home / "policy.yaml"),
            ledger=str(home / "ledger.jsonl"),
            audit_log=str(home / "audit.jsonl"),
        )
        sites.append(dataclasses.replace(site, governance=governance))
    return dataclasses.replace(config, sites=tuple(sites))


def _ledger_rounds(folder: Path, site: str) -> int:
    path = folder / site / "ledger.jsonl"
    if not path.exists():
        return 0
    return sum(
        1 for line in path.read_text().splitlines() if json.loads(line).get("kind") == "dp-sgd"
    )


def _refusals(result: FederationResult) -> dict[str, str]:
    return {
        e.detail.split(": ", 1)[0]: e.detail.split(": ", 1)[1]
        for e in result.events
        if e.kind == "train-refused"
    }


def test_every_spend_is_in_the_ledger_and_every_decision_in_the_audit_log(
    demo_config: Demo, tmp_path: Path
) -> None:
    config = _governed(demo_config("rounds=3", "federation.fresh_site_state=false"), tmp_path)

    result = run_inprocess_federation(config)

    assert not result.events
    for site in ("paris", "nantes", "berlin"):
        assert _ledger_rounds(tmp_path, site) == 3
        report = verify_audit_log(tmp_path / site / "audit.jsonl")
        # created + (request, decision) for the discovery query, 3 trainings, 3 evaluations and
        # the two end-of-run report queries
        assert report.ok and report.entries == 1 + 2 * (1 + 3 + 3 + 2)
        entries = [
            json.loads(line) for line in (tmp_path / site / "audit.jsonl").read_text().splitlines()
        ]
        accepted = [e for e in entries if e.get("decision") == "accepted" and "epsilon_run" in e]
        assert len(accepted) == 3 and all(e["bytes_sent"] > 0 for e in accepted)
        assert accepted[-1]["epsilon_run"] <= 1.0
        assert all(e["app"].startswith("clinfed ") for e in entries[1:])  # no FAB in simulation
        assert {e["message"] for e in entries if e.get("kind") == "request"} == {
            "query",
            "train",
            "evaluate",
        }


def test_a_run_that_would_exceed_the_remaining_budget_is_refused_before_training(
    demo_config: Demo, tmp_path: Path
) -> None:
    config = _governed(
        demo_config("rounds=3", "federation.fresh_site_state=false"),
        tmp_path,
        **{"  epsilon: 10.0": "  epsilon: 1.2"},
    )
    first = run_inprocess_federation(config)
    assert not _refusals(first)
    spent_before = ("paris", "nantes", "berlin")

    second = run_inprocess_federation(config)

    refused_round_1 = {
        e.detail.split(": ", 1)[0]
        for e in second.events
        if e.kind == "train-refused" and e.round == 1
    }
    assert refused_round_1 == {"berlin", "nantes", "paris"}
    assert all("budget" in e.detail for e in second.events if e.kind == "train-refused")
    assert not [m for m in second.metrics if m.round == 1 and m.phase == "train" and not m.error]
    # Whatever was trained later (a last round may still fit), the dataset's total never exceeds it.
    for site in spent_before:
        records = [
            json.loads(x) for x in (tmp_path / site / "ledger.jsonl").read_text().splitlines()
        ]
        assert max(r.get("eps_total", 0.0) for r in records) <= 1.2


@pytest.mark.parametrize(
    ("override", "policy_change", "expected"),
    [
        ("rounds=21", {}, "rounds 21 > run.max_rounds 20"),
        ("model.name=mlp", {"allowed_models: [logreg, mlp]": "allowed_models: [logreg]"}, "model"),
        (
            "secure_aggregation.enabled=false",
            {"require_secure_aggregation: false": "require_secure_aggregation: true"},
            "secure",
        ),
        ("rounds=2", {"min_noise_multiplier: 0.5": "min_noise_multiplier: 50"}, "noise"),
        ("train.max_grad_norm=5", {}, "max_grad_norm"),
    ],
)
def test_a_request_the_policy_forbids_is_refused_with_the_reason_at_the_server(
    demo_config: Demo, tmp_path: Path, override: str, policy_change: dict[str, str], expected: str
) -> None:
    config = _governed(
        demo_config(override, "federation.fresh_site_state=false"), tmp_path, **policy_change
    )

    result = run_inprocess_federation(config)

    refusals = _refusals(result)
    assert sorted(refusals) == ["berlin", "nantes", "paris"], result.events
    for reason in refusals.values():
        assert reason.startswith("policy refuses:") and expected in reason, reason
    assert all(_ledger_rounds(tmp_path, s) == 0 for s in refusals)
    entries = [json.loads(x) for x in (tmp_path / "paris" / "audit.jsonl").read_text().splitlines()]
    assert any(e.get("decision") == "refused" and expected in e.get("reason", "") for e in entries)


def test_the_server_can_stop_on_a_refusal(demo_config: Demo, tmp_path: Path) -> None:
    config = _governed(
        demo_config("rounds=21", "on_site_refusal=stop", "federation.fresh_site_state=false"),
        tmp_path,
    )

    result = run_inprocess_federation(config)

    assert result.events[-1].kind == "run-stopped"
    assert len(result.round_seconds) == 1
