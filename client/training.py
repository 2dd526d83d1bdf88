"""The one local training loop and the one evaluation loop.

Used by the ClientApp, the simulation, the benchmarks and every baseline (local-only, pooled), so
that a number in a benchmark is the number a hospital gets.

Training is DP-SGD with Opacus' arithmetic: each record's gradient is clipped to ``max_grad_norm``
(flat clipping over all parameters, factor ``min(1, C / (‖g‖ + 1e-6))``), the clipped gradients are
summed, Gaussian noise of standard deviation ``noise_multiplier * max_grad_norm`` is added and the
sum is divided by the expected batch size — what Opacus' ``GradSampleModule`` + ``DPOptimizer``
compute, step for step and draw for draw from the same generator (``benchmarks/dp_throughput.py``
checks the two against each other). Sampling is **Poisson**: at every step each record joins the
batch independently with probability ``q = batch_size / n``, and an epoch is ``round(1 / q)``
steps — exactly the sampling that the accountant's analysis assumes (Opacus'
``UniformWithReplacementSampler`` draws the same way). Clinical tables fit in memory, and
skipping the DataLoader removes most of the per-step Python overhead that dominates small models.

Why not ``DPOptimizer`` itself: for the small models of this project per-step Python overhead, not
arithmetic, sets the speed, and Opacus' module hooks and optimizer wrapper made a DP step cost
2.5-5x a plain one; this loop costs 1.3-1.5x (``benchmarks/RESULTS.md``). Per-record gradients
come from Opacus' registered per-layer grad samplers, except for ``nn.Linear`` on
``[batch, features]`` inputs, whose per-record gradient ``b_i a_iᵀ`` is never materialized: its
norm is ``‖b_i‖·‖a_i‖`` (Opacus' ghost-clipping norm sampler) and the clipped sum is
``(f ⊙ b)ᵀ a``. Layers are captured by forward hooks and the layer outputs' gradients by one
``torch.autograd.grad`` call; parameters' ``.grad`` is written only by the DP step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from opacus import GradSampleModule
from torch import nn

from clinfed.client.metrics import accuracy, roc_auc
from clinfed.errors import PrivacyError
from clinfed.privacy.accountant import planned_steps

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
    """Local training for one round. ``proximal_mu > 0`` adds FedProx's proximal term.

    ``local_steps > 0`` fixes the number of Poisson-sampled steps per round (``epochs`` is then
    ignored); 0 trains ``epochs`` epochs of ``round(1 / q)`` steps.
    """

    epochs: int
    batch_size: int
    lr: float
    max_grad_norm: float
    momentum: float = 0.0
    proximal_mu: float = 0.0
    local_steps: int = 0


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
    _, total_steps = planned_steps(
        num_records=n,
        batch_size=settings.batch_size,
        epochs_per_round=settings.epochs,
        local_steps=settings.local_steps,
        rounds=1,
    )
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

    dp = _RecordLevelDP(
        model,
        params,
        max_grad_norm=settings.max_grad_norm,
        noise_multiplier=noise_multiplier,
        # Opacus' make_private: the expected Poisson batch q * n, which is n (not batch_size)
        # when batch_size > n; the noisy sum is averaged over the batch a step actually expects.
        expected_batch_size=max(1, round(sample_rate * n)),
        generator=generator,
    )
    try:
        for _ in range(total_steps):
            batch = _poisson_batch(n, sample_rate, generator)
            # Noise first (drawn after the batch, as DPOptimizer does): an empty Poisson batch is
            # still a step that the accountant counts, and its update is pure noise.
            dp.draw_noise()
            if len(batch) > 0:
                loss = _loss(model(features[batch]), labels[batch])
                dp.add_clipped_sum(loss, len(batch))
                losses.append(loss.item())
            dp.scale()
            # The data-independent proximal term is post-processing of the privatized gradient.
            if anchor:
                for p, a in zip(params, anchor, strict=True):
                    p.grad.add_(p.detach() - a, alpha=settings.proximal_mu)  # type: ignore[union-attr]
            sgd.step()
    finally:
        dp.close()  # remove the hooks; the caller keeps its plain module
    return TrainResult(n, total_steps, sample_rate, _mean(losses), noise_multiplier)


_GRAD_SAMPLERS = GradSampleModule.GRAD_SAMPLERS
"""Opacus' per-layer per-record gradient functions, by module type (``register_grad_sampler``)."""


