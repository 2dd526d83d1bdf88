"""A whole federation on one machine with Flower's simulation engine (Ray backend).

The simulated sites run the same ClientApp as real hospitals; each reads its own site config, as
a real site would. Flower's ``run_simulation`` runs the ServerApp in this process and the
ClientApps in Ray workers, and shuts Ray down at the end, so nothing is left running.
"""

from __future__ import annotations

import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

from flwr.app import Context

from clinfed.client.app import build_client_app
from clinfed.config import SimulationConfig, SiteConfig
from clinfed.errors import ConfigError
from clinfed.server.app import build_server_app
from clinfed.server.results import FederationResult

__all__ = ["SimulationOutcome", "run_simulated_federation"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SimulationOutcome:
    """The result of a simulated run and the folder it was written to."""

    result: FederationResult
    folder: Path


@dataclass(frozen=True)
class _SimulatedSites:
    """Maps a simulated SuperNode (by ``partition-id``) to its site config. Picklable for Ray."""

    sites: tuple[SiteConfig, ...]

    def __call__(self, context: Context) -> SiteConfig:
        pid = context.node_config.get("partition-id")
        if not isinstance(pid, int) or not 0 <= pid < len(self.sites):
            raise ConfigError(f"simulated node has no valid partition-id ({pid!r}).")
        return self.sites[pid]


def run_simulated_federation(config: SimulationConfig) -> SimulationOutcome:
    """Run the federation described by ``config``; returns its results."""
    # Bake-in: never let Flower install dependencies at run time.
    os.environ.setdefault("FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION", "1")
    from flwr.simulation import run_simulation  # noqa: PLC0415 - imports Ray; keep the CLI light

    outcome: list[SimulationOutcome] = []

    def keep(result: FederationResult, folder: Path) -> None:
        outcome.append(SimulationOutcome(result, folder))

    run = config.run
    if run.min_sites > len(config.sites):
        raise ConfigError(
            f"min_sites is {run.min_sites} but the simulation has only {len(config.sites)} site(s)."
        )
    server_app = build_server_app(run, on_result=keep)
    client_app = build_client_app(_SimulatedSites(config.sites))
    backend = {
        "client_resources": {"num_cpus": config.federation.cpus_per_site, "num_gpus": 0.0},
        "init_args": {"num_cpus": max(1, os.cpu_count() or 1), "include_dashboard": False},
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        run_simulation(
            server_app=server_app,
            client_app=client_app,
            num_supernodes=len(config.sites),
            backend_config=backend,  # type: ignore[arg-type]
        )
    if not outcome:
        raise RuntimeError("the simulated federation ended without results; see the log above.")
    return outcome[0]
