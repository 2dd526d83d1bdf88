"""The run's report: one self-contained HTML file that clinicians and lab staff can read offline.

Rendered from a results folder (``metrics.json``, ``evaluation.json``, ``config.yaml``, all
written by :func:`clinfed.server.results.write_results`) into ``report.html`` beside them:

* how the run went — per-site curves per round (accuracy, ROC AUC, loss, ε spent);
* the final per-site table: accuracy and ROC AUC with bootstrap 95 % intervals (computed at each
  site), calibration (ECE), ε spent, conformal coverage and abstention;
* a worst-site summary — averages hide the hospitals a federation hurts;
* baselines side by side per site (local-only, pooled — simulation only —, personalized);
* calibration per site (reliability diagrams) and abstention with a guarantee (conformal).

Plots are drawn with matplotlib's object API (no pyplot, no global backend change) and embedded
as base64 PNG, so the file needs nothing but a browser. Every number comes from aggregates the
sites sent; nothing patient-level is in the folder, so nothing patient-level can be in the file.
"""

from __future__ import annotations

import base64
import html
import io
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from clinfed.errors import ConfigError
from clinfed.server.evaluation import FEDERATED, FinalEvaluation, SiteEvaluation

__all__ = ["PLOT_IDS", "TABLE_IDS", "render_report", "write_report"]

REPORT_FILE = "report.html"
PLOT_IDS = ("plot-curves", "plot-baselines", "plot-reliability", "plot-conformal")
"""Every plot of a complete report (``id`` of its ``<img>``)."""
TABLE_IDS = ("table-final", "table-baselines", "table-conformal", "table-privacy")
"""Every table of a complete report (``id`` of its ``<table>``)."""

_COLORS = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#8c564b", "#17becf")


@dataclass(frozen=True)
class _Run:
    """What the report needs from a results folder."""

    name: str
    sites: list[str]
    secure_aggregation: bool
    dp: bool
    metrics: list[dict[str, Any]]
    events: list[dict[str, Any]]
    evaluation: FinalEvaluation | None
    config_yaml: str


def _load(folder: Path) -> _Run:
    metrics_file = folder / "metrics.json"
    if not metrics_file.is_file():
        raise ConfigError(
            f"{folder} is not a clinfed results folder (no metrics.json). Give the folder a run "
            "wrote, e.g. results/demo-20261123-204500."
        )
    try:
        document = json.loads(metrics_file.read_text(encoding="utf-8"))
        evaluation_file = folder / "evaluation.json"
        evaluation = (
            FinalEvaluation.from_json(json.loads(evaluation_file.read_text(encoding="utf-8")))
            if evaluation_file.is_file()
            else None
        )
        return _Run(
            name=str(document["run_name"]),
            sites=[str(s) for s in document["sites"]],
            secure_aggregation=bool(document["secure_aggregation"]),
            dp=bool(document["dp"]),
            metrics=list(document["metrics"]),
            events=list(document.get("events", [])),
            evaluation=evaluation,
            config_yaml=(folder / "config.yaml").read_text(encoding="utf-8")
            if (folder / "config.yaml").is_file()
            else "",
        )
    except (ValueError, KeyError, TypeError) as error:
        raise ConfigError(
            f"{folder}: metrics.json or evaluation.json is damaged ({type(error).__name__}: "
            f"{error}). Re-run the federation, or restore the files."
        ) from None


# ------------------------------------------------------------------ formatting


