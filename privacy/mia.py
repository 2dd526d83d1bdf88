"""Membership-inference audit: how well an attacker tells a site's training records from others.

An audit a site runs **on its own data, inside its own process**: the loss of a model on each
record is computed here and never returned, logged or sent — :func:`audit_membership` returns
only attack AUCs. Members are the records the model was trained on (the site's training split),
non-members records it never saw (the site's held-out split); the sets are balanced (all
non-members and as many members drawn at random) and the attacker scores each record, higher
meaning "member". The AUC of that score is 0.5 for a model that leaks nothing about membership.

Two attacks:

* **Loss threshold** (Yeom, Giacomelli, Fredrikson & Jha, CSF 2018): score ``-loss(x, y)`` —
  training records tend to have lower loss.
* **Difficulty-calibrated loss** (Watson, Guo, Cormode & Sablayrolles, ICLR 2022): score
  ``-(loss(x, y) - mean loss of reference models that did not train on x)``, which removes how
  hard a record is for *any* model — an atypical patient has a high loss whether or not it was
  trained on. Reference models are the target's architecture re-initialised and trained with
  the one training loop (:func:`clinfed.client.training.train`, without DP) on random halves of
  the site's records, in complementary pairs so that every record is left out of exactly half of
  them: "offline" calibration with OUT models only, as in Carlini et al.'s offline LiRA (S&P
  2022), which needs no model trained on the record being attacked.

:func:`dp_auc_bound` gives the largest AUC *any* attack can reach against an (ε, δ)-DP model
(from the hypothesis-testing view of DP, Kairouz, Oh & Viswanath, ICML 2015): the guarantee an
empirical AUC should be read against.
"""

from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from torch import nn

from clinfed.client.metrics import roc_auc
from clinfed.client.training import TrainSettings, predict_proba, train
from clinfed.errors import PrivacyError

__all__ = ["MembershipAudit", "audit_membership", "dp_auc_bound"]

logger = logging.getLogger(__name__)

_Array = npt.NDArray[np.float64]


@dataclass(frozen=True, kw_only=True)
class MembershipAudit:
    """Attack AUCs against one model on one site's records (aggregates only)."""

    members: int
    """Members in the balanced attack set (= ``non_members``)."""
    non_members: int
    reference_models: int
    loss_auc: float
    """Loss-threshold attack (Yeom et al., 2018)."""
    calibrated_auc: float
    """Difficulty-calibrated loss attack (Watson et al., 2022), offline reference models."""


def _losses(model: nn.Module, features: torch.Tensor, labels: torch.Tensor) -> _Array:
    # Per-record cross-entropy from the model's probabilities; stays inside this module.
    probs = predict_proba(model, features).double().numpy()
    picked = probs[np.arange(len(labels)), labels.numpy()]
    losses: _Array = -np.log(np.clip(picked, 1e-12, 1.0))
    return losses


def _auc(member_scores: _Array, non_member_scores: _Array) -> float:
    # roc_auc ranks column 1 against the labels (Mann-Whitney U, ties averaged): any real-valued
    # score works, not only probabilities.
    scores = np.concatenate([member_scores, non_member_scores])
    labels = np.concatenate([np.ones(len(member_scores)), np.zeros(len(non_member_scores))])
    return roc_auc(np.column_stack([-scores, scores]), labels.astype(np.int64))


def _reinitialised(model: nn.Module, seed: int) -> nn.Module:
    """A copy of ``model`` with fresh trainable weights (buffers such as scaling are kept)."""
    fresh = copy.deepcopy(model)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for name, module in fresh.named_modules():
            if not any(True for _ in module.parameters(recurse=False)):
                continue
            reset = getattr(module, "reset_parameters", None)
            if not callable(reset):
                raise PrivacyError(
                    f"layer {name!r} ({type(module).__name__}) has no reset_parameters(), so a "
                    "reference model cannot be trained from scratch; the audit would start from "
                    "the attacked model's weights. Add reset_parameters() to the layer."
                )
            reset()
    return fresh


