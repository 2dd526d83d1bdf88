"""Shared fixtures: the demo federation's configs, small enough for fast tests."""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

import pytest

from clinfed.config import SimulationConfig, load_simulation_config

ROOT = Path(__file__).resolve().parents[1]
SIMULATE_YAML = ROOT / "conf" / "simulate.yaml"
RAY_RUN_TIMEOUT_S = 900
"""Hang guard for one `clinfed simulate` on Flower's Ray engine (not a timing assertion): about
25 s on an idle 2-core machine, but Ray's start-up alone took 130 s (a run 200 s) with two other
CPU-bound processes running, and CI machines are shared."""


def import_benchmark(name: str) -> ModuleType:
    """``benchmarks.<name>`` from this repository's ``benchmarks/`` folder.

    Opacus installs an unrelated top-level package named ``benchmarks``; tests run against the
    installed clinfed with no repository folder on ``sys.path``. The repository goes first (the
    installed clinfed is already imported, so it stays what the tests use) and a foreign
    ``benchmarks`` already imported is forgotten.
    """
    ours = ROOT / "benchmarks"
    loaded = sys.modules.get("benchmarks")
    if loaded is not None and Path(getattr(loaded, "__file__", "") or "").parent != ours:
        for key in [k for k in sys.modules if k == "benchmarks" or k.startswith("benchmarks.")]:
            del sys.modules[key]
    if sys.path[:1] != [str(ROOT)]:
        sys.path.insert(0, str(ROOT))
    return importlib.import_module(f"benchmarks.{name}")


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
