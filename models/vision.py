"""A small CNN for medical images (e.g. 1x28x28 MedMNIST-style inputs).

GroupNorm, not BatchNorm: BatchNorm mixes records of a batch, so per-record gradients (and
therefore DP-SGD) are undefined for it; Opacus refuses it for that reason.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from clinfed.errors import ConfigError
from clinfed.models.registry import register_model
from clinfed.models.tabular import output_size

__all__ = ["SmallCNN"]


class SmallCNN(nn.Module):
    """Two conv blocks (conv, GroupNorm, ReLU, pool) and a linear head.

    Inputs arrive flattened (``num_features = channels * side * side``) like tabular rows and are
    reshaped here, so the same training loop serves both.
    """

    def __init__(self, channels: int, side: int, num_classes: int, width: int = 16) -> None:
        super().__init__()
        self.channels, self.side = channels, side
        self.features = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1),
            nn.GroupNorm(4, width),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1),
            nn.GroupNorm(4, 2 * width),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(4),
        )
        self.head = nn.Linear(2 * width * 16, output_size(num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, self.channels, self.side, self.side)
        out: torch.Tensor = self.head(self.features(x).flatten(1))
        return out


@register_model("cnn")
def _cnn(*, num_features: int, num_classes: int, hidden: list[int], dropout: float) -> nn.Module:
    del dropout
    for channels in (1, 3):
        side = math.isqrt(num_features // channels)
        if num_features % channels == 0 and side * side * channels == num_features and side >= 8:
            width = hidden[0] if hidden else 16
            if width % 4:
                raise ConfigError(
                    f"cnn width (model.hidden[0]) must be a multiple of 4; found {width}."
                )
            return SmallCNN(channels, side, num_classes, width)
    raise ConfigError(
        f"the cnn model needs square images of 1 or 3 channels, side >= 8, given as "
        f"channels*side*side flattened features; found {num_features} features."
    )
