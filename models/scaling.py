"""Federation-wide feature scaling without pooling a single row.

Each site reports, over its training split, the count and the per-feature sums and sums of
squares (:class:`FeatureStats`). The server adds them up — the federation's mean and standard
deviation follow exactly — and writes them into the model's :class:`~clinfed.models.Standardize`
buffers before the first round. Scaling each centre with its own statistics instead (as FLamby
does) makes the same feature mean different things at different sites and costs about 7 points
of accuracy on Fed-Heart-Disease.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from clinfed.models.tabular import Standardize

__all__ = ["FeatureStats", "set_standardization"]


@dataclass(frozen=True)
class FeatureStats:
    """Per-feature count, sum and sum of squares over a site's training split.

    The only data aggregate that leaves a site outside DP-SGD; see README "What leaves a site".
    """

    count: int
    total: tuple[float, ...]
    total_sq: tuple[float, ...]

    @staticmethod
    def of(x: torch.Tensor) -> FeatureStats:
        x64 = x.double()
        return FeatureStats(
            count=len(x),
            total=tuple(float(v) for v in x64.sum(0)),
            total_sq=tuple(float(v) for v in (x64**2).sum(0)),
        )

    def standardization(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(center, inv_scale)``: mean and 1/std, with constant features left unscaled."""
        mean = torch.tensor(self.total, dtype=torch.float64) / self.count
        var = torch.tensor(self.total_sq, dtype=torch.float64) / self.count - mean**2
        std = var.clamp_min(0).sqrt()
        inv = torch.where(std > 1e-8, 1 / std.clamp_min(1e-8), torch.ones_like(std))
        return mean.float(), inv.float()

    def __add__(self, other: FeatureStats) -> FeatureStats:
        return FeatureStats(
            count=self.count + other.count,
            total=tuple(a + b for a, b in zip(self.total, other.total, strict=True)),
            total_sq=tuple(a + b for a, b in zip(self.total_sq, other.total_sq, strict=True)),
        )


def set_standardization(model: nn.Module, center: torch.Tensor, inv_scale: torch.Tensor) -> None:
    """Overwrite the model's :class:`~clinfed.models.Standardize` buffers."""
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, Standardize):
                module.center.copy_(center)
                module.inv_scale.copy_(inv_scale)
