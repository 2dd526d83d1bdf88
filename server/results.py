"""The federation's results: every site's metrics per round, the final model, the config.

Kept per site, not only as averages: a federation that helps the average can hurt one hospital.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from clinfed.server.evaluation import FinalEvaluation

__all__ = [
    "FederationResult",
    "RoundEvent",
    "RoundRecord",
    "SiteRoundMetrics",
    "format_summary",
    "write_evaluation",
    "write_results",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteRoundMetrics:
    """One site's reply in one phase (``train`` or ``evaluate``) of one round."""

    round: int
    site: str
    phase: str
    num_examples: int
    loss: float
    accuracy: float = math.nan
    roc_auc: float = math.nan
    epsilon: float = math.nan
    error: str = ""


@dataclass(frozen=True)
class RoundEvent:
    """Something that happened to a round as a whole (e.g. aborted, a site refused)."""

    round: int
    kind: str
    detail: str


@dataclass(frozen=True)
class RoundRecord:
    """How a round ended: ``completed`` (a new global model) or ``aborted`` (model kept).

    ``detail`` says why a round was aborted, or which sites' updates were rejected in a
    completed one. Every round of a run gets exactly one record, across server restarts.
    """

    round: int
    status: str
    detail: str = ""


@dataclass
class FederationResult:
    """Everything a run produced; written by :func:`write_results`."""

    run_name: str
    sites: list[str]
    secure_aggregation: bool
    dp: bool
    metrics: list[SiteRoundMetrics] = field(default_factory=list)
    events: list[RoundEvent] = field(default_factory=list)
    final_state: dict[str, torch.Tensor] = field(default_factory=dict)
    config_yaml: str = ""
    setup_seconds: float = 0.0
    round_seconds: list[float] = field(default_factory=list)
    rounds: list[RoundRecord] = field(default_factory=list)
    resumed_from: int = 0
    """The last round of the checkpoint this run resumed from (0: started fresh)."""
    evaluation: FinalEvaluation | None = None
    """The end-of-run report's data (``report.enabled``), written to ``evaluation.json``."""

    def final(self, phase: str = "evaluate") -> dict[str, SiteRoundMetrics]:
        """Each site's last successful metrics of ``phase``."""
        last: dict[str, SiteRoundMetrics] = {}
        for m in self.metrics:
            if m.phase == phase and not m.error:
                last[m.site] = m
        return last


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_results(result: FederationResult, output_dir: str | Path) -> Path:
    """Write ``metrics.csv``, ``metrics.json``, ``model.pt``, ``config.yaml`` and ``summary.txt``.

    Returns the run's folder, ``OUTPUT_DIR/RUN-NAME-YYYYmmdd-HHMMSS``.
    """
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    folder = Path(output_dir) / f"{result.run_name}-{stamp}"
    suffix = 1
    while folder.exists():
        folder = Path(output_dir) / f"{result.run_name}-{stamp}-{suffix}"
        suffix += 1
    folder.mkdir(parents=True)

    rows = [asdict(m) for m in result.metrics]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=list(SiteRoundMetrics.__dataclass_fields__))
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(folder / "metrics.csv", buffer.getvalue().encode())

    document = {
        "run_name": result.run_name,
        "sites": result.sites,
        "secure_aggregation": result.secure_aggregation,
        "dp": result.dp,
        "setup_seconds": result.setup_seconds,
        "round_seconds": result.round_seconds,
        "metrics": rows,
        "events": [asdict(e) for e in result.events],
        "rounds": [asdict(r) for r in result.rounds],
        "resumed_from": result.resumed_from,
        "final": {site: asdict(m) for site, m in result.final().items()},
    }
    _atomic_write(
        folder / "metrics.json",
        json.dumps(document, indent=2, allow_nan=True).encode(),
    )
    model_buffer = io.BytesIO()
    torch.save(result.final_state, model_buffer)
    _atomic_write(folder / "model.pt", model_buffer.getvalue())
    _atomic_write(folder / "config.yaml", result.config_yaml.encode())
    _atomic_write(folder / "summary.txt", format_summary(result).encode())
    if result.evaluation is not None:
        write_evaluation(result.evaluation, folder)
    return folder


def write_evaluation(evaluation: FinalEvaluation, folder: str | Path) -> Path:
    """Write (or replace) ``evaluation.json``, the end-of-run report's data, in ``folder``."""
    path = Path(folder) / "evaluation.json"
    _atomic_write(path, json.dumps(evaluation.to_json(), indent=2, allow_nan=True).encode())
    return path


def _fmt(value: float, digits: int = 3) -> str:
    return "n/a" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.{digits}f}")


def format_summary(result: FederationResult) -> str:
    """The final per-site table, as printed on the terminal."""
    final_eval = result.final("evaluate")
    final_train = result.final("train")
    header = f"{'site':<12} {'test n':>7} {'accuracy':>9} {'ROC AUC':>8} {'loss':>7} {'epsilon':>8}"
    lines = [
        f"clinfed run {result.run_name!r}: {len(result.round_seconds)} rounds, "
        f"DP {'on' if result.dp else 'OFF'}, secure aggregation "
        f"{'on' if result.secure_aggregation else 'OFF'}",
        header,
        "-" * len(header),
    ]
    for site in result.sites:
        m = final_eval.get(site)
        t = final_train.get(site)
        eps = t.epsilon if t else math.nan
        if m is None:
            lines.append(f"{site:<12} {'-':>7} {'no result':>9}")
            continue
        lines.append(
            f"{site:<12} {m.num_examples:>7d} {_fmt(m.accuracy):>9} {_fmt(m.roc_auc):>8} "
            f"{_fmt(m.loss):>7} {_fmt(eps):>8}"
        )
    rows = [final_eval[s] for s in result.sites if s in final_eval]
    if rows:
        lines.append("-" * len(header))
        lines.append(
            f"{'mean':<12} {sum(r.num_examples for r in rows):>7d} "
            f"{_fmt(_nanmean([r.accuracy for r in rows])):>9} "
            f"{_fmt(_nanmean([r.roc_auc for r in rows])):>8}"
        )
        worst = min(rows, key=lambda r: (math.isnan(r.accuracy), r.accuracy))
        lines.append(f"worst site: {worst.site} (accuracy {_fmt(worst.accuracy)})")
    aborted = [r for r in result.rounds if r.status != "completed"]
    if result.rounds:
        lines.append(
            f"rounds: {len(result.rounds) - len(aborted)} completed, {len(aborted)} aborted"
            + (f" (resumed after round {result.resumed_from})" if result.resumed_from else "")
        )
    for event in result.events:
        lines.append(f"round {event.round}: {event.kind}: {event.detail}")
    return "\n".join(lines) + "\n"


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan
