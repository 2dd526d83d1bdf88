"""The one local training loop and the one evaluation loop.

Used by the ClientApp, the simulation, the benchmarks and every baseline (local-only, pooled), so
that a number in a benchmark is the number a hospital gets.

Training is DP-SGD through Opacus (``GradSampleModule`` for per-record gradients and
``DPOptimizer`` for clipping and noise) over in-memory tensors with **Poisson sampling**: at every
step each record joins the batch independently with probability ``q = batch_size / n``, and an
epoch is ``round(1 / q)`` steps — exactly the sampling that the accountant's analysis assumes
(Opacus' ``UniformWithReplacementSampler`` draws the same way). Clinical tables fit in memory, and
skipping the DataLoader removes most of the per-step Python overhead that dominates small models.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from torch import nn

from clinfed.client.metrics import accuracy, roc_auc
from clinfed.errors import PrivacyError

__all__ = [
    "EvalResult",
    "TrainResult",
    "TrainSettings",
    "evaluate",
    "predict_proba",
    "train",
]


@dataclass(frozen=True)
class TrainSettings:
    """Local training for one round. ``proximal_mu > 0`` adds FedProx's proximal term."""

    epochs: int
    batch_size: int
    lr: float
    max_grad_norm: float
    momentum: float = 0.0
    proximal_mu: float = 0.0


@dataclass(frozen=True)
class TrainResult:
    """What one round of local training did."""

    num_examples: int
    steps: int
    sample_rate: float
    mean_loss: float
    noise_multiplier: float | None


@dataclass(frozen=True)
class EvalResult:
    """Metrics of a model on one site's held-out split (``nan`` where undefined)."""

    num_examples: int
    loss: float
    accuracy: float
    roc_auc: float


def _loss(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    if logits.shape[1] == 1:
        return nn.functional.binary_cross_entropy_with_logits(
            logits[:, 0], labels.to(logits.dtype), reduction=reduction
        )
    return nn.functional.cross_entropy(logits, labels, reduction=reduction)


def train(
    model: nn.Module,
    features: torch.Tensor,
    labels: torch.Tensor,
    *,
    settings: TrainSettings,
    noise_multiplier: float | None,
    generator: torch.Generator,
) -> TrainResult:
    """Train ``model`` in place for ``settings.epochs`` epochs of Poisson-sampled steps.

    With ``noise_multiplier`` set this is DP-SGD: each record's gradient is clipped to
    ``settings.max_grad_norm`` and Gaussian noise of standard deviation
    ``noise_multiplier * max_grad_norm`` is added to the sum at every step, including steps whose
    Poisson batch is empty. ``None`` trains without privacy (baselines only). ``generator`` drives
    both the sampling and the noise; seed it from a secret the server does not know.
    """
    n = len(labels)
    if n == 0:
        raise PrivacyError("cannot train on an empty training split.")
    sample_rate = min(1.0, settings.batch_size / n)
    steps_per_epoch = max(1, round(1 / sample_rate))
    total_steps = steps_per_epoch * settings.epochs
    params = [p for p in model.parameters() if p.requires_grad]
    anchor = [p.detach().clone() for p in params] if settings.proximal_mu > 0 else []
    sgd = torch.optim.SGD(params, lr=settings.lr, momentum=settings.momentum)

    model.train()
    losses: list[float] = []
    if noise_multiplier is None:
        for _ in range(total_steps):
            batch = _poisson_batch(n, sample_rate, generator)
            sgd.zero_grad(set_to_none=True)
            if len(batch) == 0:
                continue
            loss = _loss(model(features[batch]), labels[batch])
            if anchor:
                loss = loss + 0.5 * settings.proximal_mu * sum(
                    ((p - a) ** 2).sum() for p, a in zip(params, anchor, strict=True)
                )
            loss.backward()  # type: ignore[no-untyped-call]
            sgd.step()
            losses.append(loss.item())
        return TrainResult(n, total_steps, sample_rate, _mean(losses), None)

    gsm = GradSampleModule(model, batch_first=True, loss_reduction="mean")
    # Opacus' per-layer backward hooks warn when the input needs no gradient (always the case
    # for data); the warning is about input gradients, which DP-SGD never uses.
    warnings.filterwarnings("ignore", message="Full backward hook is firing", category=UserWarning)
    optimizer = DPOptimizer(
        sgd,
        noise_multiplier=noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        expected_batch_size=settings.batch_size,
        loss_reduction="mean",
        generator=generator,
    )
    try:
        for _ in range(total_steps):
            batch = _poisson_batch(n, sample_rate, generator)
            optimizer.zero_grad(set_to_none=True)
            if len(batch) == 0:
                # An empty Poisson batch is still a step: the noise must be added (the
                # accountant counts it). Per-record gradients of zero records:
                for p in params:
                    p.grad_sample = torch.zeros((0, *p.shape), dtype=p.dtype)
            else:
                loss = _loss(gsm(features[batch]), labels[batch])
                loss.backward()  # type: ignore[no-untyped-call]
                losses.append(loss.item())
            # DP step, then the data-independent proximal term (post-processing of the
            # privatized gradient; Opacus would drop a loss term that has no per-record
            # gradient, so it is added here explicitly).
            if optimizer.pre_step():
                if anchor:
                    for p, a in zip(params, anchor, strict=True):
                        if p.grad is not None:
                            p.grad.add_(p.detach() - a, alpha=settings.proximal_mu)
                sgd.step()
    finally:
        gsm.to_standard_module()  # remove Opacus' hooks; the caller keeps its plain module
    return TrainResult(n, total_steps, sample_rate, _mean(losses), noise_multiplier)


def _poisson_batch(n: int, sample_rate: float, generator: torch.Generator) -> torch.Tensor:
    return (torch.rand(n, generator=generator) < sample_rate).nonzero().squeeze(1)


def _mean(values: list[float]) -> float:
    return float(np.mean(values)) if values else float("nan")


@torch.no_grad()
def predict_proba(model: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Class probabilities, shape ``[n, num_classes]`` (two columns for a binary model)."""
    model.eval()
    logits = model(features)
    if logits.shape[1] == 1:
        p = torch.sigmoid(logits[:, 0])
        return torch.stack([1 - p, p], dim=1)
    return torch.softmax(logits, dim=1)


@torch.no_grad()
def evaluate(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> EvalResult:
    """Loss, accuracy and ROC AUC of ``model`` on ``(features, labels)``."""
    n = len(labels)
    if n == 0:
        return EvalResult(0, math.nan, math.nan, math.nan)
    model.eval()
    loss = float(_loss(model(features), labels))
    probs = predict_proba(model, features).numpy()
    y = labels.numpy()
    return EvalResult(n, loss, accuracy(probs, y), roc_auc(probs, y))