def _num(value: float, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if math.isinf(value):
        return "∞"
    return f"{value:.{digits}f}"


def _ci(estimate: float, low: float, high: float) -> str:
    if math.isnan(estimate):
        return "—"
    if math.isnan(low) or math.isnan(high):
        return f"{estimate:.3f} <span class='muted'>(no interval)</span>"
    return f"{estimate:.3f} <span class='ci'>[{low:.3f}, {high:.3f}]</span>"


def _e(text: object) -> str:
    return html.escape(str(text))


def _table(table_id: str, header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    head = "".join(f"<th>{h}</th>" for h in header)
    body = "\n".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return (
        f"<table id='{table_id}'><thead><tr>{head}</tr></thead>\n<tbody>\n{body}\n</tbody></table>"
    )


# ------------------------------------------------------------------ plots


def _png(figure: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415 - heavy import

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _img(plot_id: str, figure: Any, alt: str) -> str:
    return (
        f"<img id='{plot_id}' class='plot' alt='{_e(alt)}' "
        f"src='data:image/png;base64,{_png(figure)}'>"
    )


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure  # noqa: PLC0415 - heavy import

    return Figure(figsize=(width, height), layout="constrained")


def _curves(run: _Run) -> str:
    figure = _figure(12, 3.2)
    panels = (
        ("evaluate", "accuracy", "test accuracy"),
        ("evaluate", "roc_auc", "test ROC AUC"),
        ("evaluate", "loss", "test loss"),
        ("train", "epsilon", "ε spent (cumulative)"),
    )
    axes = figure.subplots(1, len(panels))
    for ax, (phase, key, title) in zip(axes, panels, strict=True):
        for i, site in enumerate(run.sites):
            points = sorted(
                (m["round"], m[key])
                for m in run.metrics
                if m["site"] == site and m["phase"] == phase and not m.get("error")
            )
            points = [(r, v) for r, v in points if v is not None and not math.isnan(v)]
            if points:
                ax.plot(
                    [r for r, _ in points],
                    [v for _, v in points],
                    marker="o",
                    markersize=3,
                    color=_COLORS[i % len(_COLORS)],
                    label=site,
                )
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    return _img("plot-curves", figure, "per-site metrics per round")


def _baselines_plot(evaluation: FinalEvaluation, sites: Sequence[str]) -> str:
    figure = _figure(12, 3.4)
    axes = figure.subplots(1, 2)
    models = list(evaluation.models)
    width = 0.8 / max(1, len(models))
    for ax, (key, title) in zip(
        axes, (("accuracy", "accuracy"), ("roc_auc", "ROC AUC")), strict=True
    ):
        for j, model in enumerate(models):
            xs, ys, lows, highs = [], [], [], []
            for i, site in enumerate(sites):
                e = evaluation.models[model].get(site)
                if e is None or e.error or math.isnan(getattr(e, key)):
                    continue
                value = getattr(e, key)
                low, high = getattr(e, f"{key}_low"), getattr(e, f"{key}_high")
                xs.append(i + (j - (len(models) - 1) / 2) * width)
                ys.append(value)
                lows.append(0.0 if math.isnan(low) else value - low)
                highs.append(0.0 if math.isnan(high) else high - value)
            ax.bar(
                xs,
                ys,
                width=width,
                yerr=[lows, highs],
                capsize=3,
                color=_COLORS[j % len(_COLORS)],
                label=model,
            )
        ax.set_xticks(range(len(sites)), list(sites))
        ax.set_ylim(0, 1.05)
        ax.set_title(f"{title} per site (bars: bootstrap 95 % CI)", fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower left")
    return _img("plot-baselines", figure, "baselines side by side per site")


def _reliability_plot(evaluations: Mapping[str, SiteEvaluation], sites: Sequence[str]) -> str:
    figure = _figure(max(4.0, 3.2 * len(sites)), 3.4)
    axes = figure.subplots(1, max(1, len(sites)), squeeze=False)[0]
    for ax, site in zip(axes, sites, strict=False):
        e = evaluations.get(site)
        ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        # Two classes: risk of class 1; more: top-label confidence (client/metrics.py).
        ax.set_xlabel("predicted risk (or top-class confidence)", fontsize=8)
        ax.set_ylabel("observed rate (or accuracy)", fontsize=8)
        if e is None or e.error or not e.reliability_counts:
            ax.set_title(f"{site}: no result", fontsize=10)
            continue
        shown = [
            (p, o, c)
            for p, o, c in zip(
                e.reliability_predicted, e.reliability_observed, e.reliability_counts, strict=True
            )
            if not (math.isnan(p) or math.isnan(o))
        ]
        if shown:
            ax.plot([p for p, _, _ in shown], [o for _, o, _ in shown], marker="o", color="#1f77b4")
            for p, o, c in shown:
                ax.annotate(str(c), (p, o), fontsize=7, textcoords="offset points", xytext=(3, -9))
        ax.set_title(f"{site}: ECE {_num(e.ece)}", fontsize=10)
        ax.grid(alpha=0.3)
    return _img("plot-reliability", figure, "reliability diagram per site")


def _conformal_plot(evaluation: FinalEvaluation, sites: Sequence[str]) -> str:
    figure = _figure(8, 3.2)
    ax = figure.subplots(1, 1)
    fed = evaluation.models.get(FEDERATED, {})
    target = 1 - evaluation.conformal.alpha
    coverage = [fed[s].conformal_coverage if s in fed else math.nan for s in sites]
    abstention = [fed[s].conformal_abstention if s in fed else math.nan for s in sites]
    xs = range(len(sites))
    ax.bar(
        [x - 0.2 for x in xs],
        [0 if math.isnan(c) else c for c in coverage],
        0.4,
        label="coverage",
        color="#2ca02c",
    )
    ax.bar(
        [x + 0.2 for x in xs],
        [0 if math.isnan(a) else a for a in abstention],
        0.4,
        label="abstention rate",
        color="#ff7f0e",
    )
    ax.axhline(target, color="black", linestyle="--", linewidth=1, label=f"1 − α = {target:.2f}")
    ax.set_xticks(list(xs), list(sites))
    ax.set_ylim(0, 1.05)
    ax.set_title("conformal prediction sets on each site's test split", fontsize=10)
    ax.legend(fontsize=8, loc="lower right")
    ax.grid(axis="y", alpha=0.3)
    return _img("plot-conformal", figure, "conformal coverage and abstention per site")


# ------------------------------------------------------------------ sections


def _worst_site(run: _Run, evaluation: FinalEvaluation | None) -> str:
    if evaluation is None or FEDERATED not in evaluation.models:
        final = {
            m["site"]: m for m in run.metrics if m["phase"] == "evaluate" and not m.get("error")
        }
        if not final:
            return "<p>No site returned a result.</p>"
        lowest = min(final.values(), key=lambda m: m["accuracy"])
        return (
            f"<p>Worst site: <b>{_e(lowest['site'])}</b> (accuracy {_num(lowest['accuracy'])}).</p>"
        )
    fed = {s: e for s, e in evaluation.models[FEDERATED].items() if not e.error}
    if not fed:
        return "<p class='warn'>No site returned a report on the final model.</p>"
    lines = []
    worst = min(fed.values(), key=lambda e: (math.isnan(e.accuracy), e.accuracy))
    lines.append(
        f"<li>Lowest accuracy with the federated model: <b>{_e(worst.site)}</b> — "
        f"{_ci(worst.accuracy, worst.accuracy_low, worst.accuracy_high)} "
        f"(mean over sites {_num(_mean(e.accuracy for e in fed.values()))}).</li>"
    )
    defined = [e for e in fed.values() if not math.isnan(e.roc_auc)]
    if defined:
        worst_auc = min(defined, key=lambda e: e.roc_auc)
        lines.append(
            f"<li>Lowest ROC AUC: <b>{_e(worst_auc.site)}</b> — "
            f"{_ci(worst_auc.roc_auc, worst_auc.roc_auc_low, worst_auc.roc_auc_high)}.</li>"
        )
    for name, sites in evaluation.models.items():
        if name == FEDERATED:
            continue
        better = [
            f"{_e(s)} ({_num(sites[s].accuracy)} vs {_num(fed[s].accuracy)})"
            for s in fed
            if s in sites and not sites[s].error and sites[s].accuracy > fed[s].accuracy
        ]
        if better:
            lines.append(
                f"<li>The <b>{_e(name)}</b> model is more accurate than the federated one at: "
                f"{', '.join(better)}.</li>"
            )
    target = 1 - evaluation.conformal.alpha
    below = [
        f"{_e(s)} ({e.conformal_coverage:.3f})"
        for s, e in fed.items()
        if not math.isnan(e.conformal_coverage) and e.conformal_coverage < target
    ]
    if below:
        why = (
            "the guarantee is for the federation's pooled population, not for each site"
            if evaluation.conformal.scope == "federation"
            else "the guarantee holds on average over calibration and test draws, and this test "
            "split is small"
        )
        lines.append(
            f"<li class='warn'>Conformal coverage below 1 − α = {target:.2f} at: "
            f"{', '.join(below)} — {why} (see below).</li>"
        )
    return "<ul>" + "\n".join(lines) + "</ul>"


def _mean(values: Iterable[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan


def _final_table(run: _Run, evaluation: FinalEvaluation | None) -> str:
    header = [
        "site",
        "test n",
        "accuracy [95 % CI]",
        "ROC AUC [95 % CI]",
        "ECE",
        "ε spent",
        "coverage",
        "abstains",
        "notes",
    ]
    rows = []
    fed = evaluation.models.get(FEDERATED, {}) if evaluation else {}
    last = {m["site"]: m for m in run.metrics if m["phase"] == "evaluate" and not m.get("error")}
    eps = {
        m["site"]: m["epsilon"] for m in run.metrics if m["phase"] == "train" and not m.get("error")
    }
    for site in run.sites:
        e = fed.get(site)
        if e is None:
            m = last.get(site)
            rows.append(
                [
                    f"<b>{_e(site)}</b>",
                    str(m["num_examples"]) if m else "—",
                    _num(m["accuracy"]) if m else "—",
                    _num(m["roc_auc"]) if m else "—",
                    "—",
                    _num(eps.get(site, math.nan)),
                    "—",
                    "—",
                    "no end-of-run report from this site" if evaluation else "report disabled",
                ]
            )
            continue
        rows.append(
            [
                f"<b>{_e(site)}</b>",
                str(e.num_examples) if not e.error else "—",
                _ci(e.accuracy, e.accuracy_low, e.accuracy_high),
                _ci(e.roc_auc, e.roc_auc_low, e.roc_auc_high),
                _num(e.ece),
                _num(e.epsilon),
                _num(e.conformal_coverage),
                _num(e.conformal_abstention),
                "<br>".join(_e(n) for n in e.notes) or "",
            ]
        )
    return _table("table-final", header, rows)


def _baselines_table(evaluation: FinalEvaluation, sites: Sequence[str]) -> str:
    header = ["site", "model", "accuracy [95 % CI]", "ROC AUC [95 % CI]", "ECE", "ε", "notes"]
    rows = []
    for site in sites:
        for model, per_site in evaluation.models.items():
            e = per_site.get(site)
            if e is None:
                continue
            rows.append(
                [
                    f"<b>{_e(site)}</b>",
                    _e(model),
                    _ci(e.accuracy, e.accuracy_low, e.accuracy_high),
                    _ci(e.roc_auc, e.roc_auc_low, e.roc_auc_high),
                    _num(e.ece),
                    _num(e.epsilon),
                    "<br>".join(_e(n) for n in e.notes),
                ]
            )
    return _table("table-baselines", header, rows)


def _conformal_table(evaluation: FinalEvaluation, sites: Sequence[str]) -> str:
    fed = evaluation.models.get(FEDERATED, {})
    header = [
        "site",
        "calibration n",
        "threshold t",
        "test n",
        "coverage",
        "abstention rate",
        "accuracy when it answers",
        "notes",
    ]
    rows = []
    for site in sites:
        e = fed.get(site, SiteEvaluation(site=site, error="no report"))
        rows.append(
            [
                f"<b>{_e(site)}</b>",
                str(e.calibration_examples),
                _num(e.conformal_threshold, 2),
                str(e.num_examples),
                _num(e.conformal_coverage),
                _num(e.conformal_abstention),
                _num(e.conformal_answered_accuracy),
                _e(e.conformal_note or e.error),
            ]
        )
    return _table("table-conformal", header, rows)


def _privacy_table(run: _Run, evaluation: FinalEvaluation | None) -> str:
    eps: dict[str, float] = {}
    for m in run.metrics:
        if m["phase"] == "train" and not m.get("error"):
            eps[m["site"]] = m["epsilon"]
    header = ["site", "ε spent (federated run)", "secure aggregation", "differential privacy"]
    rows = [
        [
            f"<b>{_e(s)}</b>",
            _num(eps.get(s, math.nan)),
            "on" if run.secure_aggregation else "<b class='warn'>OFF</b>",
            "on (DP-SGD)" if run.dp else "<b class='warn'>OFF</b>",
        ]
        for s in run.sites
    ]
    return _table("table-privacy", header, rows)


_CSS = """
body { font-family: system-ui, -apple-system, 'Segoe UI', sans-serif; margin: 2em auto;
       max-width: 1200px; color: #222; padding: 0 1em; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: 0.2em; margin-top: 1.6em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.92em; }
th, td { border: 1px solid #ccc; padding: 0.35em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f4f7; }
.ci { color: #555; font-size: 0.9em; } .muted { color: #888; font-size: 0.9em; }
.warn { color: #b00020; } .badge { display: inline-block; padding: 0.1em 0.6em; border-radius: 1em;
  font-weight: bold; } .on { background: #d7f5dd; color: #0a5d1c; } .off { background: #fde0e0; color: #b00020; }
.plot { max-width: 100%; display: block; margin: 0.6em 0; }
.summary { background: #fff8e1; border: 1px solid #f0d78c; padding: 0.6em 1em; border-radius: 6px; }
pre { background: #f7f7f7; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
"""


def render_report(folder: str | Path) -> str:
    """The report of the run in ``folder`` as one HTML document (see the module docstring)."""
    folder = Path(folder)
    run = _load(folder)
    evaluation = run.evaluation
    sites = run.sites
    badge = (
        "<span class='badge on'>secure aggregation ON</span>"
        if run.secure_aggregation
        else "<span class='badge off'>secure aggregation OFF</span>"
    )
    dp_badge = (
        "<span class='badge on'>DP-SGD ON</span>"
        if run.dp
        else "<span class='badge off'>DP OFF</span>"
    )
    rounds = sorted({m["round"] for m in run.metrics})
    parts = [
        "<!DOCTYPE html>",
        "<html lang='en'><head><meta charset='utf-8'>",
        f"<title>clinfed report — {_e(run.name)}</title>",
        f"<style>{_CSS}</style></head><body>",
        f"<h1>clinfed run “{_e(run.name)}”</h1>",
        f"<p>{len(sites)} sites ({', '.join(_e(s) for s in sites)}), "
        f"{len(rounds)} rounds. {badge} {dp_badge}<br>"
        f"<span class='muted'>Report rendered {datetime.now(UTC):%Y-%m-%d %H:%M} UTC from "
        f"{_e(folder.name)}. Every number below was computed at the site it describes; only "
        "aggregates left the sites.</span></p>",
        "<h2 id='worst-site'>Worst-site summary</h2>",
        f"<div class='summary'>{_worst_site(run, evaluation)}</div>",
        "<h2 id='final'>Final model, per site</h2>",
        "<p>Accuracy and ROC AUC on each site's held-out test split, with a percentile bootstrap "
        "95 % confidence interval computed at the site; ECE = expected calibration error; "
        "coverage and abstention of the conformal prediction sets (below).</p>",
        _final_table(run, evaluation),
        "<h2 id='curves'>Per-site metrics per round</h2>",
        _curves(run),
    ]
    if evaluation is not None:
        parts += [
            "<h2 id='baselines'>Baselines side by side</h2>",
            "<ul>"
            + "".join(
                f"<li><b>{_e(m)}</b>: {_e(d)}</li>" for m, d in evaluation.descriptions.items()
            )
            + "</ul>",
        ]
        if len(evaluation.models) > 1:
            parts.append(_baselines_plot(evaluation, sites))
        else:
            parts.append(
                "<p class='muted'>Only the federated model: baselines are computed by "
                "<code>clinfed simulate</code> (report.baselines).</p>"
            )
        parts += [
            _baselines_table(evaluation, sites),
            "<h2 id='calibration'>Calibration per site</h2>",
            "<p>Reliability diagram of the federated model on each site's test split: mean "
            "predicted risk against the observed rate per bin (the number is the bin's records; "
            "bins of fewer than 5 records are withheld by the site). Closer to the diagonal is "
            "better calibrated.</p>",
            _reliability_plot(evaluation.models.get(FEDERATED, {}), sites),
            "<h2 id='conformal'>Abstention with a guarantee (federated split conformal)</h2>",
            _conformal_text(evaluation),
            _conformal_table(evaluation, sites),
            _conformal_plot(evaluation, sites),
        ]
    else:
        parts.append(
            "<p class='warn'>No end-of-run evaluation in this folder (report.enabled=false): no "
            "intervals, calibration, baselines or conformal results.</p>"
        )
    parts += [
        "<h2 id='privacy'>Privacy</h2>",
        _privacy_table(run, evaluation),
        "<p>ε is per site, for one patient record of that site's training split, at the site's "
        "δ. Baselines' ε are in their table.</p>",
    ]
    if run.events:
        parts.append("<h2 id='events'>Events</h2><ul>")
        parts += [
            f"<li>round {_e(ev['round'])}: {_e(ev['kind'])}: {_e(ev['detail'])}</li>"
            for ev in run.events
        ]
        parts.append("</ul>")
    parts += [
        "<h2 id='config'>Configuration</h2>",
        f"<pre>{_e(run.config_yaml)}</pre>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _conformal_text(evaluation: FinalEvaluation) -> str:
    c = evaluation.conformal
    if c.threshold_bin is None:
        return f"<p class='warn'>No conformal threshold: {_e(c.note)}</p>"
    return (
        f"<p>At risk level α = {c.alpha:g}, a class is in a patient's prediction set when the "
        f"model gives it a probability of at least {1 - c.threshold:.2f}. The model answers when "
        "the set is a single class (with two classes: when it is more than "
        f"{c.threshold:.2f} sure) and otherwise <b>abstains</b> — the case goes to a clinician. "
        f"Threshold on the conformity score 1 − p̂(y): {c.threshold:.2f}, the upper edge of the bin holding "
        f"the ⌈(N+1)(1−α)⌉-th smallest of the N = {c.calibration_examples} calibration scores of "
        f"all sites ({c.bins}-bin public grid; each site sent only its counts per bin). "
        f"Guarantee: coverage ≥ {1 - c.alpha:.2f} for a patient drawn like the federation's "
        "pooled calibration records"
        + (
            "; per site it is measured below, not guaranteed (report.conformal_scope=site adds "
            "a per-site guarantee).</p>"
            if c.scope == "federation"
            else ". <b>Per site</b> (report.conformal_scope=site): each site uses the larger of "
            "this threshold and the same quantile of its own calibration scores, which also "
            f"guarantees coverage ≥ {1 - c.alpha:.2f} for that site's own patients wherever it "
            "holds enough calibration records (see the notes), at the price of more "
            "abstentions.</p>"
        )
    )


def write_report(folder: str | Path) -> Path:
    """Render the report of the run in ``folder`` into ``folder/report.html``; return its path."""
    path = Path(folder) / REPORT_FILE
    text = render_report(folder)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
    return path
