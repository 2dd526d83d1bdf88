"""The soak (``benchmarks/soak.py``): many sites, many rounds, dropouts and a server restart.

The full soak (30 sites x 50 rounds, a few minutes) is marked ``soak`` and runs with
``tox -e soak``; a small version runs with the default tests.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _soak() -> Any:
    """``benchmarks.soak`` (the repository's benchmarks folder is not an installed package)."""
    from tests.conftest import import_benchmark

    return import_benchmark("soak")


def test_a_small_soak_accounts_for_every_round_across_a_restart() -> None:
    report = _soak().run_soak(
        sites=5, rounds=6, restart_after=3, dropout=0.1, seed=3, timeout_s=2.0
    )

    assert report.accounted, report.aborted_reasons
    assert report.completed + report.aborted == 6
    assert report.resumed_from == 3


@pytest.mark.soak
def test_soak_30_sites_50_rounds_dropouts_and_a_server_restart() -> None:
    # Act
    report = _soak().run_soak(sites=30, rounds=50, dropout=0.1, restart_after=25, seed=0)

    # Assert: it completed, every round has one record, memory did not grow by more than 10 %
    print(report.summary())
    assert report.accounted, report.aborted_reasons
    assert report.completed + report.aborted == 50
    assert report.resumed_from == 25
    assert report.down_at_start > 0 and report.lost_mid_round > 0
    assert report.rss_growth <= 0.10, report.summary()
