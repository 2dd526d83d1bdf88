"""The strategy registry: Flower's current-API strategies, created by name from the run config."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypedDict

from flwr.serverapp.strategy import FedAdam, FedAvg, FedProx, FedYogi, Strategy

from clinfed import wire
from clinfed.config import StrategyConfig
from clinfed.errors import ConfigError

__all__ = ["StrategyFactory", "create_strategy", "register_strategy", "registered_strategies"]

StrategyFactory = Callable[[StrategyConfig, int], Strategy]
"""Builds a strategy from its config and the minimum number of sites per round."""

_STRATEGIES: dict[str, StrategyFactory] = {}


def register_strategy(name: str) -> Callable[[StrategyFactory], StrategyFactory]:
    """Register a strategy factory under ``name``; a name can be registered only once."""

    def decorator(factory: StrategyFactory) -> StrategyFactory:
        if name in _STRATEGIES:
            raise ValueError(f"a strategy named {name!r} is already registered.")
        _STRATEGIES[name] = factory
        return factory

    return decorator


def registered_strategies() -> tuple[str, ...]:
    """The names of all registered strategies, sorted."""
    return tuple(sorted(_STRATEGIES))


def create_strategy(config: StrategyConfig, *, min_sites: int) -> Strategy:
    """The strategy named ``config.name``, sampling every connected site each round."""
    if config.name not in _STRATEGIES:
        raise ConfigError(
            f"strategy.name must be one of {', '.join(registered_strategies())}; found {config.name!r}."
        )
    return _STRATEGIES[config.name](config, min_sites)


class _Common(TypedDict):
    fraction_train: float
    fraction_evaluate: float
    min_train_nodes: int
    min_evaluate_nodes: int
    min_available_nodes: int
    weighted_by_key: str
    arrayrecord_key: str
    configrecord_key: str


def _common(min_sites: int) -> _Common:
    return _Common(
        fraction_train=1.0,
        fraction_evaluate=1.0,
        min_train_nodes=min_sites,
        min_evaluate_nodes=min_sites,
        min_available_nodes=min_sites,
        weighted_by_key=wire.Keys.NUM_EXAMPLES,
        arrayrecord_key=wire.ARRAYS,
        configrecord_key=wire.CONFIG,
    )


@register_strategy("fedavg")
def _fedavg(config: StrategyConfig, min_sites: int) -> Strategy:
    del config
    return FedAvg(**_common(min_sites))


@register_strategy("fedprox")
def _fedprox(config: StrategyConfig, min_sites: int) -> Strategy:
    return FedProx(proximal_mu=config.proximal_mu, **_common(min_sites))


@register_strategy("fedadam")
def _fedadam(config: StrategyConfig, min_sites: int) -> Strategy:
    return FedAdam(
        eta=config.server_lr,
        beta_1=config.beta_1,
        beta_2=config.beta_2,
        tau=config.tau,
        **_common(min_sites),
    )


@register_strategy("fedyogi")
def _fedyogi(config: StrategyConfig, min_sites: int) -> Strategy:
    return FedYogi(
        eta=config.server_lr,
        beta_1=config.beta_1,
        beta_2=config.beta_2,
        tau=config.tau,
        **_common(min_sites),
    )
