"""What a site computes for the end-of-run report, on its own records; only aggregates leave.

Two answers to the server's report queries (:data:`clinfed.wire.QUERY_SITE_REPORT`, then
:data:`clinfed.wire.QUERY_SITE_CONFORMAL`), both about a model the server sent (the final global
model) and both built from the site's own splits:

* :func:`site_report` — on the **test split**: accuracy and ROC AUC with bootstrap 95 % intervals,
  the reliability diagram's per-bin aggregates and the expected calibration error; on the
  **calibration split**: the counts of its conformity scores on the public score grid.
* :func:`site_conformal` — given the federation's threshold, the prediction sets' coverage and
  abstention rate on the test split.

The server chooses grid sizes and the number of resamples; the site refuses values that would
make a "histogram" record-level (:data:`MAX_CONFORMAL_BINS`, :data:`MAX_RELIABILITY_BINS`).
Simulation baselines call the same functions, so a baseline's numbers are computed exactly as a
hospital computes the federated model's.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt
import torch
from flwr.app import MetricRecordValues
from torch import nn

from clinfed import wire
from clinfed.client.conformal import (
    conformal_outcome,
    conformity_scores,
    score_histogram,
    threshold_of_bin,
)
from clinfed.client.metrics import accuracy, bootstrap_interval, reliability_bins, roc_auc
from clinfed.client.site import SiteData
from clinfed.client.training import predict_proba
from clinfed.errors import ProtocolError

__all__ = [
    "MAX_BOOTSTRAP",
    "MAX_CONFORMAL_BINS",
    "MAX_RELIABILITY_BINS",
    "ReportRequest",
    "read_report_request",
    "site_conformal",
    "site_report",
]

K = wire.Keys
MAX_CONFORMAL_BINS = 100
"""Finest conformity-score grid a site accepts (score resolution 0.01)."""
MAX_RELIABILITY_BINS = 20
"""Finest reliability diagram a site accepts."""
MAX_BOOTSTRAP = 10_000
"""Most bootstrap resamples a site computes (cost bound)."""

_SERVER = "the server"


@dataclass(frozen=True)
class ReportRequest:
    """The server's report settings, checked against the site's limits."""

    bootstrap: int
    reliability_bins: int
    conformal_bins: int

    def __post_init__(self) -> None:
        if not 100 <= self.bootstrap <= MAX_BOOTSTRAP:
            raise ProtocolError(
                f"the server asked for {self.bootstrap} bootstrap resamples; this site computes "
                f"100 to {MAX_BOOTSTRAP}."
            )
        if not 1 <= self.reliability_bins <= MAX_RELIABILITY_BINS:
            raise ProtocolError(
                f"the server asked for {self.reliability_bins} reliability bins; this site sends "
                f"1 to {MAX_RELIABILITY_BINS} (finer bins approach per-patient values)."
            )
        if not 2 <= self.conformal_bins <= MAX_CONFORMAL_BINS:
            raise ProtocolError(
                f"the server asked for a {self.conformal_bins}-bin conformity-score grid; this "
                f"site sends 2 to {MAX_CONFORMAL_BINS} bins (finer grids approach per-patient "
                "scores)."
            )


def read_report_request(config: Mapping[str, object]) -> ReportRequest:
    """The report settings in a report query's CONFIG record."""
    return ReportRequest(
        bootstrap=wire.read_int(config, K.REPORT_BOOTSTRAP, sender=_SERVER),
        reliability_bins=wire.read_int(config, K.REPORT_RELIABILITY_BINS, sender=_SERVER),
        conformal_bins=wire.read_int(config, K.CONFORMAL_BINS, sender=_SERVER),
    )


def _probabilities(model: nn.Module, x: torch.Tensor) -> npt.NDArray[np.float64]:
    probabilities: npt.NDArray[np.float64] = predict_proba(model, x).double().numpy()
    return probabilities


def site_report(
    model: nn.Module, data: SiteData, request: ReportRequest
) -> dict[str, MetricRecordValues]:
    """The site's REPORT record for ``model``: see the module docstring for what is in it."""
    probs = _probabilities(model, data.x_test)
    labels = data.y_test.numpy()
    acc = bootstrap_interval(accuracy, probs, labels, resamples=request.bootstrap)
    auc = bootstrap_interval(roc_auc, probs, labels, resamples=request.bootstrap)
    bins = reliability_bins(probs, labels, bins=request.reliability_bins)
    n_cal = len(data.y_cal)
    counts = (
        score_histogram(
            conformity_scores(_probabilities(model, data.x_cal), data.y_cal.numpy()),
            bins=request.conformal_bins,
        )
        if n_cal
        else [0] * request.conformal_bins
    )
    return {
        K.NUM_EXAMPLES: len(labels),
        K.ACCURACY: acc.estimate,
        K.ACCURACY_CI_LOW: acc.low,
        K.ACCURACY_CI_HIGH: acc.high,
        K.ROC_AUC: auc.estimate,
        K.ROC_AUC_CI_LOW: auc.low,
        K.ROC_AUC_CI_HIGH: auc.high,
        K.ECE: bins.ece,
        K.RELIABILITY_COUNTS: list(bins.counts),
        K.RELIABILITY_PREDICTED: list(bins.mean_predicted),
        K.RELIABILITY_OBSERVED: list(bins.observed),
        K.CALIBRATION_EXAMPLES: n_cal,
        K.CONFORMAL_SCORE_COUNTS: counts,
    }


def site_conformal(
    model: nn.Module, data: SiteData, *, threshold_bin: int, bins: int
) -> dict[str, MetricRecordValues]:
    """Coverage and abstention on the test split of the sets at the federation's threshold."""
    if not 2 <= bins <= MAX_CONFORMAL_BINS:
        raise ProtocolError(
            f"the server's conformity-score grid has {bins} bins; this site uses 2 to "
            f"{MAX_CONFORMAL_BINS}."
        )
    try:
        threshold = threshold_of_bin(threshold_bin, bins=bins)
    except ValueError as error:
        raise ProtocolError(f"the server's conformal threshold is invalid: {error}") from None
    outcome = conformal_outcome(
        _probabilities(model, data.x_test), data.y_test.numpy(), threshold=threshold
    )
    return {
        K.NUM_EXAMPLES: outcome.num_examples,
        K.CONFORMAL_COVERAGE: outcome.coverage,
        K.CONFORMAL_ABSTENTION: outcome.abstention,
        K.CONFORMAL_ANSWERED_ACCURACY: outcome.answered_accuracy,
    }
