"""What the coordinating lab runs: the ServerApp, the server loop, strategies and results."""

from clinfed.server.federation import run_federation
from clinfed.server.results import FederationResult, write_results
from clinfed.server.strategies import create_strategy, register_strategy

__all__ = [
    "FederationResult",
    "create_strategy",
    "register_strategy",
    "run_federation",
    "write_results",
]
