"""Shared fixtures: the demo federation's configs, small enough for fast tests."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from clinfed.config import SimulationConfig, load_simulation_config

ROOT = Path(__file__).resolve().parents[1]
SIMULATE_YAML = ROOT / "conf" / "simulate.yaml"


@pytest.fixture
def repo_root() -> Path:
    return ROOT


def _demo_config(*overrides: str) -> SimulationConfig:
    return load_simulation_config(SIMULATE_YAML, list(overrides))


@pytest.fixture
def demo_config() -> Callable[..., SimulationConfig]:
    """Builds the demo federation's config (Paris, Nantes, Berlin) with ``key=value`` overrides."""
    return _demo_config


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Soak tests run only when asked for (``-m soak``, ``tox -e soak``): they take minutes."""
    if "soak" in (config.getoption("markexpr") or ""):
        return
    skip = pytest.mark.skip(reason="the soak takes minutes: run it with tox -e soak (-m soak)")
    for item in items:
        if "soak" in item.keywords:
            item.add_marker(skip)