def audit_membership(
    model: nn.Module,
    *,
    members: tuple[torch.Tensor, torch.Tensor],
    non_members: tuple[torch.Tensor, torch.Tensor],
    reference_settings: TrainSettings,
    reference_models: int = 8,
    seed: int,
) -> MembershipAudit:
    """Attack ``model`` with the loss-threshold and the difficulty-calibrated loss attacks.

    ``members`` and ``non_members`` are ``(features, labels)`` of the records the model was and
    was not trained on. ``reference_settings`` trains the reference models (use the target's
    hyper-parameters, with ``epochs`` = rounds × local epochs); ``reference_models`` must be
    even and ≥ 2. ``seed`` fixes the balanced sample, the halves and the references. Returns
    only the AUCs; no per-record value leaves this function.
    """
    if reference_models < 2 or reference_models % 2:
        raise PrivacyError(f"reference_models must be even and >= 2; found {reference_models}.")
    (x_in, y_in), (x_out, y_out) = members, non_members
    if min(len(y_in), len(y_out)) < 2:
        raise PrivacyError(
            f"a membership audit needs at least 2 members and 2 non-members; found {len(y_in)} "
            f"and {len(y_out)}."
        )
    rng = np.random.default_rng(seed)
    size = min(len(y_in), len(y_out))
    pick_in = torch.from_numpy(rng.choice(len(y_in), size=size, replace=False))
    pick_out = torch.from_numpy(rng.choice(len(y_out), size=size, replace=False))

    # Reference models on random halves of every record the site holds; complementary pairs
    # leave each record out of exactly reference_models / 2 of them.
    pool_x, pool_y = torch.cat([x_in, x_out]), torch.cat([y_in, y_out])
    out_loss = np.zeros(len(pool_y))
    out_count = np.zeros(len(pool_y))
    for pair in range(reference_models // 2):
        order = torch.from_numpy(rng.permutation(len(pool_y)))
        halves = (order[: len(order) // 2], order[len(order) // 2 :])
        for k, (fit, held) in enumerate((halves, halves[::-1])):
            reference = _reinitialised(model, seed=seed * 1009 + 2 * pair + k)
            generator = torch.Generator().manual_seed(int(rng.integers(2**62)))
            train(
                reference,
                pool_x[fit],
                pool_y[fit],
                settings=reference_settings,
                noise_multiplier=None,
                generator=generator,
            )
            out_loss[held.numpy()] += _losses(reference, pool_x[held], pool_y[held])
            out_count[held.numpy()] += 1
    difficulty = out_loss / out_count

    target_in = _losses(model, x_in[pick_in], y_in[pick_in])
    target_out = _losses(model, x_out[pick_out], y_out[pick_out])
    offset = len(y_in)
    audit = MembershipAudit(
        members=size,
        non_members=size,
        reference_models=reference_models,
        loss_auc=_auc(-target_in, -target_out),
        calibrated_auc=_auc(
            -(target_in - difficulty[pick_in.numpy()]),
            -(target_out - difficulty[offset + pick_out.numpy()]),
        ),
    )
    logger.info(
        "membership audit on %d + %d records: loss-threshold AUC %.3f, calibrated AUC %.3f",
        size,
        size,
        audit.loss_auc,
        audit.calibrated_auc,
    )
    return audit


def dp_auc_bound(*, epsilon: float, delta: float) -> float:
    """The largest membership-inference AUC that any attack can reach against (ε, δ)-DP.

    (ε, δ)-DP confines every attack's ROC curve to ``TPR ≤ min(1, e^ε·FPR + δ,
    1 − e^−ε·(1 − δ − FPR))`` (Kairouz et al., 2015); this is the area under that boundary.
    """
    if not (epsilon >= 0 and math.isfinite(epsilon)) or not 0 <= delta < 1:
        raise PrivacyError(
            f"need a finite epsilon >= 0 and 0 <= delta < 1; found ({epsilon}, {delta})."
        )
    fpr = np.linspace(0.0, 1.0, 200_001)
    tpr = np.minimum.reduce(
        [
            np.ones_like(fpr),
            math.exp(epsilon) * fpr + delta,
            1 - math.exp(-epsilon) * (1 - delta - fpr),
        ]
    )
    return float(np.trapezoid(tpr, fpr))
