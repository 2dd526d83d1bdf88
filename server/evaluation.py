"""The end-of-run evaluation: every site's report on the final model, and the conformal threshold.

After the last round the server sends the final global model to every site twice:

1. :data:`~clinfed.wire.QUERY_SITE_REPORT` — each site answers with aggregates over its own
   splits (:mod:`clinfed.client.report`): accuracy and ROC AUC with bootstrap intervals,
   reliability bins and ECE, and the counts of its calibration scores on the public grid.
2. :data:`~clinfed.wire.QUERY_SITE_CONFORMAL` — the server has added the counts up and chosen the
   threshold bin (:func:`conformal_threshold_bin`); each site answers with the coverage and the
   abstention rate of the prediction sets on its test split.

Per site, never only as an average. A site that refuses or fails gets a note, not a crash.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from clinfed import wire
from clinfed.config import RunConfig
from clinfed.errors import ProtocolError

__all__ = [
    "FEDERATED",
    "ConformalSummary",
    "FinalEvaluation",
    "SiteEvaluation",
    "conformal_threshold_bin",
    "evaluate_final_model",
    "parse_site_report",
    "report_config",
]

logger = logging.getLogger(__name__)
K = wire.Keys

FEDERATED = "federated"
"""The name of the federated model among the report's models."""


@dataclass(frozen=True)
class SiteEvaluation:
    """One model evaluated at one site, from the aggregates the site sent.

    Interval bounds are ``nan`` when the site had too few test records for an interval (or, for
    ROC AUC, too few of one class); :attr:`note` then says so. Reliability lists hold one value
    per bin; a bin with fewer than 5 records has ``nan`` means (small-cell suppression).
    """

    site: str
    num_examples: int = 0
    accuracy: float = math.nan
    accuracy_low: float = math.nan
    accuracy_high: float = math.nan
    roc_auc: float = math.nan
    roc_auc_low: float = math.nan
    roc_auc_high: float = math.nan
    ece: float = math.nan
    reliability_counts: tuple[int, ...] = ()
    reliability_predicted: tuple[float, ...] = ()
    reliability_observed: tuple[float, ...] = ()
    calibration_examples: int = 0
    epsilon: float = math.nan
    conformal_threshold: float = math.nan
    conformal_coverage: float = math.nan
    conformal_abstention: float = math.nan
    conformal_answered_accuracy: float = math.nan
    conformal_note: str = ""
    error: str = ""

    @property
    def notes(self) -> list[str]:
        """Plain-language notes for the report (why a number is missing)."""
        if self.error:
            return [f"no result: {self.error}"]
        notes = []
        if math.isnan(self.accuracy_low):
            notes.append(f"only {self.num_examples} test records: too few for a bootstrap interval")
        elif math.isnan(self.roc_auc):
            notes.append("ROC AUC undefined: the test split holds a single class")
        elif math.isnan(self.roc_auc_low):
            notes.append("too few records of one class for a ROC AUC interval")
        if self.conformal_note:
            notes.append(self.conformal_note)
        return notes


@dataclass(frozen=True)
class ConformalSummary:
    """The federation's split-conformal threshold at risk level ``alpha``.

    ``threshold`` is the upper edge of bin ``threshold_bin`` of the ``bins``-bin grid; ``nan``
    (with :attr:`note`) when the pooled calibration records are too few for level ``alpha``.
    """

    alpha: float
    bins: int
    scope: str = "federation"
    calibration_examples: int = 0
    threshold_bin: int | None = None
    threshold: float = math.nan
    note: str = ""


