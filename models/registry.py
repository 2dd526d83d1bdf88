"""The model registry: models are created by name, resolved once from the run config."""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

from torch import nn

from clinfed.errors import ConfigError

__all__ = ["ModelFactory", "create_model", "register_model", "registered_models"]


class ModelFactory(Protocol):
    """Builds a model for ``num_features`` inputs and ``num_classes`` classes.

    Binary tasks (``num_classes == 2``) get one output logit; multi-class tasks get one logit per
    class. Factories take their own options as keyword arguments and must return a module that
    Opacus' ``ModuleValidator`` accepts (no BatchNorm; GroupNorm or LayerNorm instead).
    """

    def __call__(
        self, *, num_features: int, num_classes: int, hidden: list[int], dropout: float
    ) -> nn.Module: ...


_MODELS: dict[str, ModelFactory] = {}


def register_model(name: str) -> Callable[[ModelFactory], ModelFactory]:
    """Register a model factory under ``name``; a name can be registered only once."""

    def decorator(factory: ModelFactory) -> ModelFactory:
        if name in _MODELS:
            raise ValueError(f"a model named {name!r} is already registered.")
        _MODELS[name] = factory
        return factory

    return decorator


def registered_models() -> tuple[str, ...]:
    """The names of all registered models, sorted."""
    return tuple(sorted(_MODELS))


def create_model(
    name: str,
    *,
    num_features: int,
    num_classes: int,
    hidden: list[int] | None = None,
    dropout: float = 0.0,
) -> nn.Module:
    """Create the registered model ``name``."""
    if name not in _MODELS:
        raise ConfigError(
            f"model.name must be one of {', '.join(registered_models())}; found {name!r}."
        )
    if num_features < 1:
        raise ConfigError(f"a model needs at least one input feature; found {num_features}.")
    if num_classes < 2:
        raise ConfigError(f"a classifier needs at least two classes; found {num_classes}.")
    return _MODELS[name](
        num_features=num_features,
        num_classes=num_classes,
        hidden=list(hidden if hidden is not None else [32]),
        dropout=dropout,
    )