class _RecordLevelDP:
    """Per-record clipping and Gaussian noise for ``params`` of ``model``; one instance per call.

    Every parameter's ``.grad`` is a view into one flat buffer that holds, after :meth:`scale`,
    ``(Σ_i clip(g_i) + N(0, (σC)² I)) / expected_batch_size`` — Opacus' ``DPOptimizer`` step with
    ``loss_reduction="mean"``. The noise of each parameter is drawn with one ``torch.normal`` call
    in ``params`` order, as Opacus' ``_generate_noise`` draws it (non-secure mode).
    """

    def __init__(
        self,
        model: nn.Module,
        params: list[nn.Parameter],
        *,
        max_grad_norm: float,
        noise_multiplier: float,
        expected_batch_size: int,
        generator: torch.Generator,
    ) -> None:
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise PrivacyError(
                f"noise_multiplier must be a finite number >= 0; found {noise_multiplier}."
            )
        # Opacus' own check: a trainable layer with buffers (BatchNorm) mixes records.
        GradSampleModule.validate(model, strict=True)
        dtypes = {p.dtype for p in params}
        if len(dtypes) > 1:
            raise PrivacyError(
                f"DP-SGD needs all trainable parameters in one dtype; found {dtypes}."
            )
        self._max_grad_norm = max_grad_norm
        self._std = noise_multiplier * max_grad_norm
        self._inv_batch = 1.0 / expected_batch_size
        self._generator = generator
        sizes = [p.numel() for p in params]
        self._flat = torch.zeros(sum(sizes), dtype=params[0].dtype if params else torch.float32)
        self._grads = [
            v.view_as(p) for v, p in zip(torch.split(self._flat, sizes), params, strict=True)
        ]
        grad_of = {id(p): g for p, g in zip(params, self._grads, strict=True)}
        self._layers: dict[nn.Module, list[tuple[nn.Parameter, torch.Tensor]]] = {}
        owner: dict[int, str] = {}
        for name, module in model.named_modules():
            own = [p for p in module.parameters(recurse=False) if p.requires_grad]
            if not own:
                continue
            if type(module) not in _GRAD_SAMPLERS:
                raise PrivacyError(
                    f"layer {name!r} ({type(module).__name__}) has no per-record gradient sampler, so "
                    "its records cannot be clipped. Use a model of the zoo, or register a sampler "
                    "with opacus.grad_sample.register_grad_sampler."
                )
            for p in own:
                if id(p) in owner:
                    raise PrivacyError(
                        f"layers {owner[id(p)]!r} and {name!r} share a parameter; per-record clipping "
                        "needs each parameter in one layer. Untie the weights."
                    )
                owner[id(p)] = name
            self._layers[module] = [(p, grad_of[id(p)]) for p in own]
        self._captured: list[tuple[nn.Module, torch.Tensor, torch.Tensor]] = []
        self._handles = [m.register_forward_hook(self._capture) for m in self._layers]
        for p, g in zip(params, self._grads, strict=True):
            p.grad = g

    def _capture(
        self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor
    ) -> None:
        if not isinstance(output, torch.Tensor) or len(inputs) != 1:
            raise PrivacyError(
                f"{type(module).__name__} must take one tensor and return one for per-record clipping."
            )
        self._captured.append((module, inputs[0].detach(), output))

    def draw_noise(self) -> None:
        """Overwrite every gradient with fresh N(0, (σC)²) noise from the caller's generator."""
        for g in self._grads:
            torch.normal(0.0, self._std, g.shape, generator=self._generator, out=g)

    def add_clipped_sum(self, loss: torch.Tensor, batch_size: int) -> None:
        """Add the clipped per-record gradients of ``loss`` (a mean over ``batch_size`` records)."""
        captured, self._captured = self._captured, []
        if len({id(m) for m, _, _ in captured}) != len(captured):
            raise PrivacyError(
                "a layer ran more than once in one forward pass; per-record clipping needs each "
                "layer once per record. Reuse the module's weights in a separate layer instead."
            )
        # Gradients of the batch-mean loss w.r.t. each layer's output: b_i / B for record i.
        backprops: tuple[torch.Tensor | None, ...] = torch.autograd.grad(
            loss, [out for _, _, out in captured], allow_unused=True
        )
        squared = torch.zeros(batch_size, dtype=self._flat.dtype)
        pending: list[
            tuple[nn.Module, torch.Tensor, torch.Tensor, dict[int, torch.Tensor] | None]
        ] = []
        for (module, x, _), b in zip(captured, backprops, strict=True):
            if b is None:  # the layer did not influence the loss: zero gradient
                continue
            own = self._layers[module]
            if type(module) is nn.Linear and x.dim() == 2:
                b2 = b.square().sum(1)
                for p, _ in own:
                    squared.add_(b2 * x.square().sum(1) if p is module.weight else b2)
                pending.append((module, x, b, None))
            else:
                # Opacus' samplers are linear in the backprops, so b / B gives g_i / B.
                samples = _GRAD_SAMPLERS[type(module)](module, [x], b)
                per_record = {id(p): samples[p].reshape(batch_size, -1) for p, _ in own}
                for s in per_record.values():
                    squared.add_(s.square().sum(1))
                pending.append((module, x, b, per_record))
        # ‖g_i‖ = B·sqrt(squared_i); Opacus' factor min(1, C / (‖g_i‖ + 1e-6)), times B for g_i.
        norms = squared.sqrt_().mul_(batch_size)
        factor = (self._max_grad_norm / norms.add_(1e-6)).clamp_(max=1.0).mul_(batch_size)
        for module, x, b, sampled in pending:
            own = self._layers[module]
            if sampled is None:
                weighted = b * factor[:, None]
                for p, g in own:
                    if p is module.weight:
                        g.addmm_(weighted.t(), x)
                    else:
                        g.add_(weighted.sum(0))
            else:
                for p, g in own:
                    g.view(-1).addmv_(sampled[id(p)].t(), factor)

    def scale(self) -> None:
        """Divide the noisy sum by the expected batch size (``loss_reduction="mean"``)."""
        self._flat.mul_(self._inv_batch)

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._captured.clear()


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
