"""Models for tabular clinical risk prediction: logistic regression and an MLP.

Both start with a :class:`Standardize` layer whose per-feature centre and scale are buffers
(not trained, not noised). The server sets them once, before the first round, from federation-wide
aggregates, so that every site feeds the model identically scaled features and the final model
carries its own preprocessing.
"""

from __future__ import annotations

import torch
from torch import nn

from clinfed.models.registry import register_model

__all__ = ["MLP", "LogisticRegression", "Standardize", "output_size"]


def output_size(num_classes: int) -> int:
    """One logit for a binary task, one per class otherwise."""
    return 1 if num_classes == 2 else num_classes


class Standardize(nn.Module):
    """``(x - center) * inv_scale`` with fixed, federation-wide buffers."""

    center: torch.Tensor
    inv_scale: torch.Tensor

    def __init__(self, num_features: int) -> None:
        super().__init__()
        self.register_buffer("center", torch.zeros(num_features))
        self.register_buffer("inv_scale", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.center) * self.inv_scale


class LogisticRegression(nn.Module):
    """Multinomial (or binary) logistic regression on standardized features."""

    def __init__(self, num_features: int, num_classes: int) -> None:
        super().__init__()
        self.standardize = Standardize(num_features)
        self.linear = nn.Linear(num_features, output_size(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.linear(self.standardize(x))
        return out


class MLP(nn.Module):
    """A small multi-layer perceptron (tanh: bounded activations suit clipped DP-SGD)."""

    def __init__(
        self, num_features: int, num_classes: int, hidden: list[int], dropout: float = 0.0
    ) -> None:
        super().__init__()
        self.standardize = Standardize(num_features)
        layers: list[nn.Module] = []
        width = num_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.Tanh()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, output_size(num_classes)))
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.layers(self.standardize(x))
        return out


@register_model("logreg")
def _logreg(*, num_features: int, num_classes: int, hidden: list[int], dropout: float) -> nn.Module:
    del hidden, dropout  # a linear model has neither
    return LogisticRegression(num_features, num_classes)


@register_model("mlp")
def _mlp(*, num_features: int, num_classes: int, hidden: list[int], dropout: float) -> nn.Module:
    return MLP(num_features, num_classes, hidden, dropout)
