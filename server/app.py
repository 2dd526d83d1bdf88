"""clinfed's Flower ServerApp: the coordinating lab's side of a run."""

from __future__ import annotations

import logging
import os
import shlex
from collections.abc import Callable
from pathlib import Path

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from clinfed._prompt import prompt_pulls
from clinfed.config import RunConfig, load_run_config
from clinfed.errors import ConfigError
from clinfed.server.federation import run_federation
from clinfed.server.report import write_report
from clinfed.server.results import FederationResult, format_summary, write_results
from clinfed.server.transport import PromptGrid

__all__ = ["app", "build_server_app", "run_config_from_context"]

logger = logging.getLogger(__name__)

ResultSink = Callable[[FederationResult, Path], None]


_APP_ROOT = Path(__file__).resolve().parent.parent


def run_config_from_context(context: Context) -> RunConfig:
    """The run settings of a ``flwr run``: ``config-file`` plus space-separated ``overrides``.

    A relative ``config-file`` is relative to the app's root folder (the FAB's, in deployment).
    """
    config_file = Path(str(context.run_config.get("config-file", "conf/run.yaml")))
    if not config_file.is_absolute():
        config_file = _APP_ROOT / config_file
    raw = str(context.run_config.get("overrides", ""))
    try:
        overrides = shlex.split(raw)
    except ValueError as error:
        raise ConfigError(
            f"the run config's overrides are not valid shell-quoted text ({error}): {raw!r}. "
            "Quote a value that holds spaces or quotes, e.g. output_dir='my results'."
        ) from None
    return load_run_config(config_file, overrides)


def _prompt_reply_pulls() -> None:
    """Deployment: pull a reply's objects with 20 ms retries, not Flower's 1 s backoff."""
    try:
        from flwr.superlink.grid import http_grid  # noqa: PLC0415
    except ImportError:  # pragma: no cover - another Flower layout: keep its defaults
        logger.warning("flwr.superlink.grid.http_grid not found: reply pulls keep Flower's backoff")
        return
    prompt_pulls(http_grid)


def build_server_app(
    config: RunConfig | None = None,
    *,
    on_result: ResultSink | None = None,
    print_summary: bool = True,
) -> ServerApp:
    """The ServerApp; ``config`` fixes the run settings (else they come from the run config)."""
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        run = config if config is not None else run_config_from_context(context)
        # Replies are noticed within 50 ms, not after Flower's 3 s pull interval (unless
        # CLINFED_POLL_S=flower asks for Flower's own, to measure the difference).
        prompt = os.environ.get("CLINFED_POLL_S") != "flower"
        if prompt:
            _prompt_reply_pulls()
        result = run_federation(PromptGrid(grid) if prompt else grid, run)
        folder = write_results(result, run.output_dir)
        logger.info("results written to %s", folder)
        if result.evaluation is not None:
            logger.info("report written to %s", write_report(folder))
        if print_summary:
            print(format_summary(result), end="", flush=True)
        if on_result is not None:
            on_result(result, folder)

    return server_app


app = build_server_app()
"""The deployment ServerApp (``flwr run``)."""
