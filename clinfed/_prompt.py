"""Prompt polling inside Flower's deployment runtime (flwr 1.41), for sites and the server.

Flower's runtime waits in three places where a deployed round only needs milliseconds:

- the SuperNode sleeps 3 s between two polls for a message, 0.5 s between checks for a reply;
- every object pull that finds an object not there yet (a message still being relayed) retries
  after 1 s, then 2 s, 4 s… (``pull_objects``: SuperNode ← SuperLink, ClientApp ← SuperNode,
  ServerApp ← SuperLink) — and Flower hands a task to its ClientApp before the SuperNode has
  finished downloading the task's message, so the first pull nearly always waits;
- the ServerApp's Grid pulls replies every 3 s (see :class:`clinfed.server.transport.PromptGrid`).

These helpers shorten the waits of the first two without changing anything else. They touch
Flower internals by name; if a Flower release renames them the helpers say so in the log and
leave Flower as it is (slower, never wrong).
"""

from __future__ import annotations

import functools
import logging
import time
from types import ModuleType

__all__ = ["PULL_BACKOFF_CAP_S", "PULL_INITIAL_BACKOFF_S", "prompt_pulls", "prompt_sleeps"]

logger = logging.getLogger(__name__)

PULL_INITIAL_BACKOFF_S = 0.02
"""First retry of a pull that found its object missing (Flower: 1 s)."""

PULL_BACKOFF_CAP_S = 0.5
"""Longest wait between two retries of one pull (Flower: 10 s)."""


_PULL_FUNCTIONS = ("pull_objects", "pull_and_inflate_object_from_tree")


def prompt_pulls(module: ModuleType) -> bool:
    """Make ``module``'s object pulls retry after 20 ms (doubling up to 0.5 s), not after 1 s.

    Wraps whichever of ``pull_objects`` and ``pull_and_inflate_object_from_tree`` the module
    has. Only the defaults change: a caller that passes its own backoff keeps it; the time limit
    and the number of tries per object stay Flower's. Returns whether anything was changed.
    """
    changed = False
    for name in _PULL_FUNCTIONS:
        original = getattr(module, name, None)
        if original is None or not callable(original):
            continue
        changed = True
        if isinstance(original, functools.partial):
            continue  # already done
        setattr(
            module,
            name,
            functools.partial(
                original, initial_backoff=PULL_INITIAL_BACKOFF_S, backoff_cap=PULL_BACKOFF_CAP_S
            ),
        )
    if not changed:
        logger.warning("%s has no object pull to tune: pulls keep Flower's 1 s backoff", module)
    return changed


class _CappedSleep:
    """The ``time`` module as one Flower module sees it: no sleep is longer than ``cap_s``."""

    def __init__(self, cap_s: float) -> None:
        self._cap_s = cap_s

    def sleep(self, seconds: float) -> None:
        time.sleep(min(seconds, self._cap_s))

    def __getattr__(self, name: str) -> object:
        return getattr(time, name)


def prompt_sleeps(module: ModuleType, cap_s: float) -> bool:
    """Cap every ``time.sleep`` of ``module`` (a Flower polling loop) at ``cap_s`` seconds."""
    if getattr(module, "time", None) is not time:
        logger.warning("%s does not use the time module as expected: polls keep Flower's", module)
        return False
    module.time = _CappedSleep(cap_s)  # type: ignore[attr-defined]
    return True
