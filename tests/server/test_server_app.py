"""The ServerApp's run settings: conf/run.yaml from the app, plus ``overrides`` of ``flwr run``."""

from __future__ import annotations

import pytest
from flwr.app import Context, RecordDict

from clinfed.errors import ConfigError
from clinfed.server.app import run_config_from_context
from tests.conftest import ROOT


def _context(overrides: str) -> Context:
    return Context(
        run_id=1,
        node_id=0,
        node_config={},
        state=RecordDict(),
        # absolute: the tests run against the installed package, which has no conf/ folder
        run_config={"config-file": str(ROOT / "conf" / "run.yaml"), "overrides": overrides},
    )


def test_overrides_are_applied_to_the_apps_run_config() -> None:
    config = run_config_from_context(_context("rounds=3 output_dir='my results'"))

    assert config.rounds == 3 and config.output_dir == "my results"


def test_unbalanced_quotes_in_overrides_are_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="not valid shell-quoted text"):
        run_config_from_context(_context("output_dir=Flower's-defaults"))
