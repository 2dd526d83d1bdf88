"""Classification metrics computed at a site on its own data (only the scalars leave)."""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

__all__ = ["accuracy", "roc_auc"]


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
