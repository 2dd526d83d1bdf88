"""Federated split-conformal prediction: the site's side.

A model that answers only when it is sure enough, with a guarantee (Vovk et al. 2005; split
conformal as in Angelopoulos & Bates 2021). The conformity score of a record is ``1 − p̂(y | x)``.
The federation needs one threshold ``t``: the conservative ``(1 − α)`` quantile of the scores of
every site's **calibration split** (records carved from the site's training data before training,
never the test split). A patient's prediction set is ``{y : 1 − p̂(y | x) ≤ t}``: one class is an
answer, anything else (both classes, or none) is an abstention.

What leaves a site: the **counts of its calibration scores on a fixed public grid** of ``bins``
equal-width bins on [0, 1] (:func:`score_histogram`); the server adds them up and picks the bin
(:func:`clinfed.server.evaluation.conformal_threshold_bin`); the site maps the bin back to its
upper edge (:func:`threshold_of_bin`). Using the upper edge of the bin holding the pooled
``⌈(N + 1)(1 − α)⌉``-th smallest score gives a threshold at least the pooled split-conformal
quantile, so every prediction set contains the one pooled split conformal would give: coverage
``≥ 1 − α`` for a patient exchangeable with the pooled calibration records, at the price of at
most one bin width of extra conservatism. Counts add up, so they could travel through secure
aggregation like the model updates (not yet done: README, "What leaves a site").

Why not Humbert et al. (ICML 2023, one-shot quantile of quantiles): it sends one real score per
site (an order statistic of patients' scores) and its (k, ℓ) rule assumes equal calibration sizes;
the demo sites hold 17 to 40 calibration records each.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

__all__ = [
    "ConformalOutcome",
    "conformal_outcome",
    "conformity_scores",
    "prediction_sets",
    "score_edges",
    "score_histogram",
    "threshold_of_bin",
]


def score_edges(bins: int) -> npt.NDArray[np.float64]:
    """The upper edges ``1/B, 2/B, …, 1`` of the public score grid (one definition for all)."""
    if bins < 1:
        raise ValueError(f"the conformal score grid needs at least one bin; found {bins}.")
    return np.arange(1, bins + 1, dtype=np.float64) / bins


def conformity_scores(
    probabilities: npt.NDArray[np.floating], labels: npt.NDArray[np.integer]
) -> npt.NDArray[np.float64]:
    """``1 − p̂(true class)`` per record, in [0, 1]."""
    p = probabilities.astype(np.float64)[np.arange(len(labels)), labels]
    scores: npt.NDArray[np.float64] = np.clip(1.0 - p, 0.0, 1.0)
    return scores


def score_histogram(scores: npt.NDArray[np.floating], *, bins: int) -> list[int]:
    """Counts of ``scores`` per grid bin: bin k holds ``edge[k−1] < s ≤ edge[k]`` (bin 0 from 0)."""
    index = np.searchsorted(score_edges(bins), scores, side="left")
    return [int(c) for c in np.bincount(np.minimum(index, bins - 1), minlength=bins)]


def threshold_of_bin(bin_index: int, *, bins: int) -> float:
    """The threshold ``t`` the server chose: the upper edge of bin ``bin_index``."""
    if not 0 <= bin_index < bins:
        raise ValueError(f"threshold bin must be in 0..{bins - 1}; found {bin_index}.")
    return float(score_edges(bins)[bin_index])


def prediction_sets(
    probabilities: npt.NDArray[np.floating], *, threshold: float
) -> npt.NDArray[np.bool_]:
    """``[n, classes]``: class c is in record i's set iff ``1 − p̂_c ≤ threshold``."""
    return np.asarray((1.0 - probabilities.astype(np.float64)) <= threshold)


@dataclass(frozen=True)
class ConformalOutcome:
    """What the prediction sets did on one site's test split.

    ``coverage``: share of records whose set holds the true class. ``abstention``: share whose
    set is not a single class (the model does not answer). ``answered_accuracy``: accuracy over
    the records it answered (``nan`` when it answered none).
    """

    num_examples: int
    coverage: float
    abstention: float
    answered_accuracy: float


def conformal_outcome(
    probabilities: npt.NDArray[np.floating], labels: npt.NDArray[np.integer], *, threshold: float
) -> ConformalOutcome:
    """Coverage and abstention of the threshold-``threshold`` prediction sets on ``labels``."""
    n = len(labels)
    if n == 0:
        nan = float("nan")
        return ConformalOutcome(0, nan, nan, nan)
    sets = prediction_sets(probabilities, threshold=threshold)
    covered = sets[np.arange(n), labels]
    answered = sets.sum(axis=1) == 1
    correct = covered & answered
    return ConformalOutcome(
        num_examples=n,
        coverage=float(covered.mean()),
        abstention=float(1.0 - answered.mean()),
        answered_accuracy=float(correct.sum() / answered.sum()) if answered.any() else float("nan"),
    )
