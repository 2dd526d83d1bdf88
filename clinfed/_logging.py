"""Logging set-up for clinfed's entry points (libraries below them only use module loggers)."""

from __future__ import annotations

import logging
import sys

__all__ = ["configure_logging", "undo_opacus_root_handler"]

_OPACUS_FORMAT = "%(asctime)s:%(levelname)s:%(message)s"


def configure_logging(*, verbose: bool) -> None:
    """Send clinfed's own records to stderr, one line each, with time, level and module."""
    root = logging.getLogger("clinfed")
    if any(getattr(h, "_clinfed", False) for h in root.handlers):
        return
    handler = logging.StreamHandler(sys.stderr)
    handler._clinfed = True  # type: ignore[attr-defined]
    handler.setFormatter(
        logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s", "%H:%M:%S")
    )
    root.addHandler(handler)
    root.setLevel(logging.DEBUG if verbose else logging.INFO)
    root.propagate = False


def undo_opacus_root_handler() -> None:
    """Remove the root handler that importing Opacus installs with ``logging.basicConfig``.

    Flower's logger propagates to the root logger and sits at DEBUG; with Opacus' handler on the
    root, every Flower record (debug included) is printed twice. This is the one change to
    another library's logging that clinfed makes.
    """
    for handler in list(logging.root.handlers):
        fmt = getattr(handler.formatter, "_fmt", None)
        if fmt == _OPACUS_FORMAT:
            logging.root.removeHandler(handler)
