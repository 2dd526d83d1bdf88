"""Site-side report aggregates: bootstrap intervals, reliability bins, federated conformal."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from clinfed.client.conformal import (
    conformal_outcome,
    conformity_scores,
    prediction_sets,
    score_histogram,
    threshold_of_bin,
)
from clinfed.client.metrics import accuracy, bootstrap_interval, reliability_bins, roc_auc
from clinfed.client.report import ReportRequest
from clinfed.errors import ProtocolError
from clinfed.server.evaluation import SiteEvaluation, conformal_threshold_bin


def _binary(p1: np.ndarray) -> np.ndarray:
    return np.stack([1 - p1, p1], axis=1)


@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(min_value=10, max_value=60),
    seed=st.integers(min_value=0, max_value=2**31 - 1),
)
def test_every_bootstrap_interval_contains_its_point_estimate(n: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    probs = _binary(rng.random(n))

    for statistic in (accuracy, roc_auc):
        interval = bootstrap_interval(statistic, probs, labels, resamples=200, seed=seed)

        if not math.isnan(interval.low):
            assert interval.low <= interval.estimate <= interval.high


def test_a_site_with_too_few_test_records_gets_a_note_not_an_interval() -> None:
    probs = _binary(np.array([0.2, 0.8, 0.6, 0.3, 0.9]))
    labels = np.array([0, 1, 1, 0, 1])

    interval = bootstrap_interval(accuracy, probs, labels, resamples=200)
    evaluation = SiteEvaluation(
        site="tiny", num_examples=5, accuracy=interval.estimate, accuracy_low=interval.low
    )

    assert interval.estimate == 1.0 and math.isnan(interval.low) and math.isnan(interval.high)
    assert evaluation.notes == ["only 5 test records: too few for a bootstrap interval"]


def test_roc_auc_interval_is_withheld_when_one_class_is_too_rare() -> None:
    labels = np.array([1] + [0] * 39)
    probs = _binary(np.linspace(0.01, 0.99, 40))

    interval = bootstrap_interval(roc_auc, probs, labels, resamples=300)

    # ~37 % of resamples hold no positive record: no honest interval from the rest.
    assert not math.isnan(interval.estimate) and math.isnan(interval.low)


def test_reliability_bins_and_ece_match_a_direct_computation() -> None:
    rng = np.random.default_rng(1)
    p1 = rng.random(200)
    labels = (rng.random(200) < p1).astype(np.int64)

    bins = reliability_bins(_binary(p1), labels, bins=10, min_cell=5)

    index = np.minimum((p1 * 10).astype(int), 9)
    expected = sum(
        (index == b).sum() / 200 * abs(p1[index == b].mean() - labels[index == b].mean())
        for b in range(10)
        if (index == b).any()
    )
    assert bins.ece == pytest.approx(expected)
    assert sum(bins.counts) == 200


def test_small_reliability_bins_are_suppressed() -> None:
    p1 = np.array([0.05] * 6 + [0.55] * 2)
    labels = np.array([0] * 6 + [1, 0])

    bins = reliability_bins(_binary(p1), labels, bins=10, min_cell=5)

    assert bins.counts[0] == 6 and bins.counts[5] == 2
    assert bins.observed[0] == 0.0 and math.isnan(bins.observed[5])
    assert math.isnan(bins.mean_predicted[5])


@settings(max_examples=60, deadline=None)
@given(
    scores=st.lists(st.floats(min_value=0.0, max_value=1.0), min_size=1, max_size=200),
    alpha=st.sampled_from([0.05, 0.1, 0.2, 0.3]),
    bins=st.sampled_from([2, 10, 50, 100]),
)
def test_the_histogram_threshold_is_at_least_the_pooled_split_conformal_quantile(
    scores: list[float], alpha: float, bins: int
) -> None:
    # Split across three "sites"; only the per-bin counts are added up.
    parts = [np.array(scores[i::3]) for i in range(3)]
    summed = np.sum([score_histogram(p, bins=bins) for p in parts], axis=0)

    chosen = conformal_threshold_bin([int(c) for c in summed], alpha=alpha)

    n = len(scores)
    rank = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    if rank > n:
        assert chosen is None
        return
    assert chosen is not None
    exact = np.sort(scores)[rank - 1]
    assert threshold_of_bin(chosen, bins=bins) >= exact
    # ... and at most one bin wider than needed.
    assert threshold_of_bin(chosen, bins=bins) <= exact + 1 / bins + 1e-12


def test_conformal_sets_cover_exchangeable_patients_at_level_one_minus_alpha() -> None:
    # A fixed (miscalibrated) model on exchangeable synthetic patients, many calibration draws.
    rng = np.random.default_rng(7)
    alpha, coverages = 0.1, []
    for _ in range(200):
        x = rng.normal(size=120)
        y = (rng.random(120) < 1 / (1 + np.exp(-2 * x))).astype(np.int64)
        probs = _binary(1 / (1 + np.exp(-0.7 * x)))
        cal, test = slice(0, 60), slice(60, 120)
        counts = score_histogram(conformity_scores(probs[cal], y[cal]), bins=50)
        chosen = conformal_threshold_bin(counts, alpha=alpha)
        assert chosen is not None
        outcome = conformal_outcome(
            probs[test], y[test], threshold=threshold_of_bin(chosen, bins=50)
        )
        coverages.append(outcome.coverage)

    assert np.mean(coverages) >= 1 - alpha


def test_prediction_sets_answer_only_when_one_class_is_likely_enough() -> None:
    probs = _binary(np.array([0.02, 0.5, 0.97]))

    sets = prediction_sets(probs, threshold=0.9)
    outcome = conformal_outcome(probs, np.array([0, 1, 1]), threshold=0.9)

    assert sets.tolist() == [[True, False], [True, True], [False, True]]
    assert outcome.coverage == 1.0 and outcome.abstention == pytest.approx(1 / 3)
    assert outcome.answered_accuracy == 1.0


@pytest.mark.parametrize(
    ("bootstrap", "reliability", "conformal", "words"),
    [
        (1000, 10, 10_000, "conformity-score grid"),
        (1000, 500, 50, "reliability bins"),
        (5, 10, 50, "bootstrap resamples"),
    ],
)
def test_a_site_refuses_report_settings_that_approach_per_patient_values(
    bootstrap: int, reliability: int, conformal: int, words: str
) -> None:
    with pytest.raises(ProtocolError, match=words):
        ReportRequest(bootstrap=bootstrap, reliability_bins=reliability, conformal_bins=conformal)