@dataclass
class FinalEvaluation:
    """The report's data: per site, per model, plus the conformal threshold.

    ``models`` maps a model name (``federated`` first; baselines added by the simulation) to
    each site's :class:`SiteEvaluation`; ``descriptions`` says how each model was trained and
    how its ε is accounted.
    """

    conformal: ConformalSummary
    models: dict[str, dict[str, SiteEvaluation]] = field(default_factory=dict)
    descriptions: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "conformal": asdict(self.conformal),
            "models": {
                m: {s: asdict(e) for s, e in sites.items()} for m, sites in self.models.items()
            },
            "descriptions": dict(self.descriptions),
        }

    @staticmethod
    def from_json(document: Mapping[str, Any]) -> FinalEvaluation:
        def site(values: Mapping[str, Any]) -> SiteEvaluation:
            v = dict(values)
            for key in ("reliability_counts", "reliability_predicted", "reliability_observed"):
                v[key] = tuple(_number(x) for x in v.get(key, ()))
            return SiteEvaluation(
                **{k: _number(x) if isinstance(x, float | None) else x for k, x in v.items()}
            )

        conformal = dict(document["conformal"])
        conformal["threshold"] = _number(conformal.get("threshold"))
        return FinalEvaluation(
            conformal=ConformalSummary(**conformal),
            models={
                m: {s: site(e) for s, e in sites.items()}
                for m, sites in document.get("models", {}).items()
            },
            descriptions=dict(document.get("descriptions", {})),
        )


def _number(value: Any) -> Any:
    """JSON ``null``/NaN back to ``nan``; everything else unchanged."""
    return math.nan if value is None else value


def conformal_threshold_bin(counts: Sequence[int], *, alpha: float) -> int | None:
    """The bin of the pooled ``⌈(N + 1)(1 − α)⌉``-th smallest calibration score.

    ``counts`` are the calibration scores per bin of the public grid, summed over the sites.
    ``None`` when ``N`` is too small (``⌈(N + 1)(1 − α)⌉ > N``): no finite threshold then gives
    the guarantee, and the report says so.
    """
    n = int(sum(counts))
    if any(c < 0 for c in counts):
        raise ProtocolError(f"conformal score counts must be >= 0; found {list(counts)}.")
    # The tolerance keeps e.g. (89 + 1) * 0.9 = 81.00000000000001 from becoming 82.
    rank = math.ceil((n + 1) * (1 - alpha) - 1e-9)
    if n == 0 or rank > n:
        return None
    return int(np.searchsorted(np.cumsum(counts), rank, side="left"))


def parse_site_report(record: Mapping[str, object], *, site: str) -> SiteEvaluation:
    """A site's REPORT record (:func:`clinfed.client.report.site_report`), type-checked."""
    who = f"site {site}"

    def floats(key: str) -> tuple[float, ...]:
        return tuple(wire.read_floats(record, key, sender=who))

    counts = wire.read_ints(record, K.RELIABILITY_COUNTS, sender=who)
    predicted, observed = floats(K.RELIABILITY_PREDICTED), floats(K.RELIABILITY_OBSERVED)
    if not len(counts) == len(predicted) == len(observed):
        raise ProtocolError(f"{who} sent reliability bins of different lengths.")
    return SiteEvaluation(
        site=site,
        num_examples=wire.read_int(record, K.NUM_EXAMPLES, sender=who),
        accuracy=wire.read_float(record, K.ACCURACY, sender=who),
        accuracy_low=wire.read_float(record, K.ACCURACY_CI_LOW, sender=who),
        accuracy_high=wire.read_float(record, K.ACCURACY_CI_HIGH, sender=who),
        roc_auc=wire.read_float(record, K.ROC_AUC, sender=who),
        roc_auc_low=wire.read_float(record, K.ROC_AUC_CI_LOW, sender=who),
        roc_auc_high=wire.read_float(record, K.ROC_AUC_CI_HIGH, sender=who),
        ece=wire.read_float(record, K.ECE, sender=who),
        reliability_counts=tuple(counts),
        reliability_predicted=predicted,
        reliability_observed=observed,
        calibration_examples=wire.read_int(record, K.CALIBRATION_EXAMPLES, sender=who),
    )


def report_config(config: RunConfig) -> dict[str, int]:
    """The report settings a report query carries (the sites check them against their limits)."""
    r = config.report
    return {
        K.REPORT_BOOTSTRAP: r.bootstrap,
        K.REPORT_RELIABILITY_BINS: r.reliability_bins,
        K.CONFORMAL_BINS: r.conformal_bins,
    }


