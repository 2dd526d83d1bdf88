"""clinfed's Flower ServerApp: the coordinating lab's side of a run."""

from __future__ import annotations

import logging
import shlex
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clinfed.config import RunConfig, load_run_config
from clinfed.server.federation import run_federation
from clinfed.server.results import FederationResult, format_summary, write_results

__all__ = ["app", "build_server_app", "run_config_from_context"]

logger = logging.getLogger(__name__)

ResultSink = Callable[[FederationResult, Path], None]


def run_config_from_context(context: Context) -> RunConfig:
    """The run settings of a ``flwr run``: ``config-file`` plus space-separated ``overrides``."""
    config_file = str(context.run_config.get("config-file", "conf/run.yaml"))
    overrides = shlex.split(str(context.run_config.get("overrides", "")))
    path = Path(config_file)
    return load_run_config(path if path.is_file() else None, overrides)


def build_server_app(
    config: RunConfig | None = None,
    *,
    on_result: ResultSink | None = None,
) -> ServerApp:
    """The ServerApp; ``config`` fixes the run settings (else they come from the run config)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run = config if config is not None else run_config_from_context(context)
        result = run_federation(grid, run)
        folder = write_results(result, run.output_dir)
        logger.info("results written to %s", folder)
        print(format_summary(result), end="", flush=True)
        if on_result is not None:
            on_result(result, folder)

    return server_app


app = build_server_app()
"""The deployment ServerApp (``flwr run``)."""
