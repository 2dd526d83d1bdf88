"""Kill the server between rounds, restart it with the same run id: the run resumes and ends with
the same final model as an uninterrupted run (in-process federation, real ClientApp)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from flwr.app import Message

from clinfed import wire
from clinfed.client.site import DPState, RoundPlan, RoundRequest, restore_dp_state
from clinfed.client.training import TrainSettings
from clinfed.config import SimulationConfig, SiteConfig, SiteDataConfig
from clinfed.errors import ConfigError, PrivacyError
from clinfed.privacy.accountant import DPStep
from clinfed.privacy.ledger import PrivacyLedger
from clinfed.server.checkpoint import checkpoint_path, load_checkpoint
from clinfed.server.federation import run_federation
from clinfed.server.results import FederationResult
from clinfed.simulation import local_grid

Demo = Callable[..., SimulationConfig]


class ServerKilledError(Exception):
    """Stands for the server process dying between two rounds."""


def _kill_after(round_: int) -> Callable[[FederationResult], None]:
    def hook(result: FederationResult) -> None:
        if result.rounds and result.rounds[-1].round == round_:
            raise ServerKilledError

    return hook


def _config(demo_config: Demo, tmp_path: Path, name: str, *extra: str) -> SimulationConfig:
    return demo_config(
        "rounds=4",
        f"output_dir={tmp_path / name}",
        f"checkpoint.dir={tmp_path / name / 'ckpt'}",
        "checkpoint.run_id=study-1",
        *extra,
    )


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k, value in a.items():
        assert torch.equal(value, b[k]), k


def _ledger_rounds(config: SimulationConfig, site: str) -> list[tuple[str, int]]:
    [s] = [s for s in config.sites if s.name == site]
    with PrivacyLedger.open(s.governance.ledger) as ledger:
        return [(r.run_id, r.server_round) for r in ledger.records()]


@pytest.mark.parametrize(
    "mode",
    [
        pytest.param(
            ("secure_aggregation.enabled=false", "strategy.name=fedadam"), id="plain-fedadam"
        ),
        pytest.param(("strategy.name=fedavg",), id="secagg-fedavg"),
    ],
)
def test_server_killed_between_rounds_resumes_with_the_same_final_model(
    demo_config: Demo, tmp_path: Path, mode: tuple[str, ...]
) -> None:
    # Arrange: one uninterrupted run; one killed after round 2, then restarted with the same id
    straight = _config(demo_config, tmp_path, "straight", *mode)
    expected = run_federation(local_grid(straight), straight.run)
    config = _config(demo_config, tmp_path, "killed", *mode)

    # Act
    with pytest.raises(ServerKilledError):
        run_federation(local_grid(config), config.run, on_round_end=_kill_after(2))
    saved = load_checkpoint(config.run)
    # a fresh server and a new Flower run: the sites' context state is gone too
    resumed = run_federation(local_grid(config), config.run)

    # Assert
    assert saved is not None and saved.last_round == 2
    _same(resumed.final_state, expected.final_state)
    assert resumed.resumed_from == 2
    assert [(r.round, r.status) for r in resumed.rounds] == [(r, "completed") for r in range(1, 5)]
    assert any(e.kind == "resumed" for e in resumed.events)
    # every site's reported epsilon after the last round equals the uninterrupted run's
    final_eps = {s: m.epsilon for s, m in resumed.final("train").items()}
    assert final_eps == pytest.approx({s: m.epsilon for s, m in expected.final("train").items()})
    # each site's ledger has rounds 1-4 of ONE run, once each: no under- and no double-counting
    for site in ("berlin", "nantes", "paris"):
        rounds = _ledger_rounds(config, site)
        assert [r for _, r in rounds] == [1, 2, 3, 4]
        assert {run for run, _ in rounds} == {"demo#study-1"}


def test_the_checkpoint_holds_fedadam_moments_and_is_replaced_atomically(
    demo_config: Demo, tmp_path: Path
) -> None:
    config = _config(
        demo_config,
        tmp_path,
        "adam",
        "secure_aggregation.enabled=false",
        "strategy.name=fedadam",
        "rounds=2",
    )

    run_federation(local_grid(config), config.run)

    saved = load_checkpoint(config.run)
    assert saved is not None and saved.last_round == 2
    assert set(saved.strategy) == {"m_t", "v_t"}
    assert set(saved.privacy) == {"berlin", "nantes", "paris"}
    assert [p.name for p in checkpoint_path(config.run).parent.iterdir()] == ["checkpoint.pt"]


def test_a_completed_run_restarted_does_nothing_and_returns_its_model(
    demo_config: Demo, tmp_path: Path
) -> None:
    config = _config(demo_config, tmp_path, "done", "secure_aggregation.enabled=false", "rounds=1")
    first = run_federation(local_grid(config), config.run)

    again = run_federation(local_grid(config), config.run)

    _same(again.final_state, first.final_state)
    assert again.rounds == first.rounds


def test_resuming_with_other_settings_is_refused_naming_the_keys(
    demo_config: Demo, tmp_path: Path
) -> None:
    config = _config(demo_config, tmp_path, "other", "secure_aggregation.enabled=false", "rounds=1")
    run_federation(local_grid(config), config.run)
    changed = _config(
        demo_config,
        tmp_path,
        "other",
        "secure_aggregation.enabled=false",
        "rounds=3",
        "train.lr=0.1",
    )

    with pytest.raises(ConfigError, match=r"differs in: rounds, train.lr\)"):
        run_federation(local_grid(changed), changed.run)


def test_a_damaged_checkpoint_is_refused_in_one_line(demo_config: Demo, tmp_path: Path) -> None:
    config = _config(demo_config, tmp_path, "torn", "secure_aggregation.enabled=false")
    path = checkpoint_path(config.run)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not a checkpoint")

    with pytest.raises(ConfigError, match="unreadable") as error:
        run_federation(local_grid(config), config.run)
    assert "\n" not in str(error.value)


def test_a_round_rerun_after_a_crash_mid_round_is_refused_by_the_ledger_not_charged_twice(
    demo_config: Demo, tmp_path: Path
) -> None:
    # Arrange: the server dies during round 3's evaluation — after the sites trained and recorded
    # round 3 in their ledgers, before the server checkpointed it
    config = _config(demo_config, tmp_path, "midround", "secure_aggregation.enabled=false")

    def die_in_round_3_evaluation(request: Message, reply: Message) -> Message:
        rnd = request.content.config_records[wire.CONFIG].get(wire.Keys.SERVER_ROUND)
        if request.metadata.message_type == "evaluate" and rnd == 3:
            raise ServerKilledError
        return reply

    grid = local_grid(config)
    grid.reply_filter = die_in_round_3_evaluation
    with pytest.raises(ServerKilledError):
        run_federation(grid, config.run)

    # Act: the resumed server asks for round 3 again
    resumed = run_federation(local_grid(config), config.run)

    # Assert: each site restored rounds 1-3 from its ledger; training round 3 a second time would
    # overrun the run's budget, so every site refuses it (reported, model kept) and the run goes
    # on with round 4 — the data released once per round, never charged twice, never uncounted
    for site in ("berlin", "nantes", "paris"):
        assert [r for _, r in _ledger_rounds(config, site)] == [1, 2, 3, 4]
    assert [(r.round, r.status) for r in resumed.rounds] == [
        (1, "completed"),
        (2, "completed"),
        (3, "aborted"),
        (4, "completed"),
    ]
    refusals = [e for e in resumed.events if e.kind == "train-refused" and e.round == 3]
    assert len(refusals) == 3 and all("privacy budget refused" in e.detail for e in refusals)
    assert resumed.final("train")["paris"].round == 4


def test_a_site_without_ledger_or_state_counts_every_earlier_round_as_spent() -> None:
    site = SiteConfig(name="paris", data=SiteDataConfig(path="x.csv", schema="s.yaml"))
    step = DPStep(noise_multiplier=1.1, sample_rate=0.1, steps=10)
    request = RoundRequest(
        server_round=5,
        num_rounds=8,
        settings=TrainSettings(epochs=1, batch_size=8, lr=0.1, max_grad_norm=1.0),
        dp=True,
    )
    state = DPState(plan="p", noise_multiplier=1.1)

    line = restore_dp_state(
        RoundPlan(step=step, epsilon_after=0.1),
        request,
        site=site,
        state=state,
        ledger_history=None,
    )

    assert state.history == [step] * 4
    assert "worst case" in line


def test_a_ledger_whose_steps_differ_from_the_plan_is_refused() -> None:
    site = SiteConfig(name="paris", data=SiteDataConfig(path="x.csv", schema="s.yaml"))
    step = DPStep(noise_multiplier=1.1, sample_rate=0.1, steps=10)
    other = DPStep(noise_multiplier=0.7, sample_rate=0.1, steps=10)
    request = RoundRequest(
        server_round=3,
        num_rounds=8,
        settings=TrainSettings(epochs=1, batch_size=8, lr=0.1, max_grad_norm=1.0),
        dp=True,
    )

    with pytest.raises(PrivacyError, match="do not match"):
        restore_dp_state(
            RoundPlan(step=step, epsilon_after=0.1),
            request,
            site=site,
            state=DPState(),
            ledger_history=[step, other],
        )


def test_a_resumable_simulation_keeps_its_site_ledgers_across_restarts(
    demo_config: Demo, tmp_path: Path
) -> None:
    # clinfed simulate, run twice with the same checkpoint.run_id, must reuse the sites' ledgers
    # (a fresh ledger would make the sites forget what the run already spent)
    first = _config(demo_config, tmp_path, "sim")
    again = _config(demo_config, tmp_path, "sim")
    other = demo_config(f"output_dir={tmp_path / 'sim'}")

    assert [s.governance.ledger for s in first.sites] == [s.governance.ledger for s in again.sites]
    assert "study-1" in first.sites[0].governance.ledger
    assert first.sites[0].governance.ledger != other.sites[0].governance.ledger