def _ask(
    grid: Grid,
    names: Mapping[int, str],
    *,
    kind: str,
    arrays: ArrayRecord,
    config: Mapping[str, Any],
    timeout_s: float,
    per_site: Mapping[str, Mapping[str, Any]] | None = None,
) -> dict[str, MetricRecord | str]:
    """Send one report query to every site; each site's REPORT record, or why there is none.

    ``per_site`` adds site-specific keys to a site's CONFIG (its own conformal threshold).
    """
    from clinfed.server.federation import _reason  # noqa: PLC0415 - federation imports this module

    connected = set(grid.get_node_ids())
    messages = [
        Message(
            RecordDict(
                {
                    wire.CONFIG: ConfigRecord(
                        {**config, **(per_site or {}).get(names[node], {}), K.QUERY: kind}
                    ),
                    wire.ARRAYS: arrays,
                }
            ),
            dst_node_id=node,
            message_type=MessageType.QUERY,
        )
        for node in names
        if node in connected
    ]
    answers: dict[str, MetricRecord | str] = {
        name: "no reply within the round timeout"
        if node in connected
        else "not connected at the end of the run"
        for node, name in names.items()
    }
    for reply in grid.send_and_receive(messages, timeout=timeout_s):
        name = names.get(reply.metadata.src_node_id)
        if name is None:
            continue
        if reply.has_error():
            answers[name] = _reason(reply.error.reason)
        elif wire.REPORT not in reply.content.metric_records:
            answers[name] = "the reply held no report"
        else:
            answers[name] = reply.content.metric_records[wire.REPORT]
    return answers


