"""Classification metrics computed at a site on its own data (only the scalars leave)."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "MIN_CELL",
    "MIN_INTERVAL_RECORDS",
    "Interval",
    "ReliabilityBins",
    "Statistic",
    "accuracy",
    "bootstrap_interval",
    "reliability_bins",
    "roc_auc",
]


def accuracy(probabilities: npt.NDArray[np.floating], labels: npt.NDArray[np.integer]) -> float:
    """Share of records whose most probable class is the label (``nan`` for no records)."""
    if len(labels) == 0:
        return float("nan")
    return float(np.mean(probabilities.argmax(axis=1) == labels))


def _binary_auc(scores: npt.NDArray[np.floating], positive: npt.NDArray[np.bool_]) -> float:
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    # Mann-Whitney U with average ranks for ties: AUC = P(score+ > score-) + 0.5 P(=).
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    i = 0
    while i < len(scores):
        j = i
        while j + 1 < len(scores) and sorted_scores[j + 1] == sorted_scores[i]:
            j += 1
        ranks[order[i : j + 1]] = (i + j) / 2 + 1
        i = j + 1
    u = ranks[positive].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def roc_auc(probabilities: npt.NDArray[np.floating], labels: npt.NDArray[np.integer]) -> float:
    """Area under the ROC curve; macro one-vs-rest over the classes present for multi-class.

    ``nan`` when it is undefined (fewer than two classes present among the labels).
    """
    num_classes = probabilities.shape[1]
    if num_classes == 2:
        return _binary_auc(probabilities[:, 1], labels == 1)
    aucs = [_binary_auc(probabilities[:, c], labels == c) for c in range(num_classes)]
    defined = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(defined)) if len(defined) >= 2 else float("nan")


# ------------------------------------------------------------------ uncertainty and calibration
# Computed at the site on its own test predictions; only the interval bounds and the per-bin
# aggregates below leave it (README, "What leaves a site").

Statistic = Callable[[npt.NDArray[np.floating], npt.NDArray[np.integer]], float]
"""A metric of (class probabilities ``[n, classes]``, labels ``[n]``), e.g. :func:`accuracy`."""

MIN_INTERVAL_RECORDS = 10
"""Fewest test records for a bootstrap interval; below, the interval is not computed."""

MIN_CELL = 5
"""Small-cell suppression: a reliability bin with fewer records sends its count only."""


@dataclass(frozen=True)
class Interval:
    """A point estimate with a bootstrap confidence interval (``nan`` bounds: not computed).

    ``low <= estimate <= high`` whenever the bounds are finite (see :func:`bootstrap_interval`).
    """

    estimate: float
    low: float
    high: float


def bootstrap_interval(
    statistic: Statistic,
    probabilities: npt.NDArray[np.floating],
    labels: npt.NDArray[np.integer],
    *,
    resamples: int,
    level: float = 0.95,
    min_records: int = MIN_INTERVAL_RECORDS,
    seed: int = 0,
) -> Interval:
    """Percentile bootstrap interval of ``statistic`` over the records (Efron & Tibshirani 1993).

    Records are resampled with replacement ``resamples`` times. Resamples where the statistic is
    undefined (e.g. ROC AUC of a resample holding one class) are dropped; if more than 10 % are,
    or there are fewer than ``min_records`` records, or the statistic itself is undefined, the
    bounds are ``nan`` (the report says why). With very few records the percentile interval of a
    skewed bootstrap distribution can miss the point estimate; it is then widened to include it
    (more conservative, never narrower). The seed only makes the report reproducible: bootstrap
    randomness protects nothing.
    """
    if resamples < 10:
        raise ValueError(f"resamples must be >= 10 for a bootstrap interval; found {resamples}.")
    if not 0 < level < 1:
        raise ValueError(f"level must be in (0, 1); found {level}.")
    n = len(labels)
    estimate = statistic(probabilities, labels)
    nan = float("nan")
    if n < min_records or math.isnan(estimate):
        return Interval(estimate, nan, nan)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, n, size=(resamples, n))
    values = np.array([statistic(probabilities[i], labels[i]) for i in draws])
    defined = values[~np.isnan(values)]
    if len(defined) < 0.9 * resamples:
        return Interval(estimate, nan, nan)
    tail = (1 - level) / 2 * 100
    low, high = (float(v) for v in np.percentile(defined, [tail, 100 - tail]))
    return Interval(estimate, min(low, estimate), max(high, estimate))


@dataclass(frozen=True)
class ReliabilityBins:
    """A reliability diagram's per-bin aggregates over one site's test split.

    Binary models: predicted risk ``p(class 1)`` against the observed rate of class 1. More
    classes: top-label confidence against accuracy (Guo et al., ICML 2017). ``bins`` equal-width
    bins on [0, 1]; a bin with fewer than :data:`MIN_CELL` records has ``nan`` means
    (small-cell suppression). ``ece`` is computed over every record (suppressed bins included).
    """

    counts: tuple[int, ...]
    mean_predicted: tuple[float, ...]
    observed: tuple[float, ...]
    ece: float


def reliability_bins(
    probabilities: npt.NDArray[np.floating],
    labels: npt.NDArray[np.integer],
    *,
    bins: int = 10,
    min_cell: int = MIN_CELL,
) -> ReliabilityBins:
    """Per-bin counts, mean prediction, observed rate, and the expected calibration error.

    ECE = Σ_b (n_b / n) · |mean prediction_b − observed rate_b| (Naeini et al., AAAI 2015).
    """
    if bins < 1:
        raise ValueError(f"bins must be >= 1; found {bins}.")
    if probabilities.shape[1] == 2:
        predicted = probabilities[:, 1].astype(np.float64)
        outcome = (labels == 1).astype(np.float64)
    else:
        predicted = probabilities.max(axis=1).astype(np.float64)
        outcome = (probabilities.argmax(axis=1) == labels).astype(np.float64)
    index = np.clip((predicted * bins).astype(np.int64), 0, bins - 1)
    counts = np.bincount(index, minlength=bins)
    sum_predicted = np.bincount(index, weights=predicted, minlength=bins)
    sum_outcome = np.bincount(index, weights=outcome, minlength=bins)
    n = len(labels)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_predicted = sum_predicted / counts
        observed = sum_outcome / counts
    ece = (
        float(np.sum(np.abs(sum_predicted - sum_outcome)) / n) if n else float("nan")
    )  # Σ n_b/n |p̄_b − ō_b| = Σ |Σp − Σo| / n
    shown = counts >= max(1, min_cell)
    return ReliabilityBins(
        counts=tuple(int(c) for c in counts),
        mean_predicted=tuple(
            float(v) if s else float("nan") for v, s in zip(mean_predicted, shown, strict=True)
        ),
        observed=tuple(
            float(v) if s else float("nan") for v, s in zip(observed, shown, strict=True)
        ),
        ece=ece,
    )