def evaluate_final_model(
    grid: Grid,
    config: RunConfig,
    *,
    arrays: ArrayRecord,
    names: Mapping[int, str],
    model_config: Mapping[str, Any],
    epsilons: Mapping[str, float],
) -> FinalEvaluation:
    """Ask every site for its report on ``arrays``, set the conformal threshold, ask again.

    ``model_config`` holds the model keys of the run's training config (the sites rebuild the
    model from them); ``epsilons`` each site's last reported ε (shown beside its results).
    """
    r = config.report
    settings = {**model_config, **report_config(config)}
    answers = _ask(
        grid,
        names,
        kind=wire.QUERY_SITE_REPORT,
        arrays=arrays,
        config=settings,
        timeout_s=config.round_timeout_s,
    )
    sites: dict[str, SiteEvaluation] = {}
    totals = np.zeros(r.conformal_bins, dtype=np.int64)
    site_counts: dict[str, list[int]] = {}
    for name in sorted(answers):
        answer = answers[name]
        eps = epsilons.get(name, math.nan)
        if isinstance(answer, str):
            sites[name] = SiteEvaluation(site=name, epsilon=eps, error=answer)
            logger.warning("report: site %s sent no report: %s", name, answer)
            continue
        try:
            evaluation = parse_site_report(answer, site=name)
            counts = wire.read_ints(answer, K.CONFORMAL_SCORE_COUNTS, sender=f"site {name}")
            if (
                len(counts) != r.conformal_bins
                or sum(counts) != evaluation.calibration_examples
                or min(counts, default=0) < 0
            ):
                raise ProtocolError(
                    f"site {name} sent {len(counts)} score counts summing to {sum(counts)}; "
                    f"expected {r.conformal_bins} counts >= 0 summing to "
                    f"{evaluation.calibration_examples}."
                )
        except ProtocolError as error:
            sites[name] = SiteEvaluation(site=name, epsilon=eps, error=str(error))
            continue
        totals += np.asarray(counts, dtype=np.int64)
        site_counts[name] = counts
        sites[name] = replace(evaluation, epsilon=eps)
    n_cal = int(totals.sum())
    threshold_bin = conformal_threshold_bin([int(c) for c in totals], alpha=r.alpha)
    if threshold_bin is None:
        conformal = ConformalSummary(
            alpha=r.alpha,
            bins=r.conformal_bins,
            scope=r.conformal_scope,
            calibration_examples=n_cal,
            note=(
                f"{n_cal} calibration records in the federation: at least "
                f"{math.ceil(1 / r.alpha) - 1} are needed for risk level {r.alpha:g}. Set "
                "data.calibration_fraction at the sites (simulation: federation.calibration_fraction)."
            ),
        )
        logger.warning("report: no conformal threshold: %s", conformal.note)
        return FinalEvaluation(
            conformal=conformal, models={FEDERATED: sites}, descriptions=_describe(config)
        )
    conformal = ConformalSummary(
        alpha=r.alpha,
        bins=r.conformal_bins,
        scope=r.conformal_scope,
        calibration_examples=n_cal,
        threshold_bin=threshold_bin,
        threshold=(threshold_bin + 1) / r.conformal_bins,
    )
    chosen = {name: threshold_bin for name in site_counts}
    if r.conformal_scope == "site":
        # Site-conditional (Mondrian) calibration: the larger of the federation's threshold and
        # the site's own quantile keeps both guarantees — for the pooled population and for the
        # site's own patients (Vovk 2012) — from the counts the server already has.
        for name, counts in site_counts.items():
            own = conformal_threshold_bin(counts, alpha=r.alpha)
            if own is None:
                sites[name] = replace(
                    sites[name],
                    conformal_note=(
                        f"{sum(counts)} calibration records: too few for a guarantee at this site "
                        f"(at least {math.ceil(1 / r.alpha) - 1} needed at α = {r.alpha:g}); the "
                        "federation's threshold is used"
                    ),
                )
            else:
                chosen[name] = max(threshold_bin, own)
    for name, chosen_bin in chosen.items():
        sites[name] = replace(sites[name], conformal_threshold=(chosen_bin + 1) / r.conformal_bins)
    answers = _ask(
        grid,
        {n: s for n, s in names.items() if s in chosen},
        kind=wire.QUERY_SITE_CONFORMAL,
        arrays=arrays,
        config=settings,
        timeout_s=config.round_timeout_s,
        per_site={name: {K.CONFORMAL_THRESHOLD_BIN: b} for name, b in chosen.items()},
    )
    for name, answer in answers.items():
        if isinstance(answer, str):
            sites[name] = replace(sites[name], error=f"conformal evaluation failed: {answer}")
            continue
        who = f"site {name}"
        try:
            sites[name] = replace(
                sites[name],
                conformal_coverage=wire.read_float(answer, K.CONFORMAL_COVERAGE, sender=who),
                conformal_abstention=wire.read_float(answer, K.CONFORMAL_ABSTENTION, sender=who),
                conformal_answered_accuracy=wire.read_float(
                    answer, K.CONFORMAL_ANSWERED_ACCURACY, sender=who
                ),
            )
        except ProtocolError as error:
            sites[name] = replace(sites[name], error=str(error))
    logger.info(
        "report: conformal threshold %.3f at alpha %g from %d calibration records; %s",
        conformal.threshold,
        r.alpha,
        n_cal,
        ", ".join(
            f"{s} coverage {e.conformal_coverage:.3f} abstains {e.conformal_abstention:.3f}"
            for s, e in sites.items()
            if not e.error
        ),
    )
    return FinalEvaluation(
        conformal=conformal, models={FEDERATED: sites}, descriptions=_describe(config)
    )


def _describe(config: RunConfig) -> dict[str, str]:
    secure = "on" if config.secure_aggregation.enabled else "OFF"
    dp = "DP-SGD at each site" if config.train.dp else "NO differential privacy"
    return {
        FEDERATED: (
            f"{config.rounds} rounds of {config.strategy.name} × {config.train.local_epochs} local "
            f"epoch(s), {dp}, secure aggregation {secure}; ε is what each site spent over the run"
        )
    }
