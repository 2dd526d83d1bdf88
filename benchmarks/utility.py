"""Utility on FLamby's Fed-Heart-Disease: pooled, local-only, FedAvg, FedAdam, DP-FedAvg, central DP.

Every number comes from the project's own code: the pooled and local-only baselines call
:func:`clinfed.client.training.train` / :func:`~clinfed.client.training.evaluate`, the federations
run the real ClientApp, server loop and Flower strategies in-process
(:func:`clinfed.simulation.run_inprocess_federation`).

Data: the four centres' site configs (``conf/sites/{paris,nantes,berlin,zurich}.yaml``), FLamby's
split (test fraction 0.34, seed 43), logistic regression. The metric is the mean over centres of
each centre's test accuracy (and ROC AUC, averaged over the centres where it is defined).

Hyper-parameters are chosen by **K-fold cross-validation inside each site's training split**
(``CV_FOLDS`` folds): for fold j every site's training rows are written to a temporary CSV,
arranged so that the site's own loader holds out exactly the j-th part as its "test" split, and
the federation runs on those files exactly as on the real ones. The sites' test rows are in none
of them; the test split is touched only by the final runs. A fixed, untuned setting (the demo's
``conf/simulate.yaml``) is reported as is next to the tuned one.

Run from the repository root::

    python -m benchmarks.utility --seeds 5          # the full benchmark (~20 min on 2 cores)
    python -m benchmarks.utility --quick            # smoke test (~1 min)
"""

from __future__ import annotations

import argparse
import copy
import csv
import dataclasses
import json
import math
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import (
    CENTRES,
    RESULTS,
    ROOT,
    SITES_DIR,
    configure_logging,
    environment,
    fmt_mean_std,
    format_environment,
    markdown_table,
    mean_std,
    write_section,
)
from clinfed import wire
from clinfed.client.data import load_schema, load_site_table
from clinfed.client.site import SiteData, load_site_data
from clinfed.client.training import EvalResult, TrainSettings, evaluate, train
from clinfed.config import (
    FederationConfig,
    ModelConfig,
    RunConfig,
    SimulationConfig,
    SiteConfig,
    StrategyConfig,
    TrainConfig,
    load_site_config,
)
from clinfed.models import create_model
from clinfed.models.scaling import FeatureStats, set_standardization
from clinfed.server.results import FederationResult
from clinfed.simulation import run_inprocess_federation

BINARY_SITES = ("paris", "nantes", "berlin", "zurich")
# The Hungarian source codes the grade only as 0/1 (see schema-severity.yaml): its "grade 1"
# means "disease", so the severity task uses the three centres that grade 0-4.
SEVERITY_SITES = ("paris", "berlin", "zurich")
EPSILONS = (0.1, 0.3, 1.0, 5.0)
DELTA = 1e-5
CV_FOLDS = 5
CV_SEED = 2024
TEST_SEEDS = tuple(range(1, 101))


# ------------------------------------------------------------------------------------- settings


@dataclass(frozen=True)
class Hyper:
    """One hyper-parameter setting. ``epochs`` is local epochs per round (federations) or the
    number of epochs (pooled and local-only training); ``rounds`` applies to federations."""

    lr: float
    batch_size: int
    epochs: int = 1
    rounds: int = 1
    clip: float = 1.0
    server_lr: float = 0.05
    beta_2: float = 0.99
    tau: float = 1e-3
    momentum: float = 0.0  # local SGD momentum (federations only)
    steps: int = 0  # local steps per round instead of epochs (federations only; 0 = epochs)

    def short(self, method: str) -> str:
        parts = [f"lr {self.lr:g}", f"batch {self.batch_size}"]
        if method in ("pooled", "local", "pooled-dp"):
            parts.append(f"{self.epochs} epochs")
        else:
            parts.append(f"{self.rounds} rounds")
            parts.append(
                f"{self.steps} local steps" if self.steps else f"{self.epochs} local epoch(s)"
            )
        if method.startswith("dp") or method == "pooled-dp":
            parts.append(f"clip {self.clip:g}")
        if self.momentum:
            parts.append(f"momentum {self.momentum:g}")
        if method in ("fedadam", "fedyogi"):
            parts.append(f"server lr {self.server_lr:g}")
        return ", ".join(parts)


@dataclass(frozen=True)
class Score:
    """Per-site test (or validation) metrics of one run, and their means over sites."""

    per_site: dict[str, EvalResult]

    @property
    def accuracy(self) -> float:
        return float(np.mean([r.accuracy for r in self.per_site.values()]))

    @property
    def roc_auc(self) -> float:
        aucs = [r.roc_auc for r in self.per_site.values() if not math.isnan(r.roc_auc)]
        return float(np.mean(aucs)) if aucs else math.nan

    @property
    def criterion(self) -> float:
        """Model selection on validation: mean of accuracy and ROC AUC (both per-centre means)."""
        return (self.accuracy + self.roc_auc) / 2 if not math.isnan(self.roc_auc) else self.accuracy


# ------------------------------------------------------------------------------------- data


def site_configs(task: str) -> tuple[SiteConfig, ...]:
    """The centres' own site configs; the severity task swaps in ``schema-severity.yaml``."""
    names = BINARY_SITES if task == "binary" else SEVERITY_SITES
    sites = []
    for name in names:
        site = load_site_config(SITES_DIR / f"{name}.yaml")
        if task == "severity":
            schema = str(Path(site.data.schema).with_name("schema-severity.yaml"))
            site = dataclasses.replace(site, data=dataclasses.replace(site.data, schema=schema))
        sites.append(_without_governance(site))
    return tuple(sites)


def _without_governance(site: SiteConfig) -> SiteConfig:
    """The site without its policy, ledger and audit log, where this clinfed has them.

    This benchmark measures the learning methods over hundreds of runs, some without DP, at
    ε = 5 or with C = 3; a site policy would (rightly) refuse those, and a persistent ledger would
    spend the demo sites' budgets. Governance has its own tests.
    """
    governance = getattr(site, "governance", None)
    if governance is None:
        return site
    return dataclasses.replace(site, governance=type(governance)())  # type: ignore[call-arg]


def _complete_rows(site: SiteConfig) -> tuple[list[str], list[list[str]]]:
    """The header and the raw rows the loader keeps (no missing value in a used column)."""
    schema = load_schema(site.data.schema)
    with Path(site.data.path).open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader)
        rows = list(reader)
    used = [header.index(c) for c in [*(feat.name for feat in schema.features), schema.target]]
    missing = set(schema.missing_values)
    return header, [r for r in rows if all(r[i].strip() not in missing for i in used)]


def _write_csv(path: Path, header: list[str], rows: Iterable[list[str]]) -> Path:
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def _training_rows(site: SiteConfig) -> tuple[list[str], list[list[str]]]:
    """The header and the raw CSV rows of ``site``'s training split (never its test rows).

    Found as the loader finds them (complete rows, then ``split_train_test``'s permutation) and
    checked: loading them must give exactly the site's training features and labels.
    """
    header, complete = _complete_rows(site)
    n = len(complete)
    num_test = math.ceil(site.data.test_fraction * n)
    order = np.random.RandomState(site.data.split_seed).permutation(n)
    rows = [complete[i] for i in sorted(order[num_test:])]
    with tempfile.TemporaryDirectory() as tmp:
        written = load_site_table(
            _write_csv(Path(tmp) / f"{site.name}.csv", header, rows), load_schema(site.data.schema)
        )
    expected = load_site_data(site)
    if not (
        np.array_equal(written.features, expected.x_train.numpy())
        and np.array_equal(written.labels, expected.y_train.numpy())
    ):
        raise RuntimeError(f"{site.name}: the training rows found do not match the training split.")
    return header, rows


def _arranged_site(
    site: SiteConfig, header: list[str], rows: list[list[str]], is_test: Sequence[bool], path: Path
) -> SiteConfig:
    """``site`` reading ``rows`` from ``path``, split so that exactly the ``is_test`` rows are test.

    The rows are written in the order that makes ``split_train_test`` (the site's own seed, test
    fraction just under ``m / n``) pick the chosen ``m`` rows as its test split; checked by loading.
    """
    n, m = len(rows), sum(is_test)
    test_fraction = (m - 0.5) / n  # ceil(test_fraction * n) == m, safely away from rounding
    if math.ceil(test_fraction * n) != m or not 0 < m < n:
        raise RuntimeError(f"{site.name}: cannot place {m} test rows among {n}.")
    order = np.random.RandomState(site.data.split_seed).permutation(n)
    test_rows = [r for r, t in zip(rows, is_test, strict=True) if t]
    train_rows = [r for r, t in zip(rows, is_test, strict=True) if not t]
    arranged: list[list[str]] = [[] for _ in range(n)]
    for pos, row in zip(order[:m], test_rows, strict=True):
        arranged[pos] = row
    for pos, row in zip(order[m:], train_rows, strict=True):
        arranged[pos] = row
    _write_csv(path, header, arranged)
    data = dataclasses.replace(site.data, path=str(path), test_fraction=test_fraction)
    placed = dataclasses.replace(site, data=data)
    with tempfile.TemporaryDirectory() as tmp:
        expected = load_site_table(
            _write_csv(Path(tmp) / "test.csv", header, test_rows), load_schema(site.data.schema)
        )
    got = load_site_data(placed)
    if sorted(map(tuple, got.x_test.tolist())) != sorted(map(tuple, expected.features.tolist())):
        raise RuntimeError(f"{site.name}: the arranged file does not yield the chosen test rows.")
    return placed


def flamby_split_sites(sites: Sequence[SiteConfig], folder: Path) -> tuple[SiteConfig, ...]:
    """The sites with FLamby's exact train/test membership (``flamby_test_ids.json``).

    FLamby stratifies its split by label; ``split_train_test`` does not, so the same sizes hold
    other rows (Cleveland, Hungary and VA Long Beach; Switzerland is not stratified by FLamby).
    """
    test_ids = json.loads((Path(__file__).with_name("flamby_test_ids.json")).read_text())
    out = []
    for site in sites:
        header, complete = _complete_rows(site)
        ids = set(test_ids[site.name])
        id_col = header.index("id")
        is_test = [int(r[id_col]) in ids for r in complete]
        if sum(is_test) != len(ids) or sum(is_test) != math.ceil(
            site.data.test_fraction * len(complete)
        ):
            raise RuntimeError(f"{site.name}: FLamby's test ids do not fit this site's data.")
        out.append(
            _arranged_site(site, header, complete, is_test, folder / f"{site.name}-flamby.csv")
        )
    return tuple(out)


def validation_folds(
    sites: Sequence[SiteConfig], k: int, folder: Path, *, use: int | None = None
) -> list[tuple[SiteConfig, ...]]:
    """K-fold cross-validation inside each site's training split: fold j validates on the j-th
    of ``k`` disjoint parts of every site's training rows and trains on the other parts.

    The sites' test rows are in none of the files. ``use`` keeps only the first ``use`` folds.
    """
    parts: dict[str, tuple[list[str], list[list[str]], list[np.ndarray]]] = {}
    for s in sites:
        header, rows = _training_rows(s)
        perm = np.random.RandomState(CV_SEED).permutation(len(rows))
        parts[s.name] = (header, rows, np.array_split(perm, k))
    folds = []
    for j in range(k if use is None else use):
        fold = []
        for s in sites:
            header, rows, split = parts[s.name]
            chosen = set(split[j].tolist())
            is_test = [i in chosen for i in range(len(rows))]
            fold.append(_arranged_site(s, header, rows, is_test, folder / f"{s.name}-fold{j}.csv"))
        folds.append(tuple(fold))
    return folds


# ------------------------------------------------------------------------------------- methods

_EVENTS: list[object] = []
"""Tolerated round events (secure aggregation's clipped values), for the report."""

Trajectory = dict[int, Score]
"""Scores after 1, 2, ... epochs (pooled, local-only) or rounds (federations)."""


def _settings(hp: Hyper) -> TrainSettings:
    return TrainSettings(epochs=1, batch_size=hp.batch_size, lr=hp.lr, max_grad_norm=hp.clip)


def _new_model(num_features: int, num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # as the server initializes the federation's model
    return create_model("logreg", num_features=num_features, num_classes=num_classes)


def _evaluate_with(
    model: torch.nn.Module, data: SiteData, stats: FeatureStats | None
) -> EvalResult:
    if stats is None:
        return evaluate(model, data.x_test, data.y_test)
    local = copy.deepcopy(model)
    set_standardization(local, *stats.standardization())
    return evaluate(local, data.x_test, data.y_test)


def run_pooled(
    sites: Sequence[SiteConfig],
    hp: Hyper,
    *,
    seed: int,
    scaling: str = "federated",
    epsilon: float | None = None,
) -> Trajectory:
    """Train one model on the union of the training splits; evaluate at every centre.

    The model is standardized with the union's statistics (identical to the federation's
    ``federated`` scaling). With ``scaling="local"`` (FLamby) each centre's test rows are then
    standardized with that centre's own training statistics, as FLamby's per-centre test sets are.

    With ``epsilon`` this is *central* DP-SGD: one trusted curator holding every row, one noise
    draw per step, the noise calibrated (RDP, as the sites) to ``hp.epochs`` epochs at
    ``(epsilon, DELTA)``. No deployment can do this (the rows would leave the hospitals); it is the
    reference that separates what differential privacy costs from what federating it costs.
    """
    data = {s.name: load_site_data(s) for s in sites}
    x = torch.cat([d.x_train for d in data.values()])
    y = torch.cat([d.y_train for d in data.values()])
    first = next(iter(data.values()))
    model = _new_model(first.num_features, first.num_classes, seed)
    set_standardization(model, *FeatureStats.of(x).standardization())
    generator = torch.Generator().manual_seed(10_000 + seed)
    local_stats = {
        n: FeatureStats.of(d.x_train) if scaling == "local" else None for n, d in data.items()
    }
    if epsilon is not None:
        settings = dataclasses.replace(_settings(hp), epochs=hp.epochs)  # one call, all epochs
        sigma = _central_noise(len(y), hp, epsilon)
        train(model, x, y, settings=settings, noise_multiplier=sigma, generator=generator)
        return {
            hp.epochs: Score({n: _evaluate_with(model, d, local_stats[n]) for n, d in data.items()})
        }
    trajectory: Trajectory = {}
    for epoch in range(1, hp.epochs + 1):
        # One call per epoch = one call of many epochs (no optimizer state without momentum;
        # the generator carries on), so the trajectory is free.
        train(model, x, y, settings=_settings(hp), noise_multiplier=None, generator=generator)
        trajectory[epoch] = Score(
            {n: _evaluate_with(model, d, local_stats[n]) for n, d in data.items()}
        )
    return trajectory


def _central_noise(num_records: int, hp: Hyper, epsilon: float) -> float:
    """The noise multiplier for ``hp.epochs`` epochs of DP-SGD on ``num_records`` pooled rows."""
    from clinfed.privacy.accountant import calibrate_noise, planned_steps

    q, steps = planned_steps(
        num_records=num_records, batch_size=hp.batch_size, epochs_per_round=hp.epochs, rounds=1
    )
    return calibrate_noise(
        target_epsilon=epsilon, target_delta=DELTA, sample_rate=q, steps=steps, accountant="rdp"
    )


def run_local(sites: Sequence[SiteConfig], hp: Hyper, *, seed: int) -> Trajectory:
    """Each centre alone: its own model, its own statistics, its own test split."""
    per_epoch: dict[int, dict[str, EvalResult]] = {e: {} for e in range(1, hp.epochs + 1)}
    for s in sites:
        d = load_site_data(s)
        model = _new_model(d.num_features, d.num_classes, seed)
        set_standardization(model, *FeatureStats.of(d.x_train).standardization())
        generator = torch.Generator().manual_seed(10_000 + seed)
        for epoch in range(1, hp.epochs + 1):
            train(
                model,
                d.x_train,
                d.y_train,
                settings=_settings(hp),
                noise_multiplier=None,
                generator=generator,
            )
            per_epoch[epoch][s.name] = evaluate(model, d.x_test, d.y_test)
    return {e: Score(v) for e, v in per_epoch.items()}


def _secure_aggregation(enabled: bool) -> dict[str, object]:
    """The run's secure-aggregation setting, where this version of clinfed has one."""
    if "secure_aggregation" not in RunConfig.__dataclass_fields__:
        if enabled:
            raise RuntimeError("this version of clinfed has no secure aggregation.")
        return {}
    from clinfed.config import SecureAggregationConfig  # type: ignore[attr-defined]

    return {"secure_aggregation": SecureAggregationConfig(enabled=enabled)}


def run_federation(
    sites: Sequence[SiteConfig],
    hp: Hyper,
    *,
    seed: int,
    strategy: str,
    epsilon: float | None,
    scaling: str = "federated",
    secure: bool = False,
) -> Trajectory:
    """One in-process federation; ``epsilon=None`` trains without DP (sites allow it).

    Secure aggregation is off unless ``secure``: this benchmark measures the learning methods;
    the cost and the effect of secure aggregation are reported separately.
    """
    dp = epsilon is not None
    run = RunConfig(
        **_secure_aggregation(secure),  # type: ignore[arg-type]
        name="utility",
        rounds=hp.rounds,
        seed=seed,
        min_sites=len(sites),
        scaling=scaling,
        model=ModelConfig(name="logreg"),
        strategy=StrategyConfig(
            name=strategy, server_lr=hp.server_lr, beta_2=hp.beta_2, tau=hp.tau
        ),
        train=TrainConfig(
            local_epochs=hp.epochs,
            local_steps=hp.steps,
            batch_size=hp.batch_size,
            lr=hp.lr,
            momentum=hp.momentum,
            max_grad_norm=hp.clip,
            dp=dp,
        ),
    )
    configured = tuple(
        dataclasses.replace(
            s,
            noise_seed=seed,
            privacy=dataclasses.replace(
                s.privacy, required=dp, epsilon=epsilon if dp else s.privacy.epsilon, delta=DELTA
            ),
        )
        for s in sites
    )
    result = run_inprocess_federation(
        SimulationConfig(
            run=run, sites=configured, federation=FederationConfig(sites=[s.name for s in sites])
        )
    )
    return _trajectory(
        result, len(sites), allowed_events=("secagg-out-of-range",) if secure else ()
    )


def _clipped_count(event: object) -> int:
    detail = str(getattr(event, "detail", ""))
    head = detail.split(" ", 1)[0]
    return int(head) if head.isdigit() else 0


def _trajectory(
    result: FederationResult, num_sites: int, allowed_events: Sequence[str] = ()
) -> Trajectory:
    problems = [m for m in result.metrics if m.error]
    problems += [e for e in result.events if e.kind not in allowed_events]
    if problems:
        raise RuntimeError(f"the federation did not run cleanly: {problems[:3]}")
    _EVENTS.extend(e for e in result.events if e.kind in allowed_events)
    rounds: dict[int, dict[str, EvalResult]] = {}
    for m in result.metrics:
        if m.phase == "evaluate":
            rounds.setdefault(m.round, {})[m.site] = EvalResult(
                m.num_examples, m.loss, m.accuracy, m.roc_auc
            )
    if any(len(v) != num_sites for v in rounds.values()):
        raise RuntimeError("a round is missing a site's evaluation.")
    return {r: Score(v) for r, v in sorted(rounds.items())}


# ------------------------------------------------------------------------------------- FedAdam

_SHIMMED: list[str] = []


def fedadam_dtype_shim(sites: Sequence[SiteConfig]) -> str | None:
    """Work around FedAdam returning float64 arrays, if (and only if) the project still does.

    Flower's FedAdam computes its update with NumPy float64 scalars, so under NumPy 2 the global
    model comes back as float64; the sites train it as float32 and their egress guard then
    refuses the reply from round 2 on. Probed with a 2-round federation; if it fails that way,
    this benchmark casts FedAdam's aggregate back to the replies' dtypes and says so in its
    output. Returns the note to print, or ``None`` when no shim was needed.
    """
    from flwr.app import Array, ArrayRecord
    from flwr.serverapp.strategy import FedAdam

    try:
        run_federation(
            sites, Hyper(lr=0.1, batch_size=64, rounds=2), seed=0, strategy="fedadam", epsilon=None
        )
        return None
    except RuntimeError as error:
        if "egress refused" not in str(error):
            raise
    original = FedAdam.aggregate_train

    def aggregate_train(self, server_round, replies):  # type: ignore[no-untyped-def]
        replies = list(replies)
        arrays, metrics = original(self, server_round, replies)
        ok = [r for r in replies if not r.has_error()]
        if arrays is not None and ok:
            ref = ok[0].content.array_records[wire.ARRAYS]
            arrays = ArrayRecord(
                {
                    k: Array(np.asarray(a.numpy(), dtype=ref[k].numpy().dtype))
                    for k, a in arrays.items()
                }
            )
        return arrays, metrics

    FedAdam.aggregate_train = aggregate_train  # type: ignore[method-assign]
    run_federation(
        sites, Hyper(lr=0.1, batch_size=64, rounds=2), seed=0, strategy="fedadam", epsilon=None
    )
    note = (
        "FedAdam needed a benchmark-only shim: Flower's FedAdam returns float64 arrays (NumPy 2 "
        "promotion), which the sites' egress guard refuses from round 2; the aggregate was cast "
        "back to the replies' dtype (float32). Fix belongs in server/strategies.py."
    )
    _SHIMMED.append(note)
    return note


# ------------------------------------------------------------------------------------- tuning

METHOD_LABELS = {
    "pooled": "pooled (non-private)",
    "local": "local only (non-private)",
    "fedavg": "FedAvg (non-private)",
    "fedadam": "FedAdam (non-private)",
    "dp": "DP-FedAvg",
    "pooled-dp": "pooled DP-SGD (central DP: one curator holds every row; a reference)",
}


def run_method(
    method: str,
    sites: Sequence[SiteConfig],
    hp: Hyper,
    *,
    seed: int,
    epsilon: float | None = None,
    scaling: str = "federated",
    secure: bool = False,
) -> Trajectory:
    if method == "pooled":
        return run_pooled(sites, hp, seed=seed, scaling=scaling)
    if method == "pooled-dp":
        return run_pooled(sites, hp, seed=seed, epsilon=epsilon)
    if method == "local":
        return run_local(sites, hp, seed=seed)
    if method in ("fedavg", "fedadam", "fedyogi"):
        return run_federation(sites, hp, seed=seed, strategy=method, epsilon=None, scaling=scaling)
    if method == "dp":
        return run_federation(
            sites, hp, seed=seed, strategy="fedavg", epsilon=epsilon, scaling=scaling, secure=secure
        )
    raise ValueError(f"unknown method {method!r}")


def _with_length(method: str, hp: Hyper, point: int) -> Hyper:
    if method in ("pooled", "local", "pooled-dp"):
        return dataclasses.replace(hp, epochs=point)
    return dataclasses.replace(hp, rounds=point)


@dataclass
class Tuned:
    """The setting chosen on validation, its validation score, and how many were tried."""

    hp: Hyper
    val_accuracy: float
    val_roc_auc: float
    tried: int
    seconds: float
    table: list[tuple[Hyper, float, float, float]] = field(default_factory=list, repr=False)
    """Every candidate: (setting, validation accuracy, ROC AUC, criterion)."""


def tune(
    method: str,
    folds: Sequence[tuple[SiteConfig, ...]],
    fold_seeds: Sequence[int],
    grid: Iterable[Hyper],
    *,
    points: Sequence[int] | None,
    epsilon: float | None = None,
) -> Tuned:
    """The setting (and, without DP, the number of epochs/rounds) with the best mean criterion.

    Non-private runs are scored along their trajectory at ``points`` (one run gives every
    shorter length); a DP run only at its end, since the noise is calibrated to its length.
    """
    started = time.perf_counter()
    best: tuple[float, Hyper, float, float] | None = None
    tried = 0
    table: list[tuple[Hyper, float, float, float]] = []
    for hp in grid:
        trajectories = [
            run_method(method, fold, hp, seed=seed, epsilon=epsilon)
            for fold, seed in zip(folds, fold_seeds, strict=True)
        ]
        last = max(trajectories[0])
        for point in points if points is not None else (last,):
            if point > last:
                continue
            scores = [t[point] for t in trajectories]
            crit = float(np.mean([s.criterion for s in scores]))
            acc = float(np.mean([s.accuracy for s in scores]))
            auc = float(np.nanmean([s.roc_auc for s in scores]))
            candidate = _with_length(method, hp, point)
            table.append((candidate, acc, auc, crit))
            tried += 1
            if best is None or crit > best[0] + 1e-12:
                best = (crit, candidate, acc, auc)
    if best is None:
        raise ValueError("empty grid")
    return Tuned(best[1], best[2], best[3], tried, time.perf_counter() - started, table)


def tune_dp(
    folds: Sequence[tuple[SiteConfig, ...]],
    fold_seeds: Sequence[int],
    grid: Sequence[Hyper],
    *,
    epsilon: float,
    method: str = "dp",
) -> Tuned:
    """Grid search, then the clipping bound around the best (same lr, and same lr x clip)."""
    first = tune(method, folds, fold_seeds, grid, points=None, epsilon=epsilon)
    b = first.hp
    refine = [b] + [
        dataclasses.replace(b, clip=c, lr=lr)
        for c in (0.3, 3.0)
        for lr in (b.lr, b.lr * b.clip / c)
    ]
    second = tune(method, folds, fold_seeds, refine, points=None, epsilon=epsilon)
    second.tried += first.tried - 1
    second.seconds += first.seconds
    second.table = first.table + second.table[1:]
    return second


# ------------------------------------------------------------------------------------- grids


@dataclass(frozen=True)
class Grids:
    folds: int  # K of the K-fold cross-validation inside the training splits
    use_folds: int | None  # run only the first folds (quick mode)
    test_seeds: tuple[int, ...]
    target_seeds: tuple[int, ...]  # paired seeds for the target comparisons (pooled vs DP)
    baseline: list[Hyper]
    baseline_points: tuple[int, ...]
    federated: list[Hyper]
    federated_points: tuple[int, ...]
    fedadam: list[Hyper]
    dp: list[Hyper]
    central_dp: list[Hyper]  # pooled DP-SGD, the central-DP reference (epochs, not rounds)
    epsilons: tuple[float, ...] = EPSILONS

    @property
    def fold_seeds(self) -> tuple[int, ...]:
        """Training seed (initialization, sampling, noise) of each validation fold."""
        return tuple(101 + j for j in range(self.use_folds or self.folds))


def make_grids(quick: bool, seeds: int, target_seeds: int) -> Grids:
    if quick:
        return Grids(
            folds=CV_FOLDS,
            use_folds=1,
            test_seeds=TEST_SEEDS[:1],
            target_seeds=TEST_SEEDS[:2],
            baseline=[Hyper(lr=lr, batch_size=16, epochs=10) for lr in (0.03, 0.3)],
            baseline_points=(1, 5, 10),
            federated=[Hyper(lr=lr, batch_size=16, rounds=10) for lr in (0.1, 0.5)],
            federated_points=(1, 5, 10),
            fedadam=[Hyper(lr=0.3, batch_size=16, rounds=10, server_lr=s) for s in (0.03, 0.1)],
            dp=[
                Hyper(lr=lr, batch_size=b, rounds=r)
                for r in (2, 5)
                for b in (64, 512)
                for lr in (1.0, 10.0)
            ],
            central_dp=[Hyper(lr=lr, batch_size=64, epochs=e) for e in (1, 3) for lr in (1.0, 3.0)],
            epsilons=(0.3, 1.0),
        )
    return Grids(
        folds=CV_FOLDS,
        use_folds=None,
        test_seeds=TEST_SEEDS[:seeds],
        target_seeds=TEST_SEEDS[:target_seeds],
        baseline=[
            Hyper(lr=lr, batch_size=b, epochs=50)
            for lr in (0.01, 0.03, 0.1, 0.3, 1.0)
            for b in (16, 64)
        ],
        baseline_points=(1, 2, 3, 5, 10, 20, 30, 50),
        federated=[
            Hyper(lr=lr, batch_size=b, rounds=40) for lr in (0.03, 0.1, 0.3, 1.0) for b in (16, 64)
        ],
        federated_points=(1, 2, 3, 5, 10, 20, 30, 40),
        fedadam=[
            Hyper(lr=lr, batch_size=16, rounds=40, server_lr=s)
            for lr in (0.1, 0.3)
            for s in (0.01, 0.03, 0.1, 0.3)
        ],
        dp=[
            Hyper(lr=lr, batch_size=b, rounds=r)
            for r in (1, 2, 3, 5, 10)
            for b in (32, 64, 128, 512)
            for lr in (0.3, 1.0, 3.0, 10.0, 30.0)
        ],
        central_dp=[
            Hyper(lr=lr, batch_size=b, epochs=e)
            for e in (1, 2, 3, 5, 10)
            for b in (32, 64, 128, 512)
            for lr in (0.3, 1.0, 3.0, 10.0)
        ],
    )


def demo_setting() -> tuple[Hyper, Hyper]:
    """The untuned demo setting of ``conf/simulate.yaml``: (federations, pooled/local-only)."""
    from clinfed.config import load_simulation_config

    run = load_simulation_config(ROOT / "conf" / "simulate.yaml").run
    t = run.train
    fed = Hyper(
        lr=t.lr,
        batch_size=t.batch_size,
        epochs=t.local_epochs,
        rounds=run.rounds,
        clip=t.max_grad_norm,
        server_lr=run.strategy.server_lr,
        beta_2=run.strategy.beta_2,
        tau=run.strategy.tau,
    )
    # The pooled / local-only equivalent: as many epochs as the federation's rounds x epochs.
    return fed, dataclasses.replace(fed, epochs=run.rounds * t.local_epochs)


# FLamby's own settings (flamby/datasets/fed_heart_disease/common.py, config_heart_disease.json):
# batch 4, 100 local updates per round at every centre (``train.local_steps``), 15 rounds
# (get_nb_max_rounds(100)); FedAvg with SGD lr 1e-3; FedAdam with client SGD lr 1e-2 and server
# lr 1e-2; FedYogi with client SGD lr 10^-2.5 and server lr 1e-2 (both beta 0.9 / 0.999, tau
# 1e-8); pooled Adam lr 1e-3 for 50 epochs. train() is SGD only: the pooled run uses SGD lr 1e-2.
# Batches are Poisson-sampled (expected size 4) where FLamby's loader cycles fixed batches.
FLAMBY = {
    "pooled": Hyper(lr=0.01, batch_size=4, epochs=50),
    "fedavg": Hyper(lr=0.001, batch_size=4, steps=100, rounds=15),
    "fedadam": Hyper(
        lr=0.01, batch_size=4, steps=100, rounds=15, server_lr=0.01, beta_2=0.999, tau=1e-8
    ),
    # Flower's FedYogi, like FLamby's, has no bias correction: FLamby's settings carry over.
    "fedyogi": Hyper(
        lr=0.003162, batch_size=4, steps=100, rounds=15, server_lr=0.01, beta_2=0.999, tau=1e-8
    ),
}
FLAMBY["fedadam-nobias"] = dataclasses.replace(FLAMBY["fedadam"], server_lr=0.06)
FLAMBY_LABELS = {
    "pooled": "pooled",
    "fedavg": "FedAvg",
    "fedadam": "FedAdam",
    # FLamby's FedOpt has no Adam bias correction; Flower's has, which shrinks the server step by
    # (1 - β1^(t+1)) / sqrt(1 - β2^(t+1)) ≈ 4-6.5 over these 15 rounds: server lr 0.06 ≈ FLamby's 0.01.
    "fedadam-nobias": "FedAdam, server lr 0.06 (≈ FLamby's 0.01 without bias correction)",
    "fedyogi": "FedYogi",
}


# ------------------------------------------------------------------------------------- testing


@dataclass
class Outcome:
    """A method's test results over seeds."""

    label: str
    hp: Hyper
    method: str
    scores: list[Score] = field(default_factory=list)
    tuned: Tuned | None = None

    @property
    def accuracies(self) -> list[float]:
        return [s.accuracy for s in self.scores]

    @property
    def aucs(self) -> list[float]:
        return [s.roc_auc for s in self.scores]

    def per_centre(self, site: str) -> float:
        return float(np.mean([s.per_site[site].accuracy for s in self.scores]))

    def to_json(self) -> dict[str, object]:
        return {
            "label": self.label,
            "method": self.method,
            "hyper": dataclasses.asdict(self.hp),
            "accuracy": self.accuracies,
            "roc_auc": self.aucs,
            "per_site": [
                {n: dataclasses.asdict(r) for n, r in s.per_site.items()} for s in self.scores
            ],
            "validation": dataclasses.asdict(self.tuned) if self.tuned else None,
        }


def on_test(
    label: str,
    method: str,
    sites: Sequence[SiteConfig],
    hp: Hyper,
    seeds: Sequence[int],
    *,
    epsilon: float | None = None,
    scaling: str = "federated",
    tuned: Tuned | None = None,
    secure: bool = False,
) -> Outcome:
    out = Outcome(label, hp, method, tuned=tuned)
    for seed in seeds:
        trajectory = run_method(
            method, sites, hp, seed=seed, epsilon=epsilon, scaling=scaling, secure=secure
        )
        out.scores.append(trajectory[max(trajectory)])
    return out


# ------------------------------------------------------------------------------------- report


def _outcome_rows(
    outcomes: Sequence[Outcome], sites: Sequence[str], show_hp: bool
) -> list[list[str]]:
    rows = []
    for o in outcomes:
        row = [o.label, fmt_mean_std(o.accuracies), fmt_mean_std(o.aucs)]
        row += [f"{o.per_centre(s):.3f}" for s in sites]
        if show_hp:
            row.append(o.hp.short(o.method))
        if o.tuned is not None:
            row.append(f"{o.tuned.val_accuracy:.3f} / {o.tuned.val_roc_auc:.3f}")
        rows.append(row)
    return rows


def outcome_table(outcomes: Sequence[Outcome], sites: Sequence[str], *, tuned: bool) -> str:
    header = ["method", "accuracy (mean of centres)", "ROC AUC (mean of centres)"]
    header += [CENTRES[s] for s in sites] + ["hyper-parameters"]
    if tuned:
        header.append("validation acc / AUC")
    return markdown_table(header, _outcome_rows(outcomes, sites, show_hp=True))


def targets(paired: dict[str, Outcome]) -> list[str]:
    """The targets, judged on paired seeds: the same seeds for pooled and DP-FedAvg, so that the
    difference's standard error is small (DP noise, initialization and sampling vary by seed)."""
    pooled = paired["pooled"]
    pa, pu = np.array(pooled.accuracies), np.array(pooled.aucs)
    n = len(pa)
    lines = [
        f"Judged on {n} paired seeds (mean ± standard error of the paired difference):",
        "",
        f"- pooled LR ≈ 0.80 accuracy / 0.86 AUC: measured {pa.mean():.3f} / {pu.mean():.3f} → "
        f"{'MET' if abs(pa.mean() - 0.80) <= 0.03 and abs(pu.mean() - 0.86) <= 0.03 else 'MISSED'}",
    ]
    for eps, tol in ((1.0, 0.01), (0.3, 0.03)):
        key = f"dp-{eps:g}"
        if key not in paired:
            continue
        da = np.array(paired[key].accuracies) - pa
        du = np.array(paired[key].aucs) - pu
        se_a = da.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan
        se_u = du.std(ddof=1) / math.sqrt(n) if n > 1 else math.nan
        verdict = (
            "MET on both"
            if da.mean() >= -tol and du.mean() >= -tol
            else "MET on accuracy only"
            if da.mean() >= -tol
            else "MET on AUC only"
            if du.mean() >= -tol
            else "MISSED"
        )
        lines.append(
            f"- DP-FedAvg at ε = {eps:g} within {tol} of pooled: accuracy "
            f"{np.mean(paired[key].accuracies):.3f} ({da.mean():+.3f} ± {se_a:.3f}), AUC "
            f"{np.mean(paired[key].aucs):.3f} ({du.mean():+.3f} ± {se_u:.3f}) → {verdict}"
        )
    references = [k for k in paired if k.startswith("central-")]
    if references:
        lines += [
            "",
            "Reference, not a target: central DP-SGD at the same ε on the pooled rows (one trusted "
            "curator, one noise draw per step; what DP costs without federation), same seeds:",
            "",
        ]
    for key in references:
        eps_text = key.split("-", 1)[1]
        ca, cu = np.array(paired[key].accuracies), np.array(paired[key].aucs)
        lines.append(
            f"- central DP ε = {eps_text}: accuracy {ca.mean():.3f} ({_paired(ca, pa)} vs pooled), "
            f"AUC {cu.mean():.3f} ({_paired(cu, pu)} vs pooled)"
        )
        fed = paired.get(f"dp-{eps_text}")
        if fed is not None:
            fa, fu = np.array(fed.accuracies), np.array(fed.aucs)
            lines.append(
                f"- DP-FedAvg ε = {eps_text} against central DP: accuracy {_paired(fa, ca)}, AUC "
                f"{_paired(fu, cu)} (the cost of each site adding its own noise)"
            )
    return lines


def _paired(a: np.ndarray, b: np.ndarray) -> str:
    """``mean ± standard error`` of the paired difference ``a - b``."""
    d = a - b
    se = d.std(ddof=1) / math.sqrt(len(d)) if len(d) > 1 else math.nan
    return f"{d.mean():+.3f} ± {se:.3f}"


def noise_calibration(sites: Sequence[SiteConfig], settings: dict[float, Hyper]) -> str:
    """The noise multiplier each site calibrates for the tuned settings: RDP (the sites' accountant)
    against PRV (numerical, tighter) — how much a tighter analysis would save."""
    import warnings

    from clinfed.privacy.accountant import calibrate_noise, planned_steps

    rows = []
    for eps, hp in sorted(settings.items()):
        for s in sites:
            n = len(load_site_data(s).y_train)
            q, steps = planned_steps(
                num_records=n,
                batch_size=hp.batch_size,
                epochs_per_round=hp.epochs,
                rounds=hp.rounds,
            )
            sigma = {}
            for accountant in ("rdp", "prv"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")  # PRV's log(1 - q) at q = 1
                    sigma[accountant] = calibrate_noise(
                        target_epsilon=eps,
                        target_delta=DELTA,
                        sample_rate=q,
                        steps=steps,
                        accountant=accountant,
                    )
            rows.append(
                [
                    f"{eps:g}",
                    CENTRES[s.name],
                    str(n),
                    f"{q:.2f}",
                    str(steps),
                    f"{sigma['rdp']:.2f}",
                    f"{sigma['prv']:.2f}",
                    f"{sigma['prv'] / sigma['rdp'] - 1:+.0%}",
                ]
            )
    header = ["ε", "centre", "n", "q", "steps", "σ (RDP)", "σ (PRV)", "PRV vs RDP"]
    return markdown_table(header, rows)


def rounds_tradeoff(dp: dict[float, Outcome]) -> str:
    """Best validation accuracy / AUC per number of rounds, for each ε (the noise trade-off)."""
    eps_list = sorted(dp)
    rounds = sorted({hp.rounds for o in dp.values() if o.tuned for hp, *_ in o.tuned.table})
    rows = []
    for r in rounds:
        row = [str(r)]
        for eps in eps_list:
            tuned = dp[eps].tuned
            cands = [
                (crit, acc, auc)
                for hp, acc, auc, crit in (tuned.table if tuned else [])
                if hp.rounds == r
            ]
            if cands:
                _, acc, auc = max(cands)
                row.append(f"{acc:.3f} / {auc:.3f}")
            else:
                row.append("-")
        rows.append(row)
    return markdown_table(["rounds", *[f"ε = {e:g}" for e in eps_list]], rows)


# ------------------------------------------------------------------------------------- main


def _log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


def binary_benchmark(grids: Grids, folder: Path) -> dict[str, object]:
    sites = site_configs("binary")
    names = [s.name for s in sites]
    note = fedadam_dtype_shim(sites)
    if note:
        _log("WARNING: " + note)
    folds = validation_folds(sites, grids.folds, folder, use=grids.use_folds)
    seeds = grids.test_seeds
    tuned_out: list[Outcome] = []
    dp_out: dict[float, Outcome] = {}

    for method, grid, points in (
        ("pooled", grids.baseline, grids.baseline_points),
        ("local", grids.baseline, grids.baseline_points),
        ("fedavg", grids.federated, grids.federated_points),
        ("fedadam", grids.fedadam, grids.federated_points),
    ):
        t = tune(method, folds, grids.fold_seeds, grid, points=points)
        _log(
            f"binary {method}: chose {t.hp.short(method)} on validation ({t.tried} tried, {t.seconds:.0f} s)"
        )
        tuned_out.append(on_test(METHOD_LABELS[method], method, sites, t.hp, seeds, tuned=t))
    for eps in grids.epsilons:
        t = tune_dp(folds, grids.fold_seeds, grids.dp, epsilon=eps)
        _log(f"binary DP ε={eps:g}: chose {t.hp.short('dp')} ({t.tried} tried, {t.seconds:.0f} s)")
        dp_out[eps] = on_test(
            f"DP-FedAvg ε = {eps:g}", "dp", sites, t.hp, seeds, epsilon=eps, tuned=t
        )
    tuned_out += list(dp_out.values())
    central_out: dict[float, Outcome] = {}
    for eps in (0.3, 1.0):
        if eps in grids.epsilons:
            t = tune_dp(folds, grids.fold_seeds, grids.central_dp, epsilon=eps, method="pooled-dp")
            _log(f"binary central DP ε={eps:g}: chose {t.hp.short('pooled-dp')} ({t.tried} tried)")
            central_out[eps] = on_test(
                f"{METHOD_LABELS['pooled-dp']} ε = {eps:g}",
                "pooled-dp",
                sites,
                t.hp,
                seeds,
                epsilon=eps,
                tuned=t,
            )
    tuned_out += list(central_out.values())

    paired = {"pooled": on_test("pooled", "pooled", sites, tuned_out[0].hp, grids.target_seeds)}
    for eps in (0.3, 1.0):
        for key, method, chosen in (("dp", "dp", dp_out), ("central", "pooled-dp", central_out)):
            if eps in chosen:
                paired[f"{key}-{eps:g}"] = on_test(
                    f"{METHOD_LABELS[method]} ε = {eps:g}",
                    method,
                    sites,
                    chosen[eps].hp,
                    grids.target_seeds,
                    epsilon=eps,
                )
    _log(f"binary: target checks on {len(grids.target_seeds)} paired seeds done")

    # Diagnostics for the DP targets: the same tuned settings with (almost) no noise separate
    # the cost of the noise from the cost of the setting (few, clipped steps).
    ablation = [
        on_test(
            f"DP-FedAvg, the ε = {eps:g} setting run at ε = 1000 (noise ≈ 0)",
            "dp",
            sites,
            dp_out[eps].hp,
            seeds,
            epsilon=1000.0,
        )
        for eps in (0.3, 1.0)
        if eps in dp_out
    ]
    calibration = noise_calibration(
        sites, {eps: dp_out[eps].hp for eps in (0.3, 1.0) if eps in dp_out}
    )
    _log("binary: noise ablation done")

    secure_out: list[Outcome] = []
    secure_note = ""
    for eps in (1.0,) if 1.0 in dp_out else ():
        _EVENTS.clear()
        try:
            secure_out.append(
                on_test(
                    f"DP-FedAvg ε = {eps:g}, same setting, secure aggregation ON (defaults)",
                    "dp",
                    sites,
                    dp_out[eps].hp,
                    seeds,
                    epsilon=eps,
                    secure=True,
                )
            )
            clipped = sum(_clipped_count(e) for e in _EVENTS)
            secure_note = (
                f"secure aggregation clipped {clipped} update values to its clip_range over "
                f"{len(seeds)} runs ({len(_EVENTS)} round events)"
            )
        except Exception as error:  # noqa: BLE001 - work in progress elsewhere; report, don't stop
            secure_note = f"secure aggregation run failed: {type(error).__name__}: {error}"
        _log(f"binary: {secure_note}")

    fed_fixed, base_fixed = demo_setting()
    fixed = [
        on_test(METHOD_LABELS["pooled"], "pooled", sites, base_fixed, seeds),
        on_test(METHOD_LABELS["local"], "local", sites, base_fixed, seeds),
        on_test(METHOD_LABELS["fedavg"], "fedavg", sites, fed_fixed, seeds),
        on_test(METHOD_LABELS["fedadam"], "fedadam", sites, fed_fixed, seeds),
    ] + [
        on_test(f"DP-FedAvg ε = {eps:g}", "dp", sites, fed_fixed, seeds, epsilon=eps)
        for eps in grids.epsilons
    ]
    _log("binary: fixed (demo) setting done")

    flamby_sites = flamby_split_sites(sites, folder)
    pooled_tuned = tuned_out[0].hp
    flamby = []
    for split_name, split_sites in (
        ("this project's split", sites),
        ("FLamby's exact split", flamby_sites),
    ):
        for method in ("pooled", "fedavg", "fedadam", "fedadam-nobias", "fedyogi"):
            algorithm = method.split("-")[0]
            flamby.append(
                on_test(
                    f"{FLAMBY_LABELS[method]}, FLamby scaling + settings, {split_name}",
                    algorithm,
                    split_sites,
                    FLAMBY[method],
                    seeds,
                    scaling="local",
                )
            )
        flamby.append(
            on_test(
                f"pooled, federated scaling + tuned settings, {split_name}",
                "pooled",
                split_sites,
                pooled_tuned,
                seeds,
            )
        )
    _log("binary: FLamby reproduction done")

    return {
        "sites": names,
        "tuned": tuned_out,
        "fixed": fixed,
        "flamby": flamby,
        "targets": targets(paired),
        "paired": list(paired.values()),
        "notes": list(_SHIMMED),
        "secure": secure_out,
        "secure_note": secure_note,
        "ablation": ablation,
        "rounds_tradeoff": rounds_tradeoff(dp_out),
        "calibration": calibration,
    }


def severity_benchmark(grids: Grids, folder: Path) -> dict[str, object]:
    sites = site_configs("severity")
    folds = validation_folds(sites, grids.folds, folder / "severity", use=grids.use_folds)
    seeds = grids.test_seeds
    out = []
    for method, grid, points in (
        ("pooled", grids.baseline, grids.baseline_points),
        ("fedavg", grids.federated, grids.federated_points),
    ):
        t = tune(method, folds, grids.fold_seeds, grid, points=points)
        _log(f"severity {method}: chose {t.hp.short(method)} ({t.tried} tried, {t.seconds:.0f} s)")
        out.append(on_test(METHOD_LABELS[method], method, sites, t.hp, seeds, tuned=t))
    t = tune_dp(folds, grids.fold_seeds, grids.dp, epsilon=1.0)
    _log(f"severity DP ε=1: chose {t.hp.short('dp')} ({t.tried} tried, {t.seconds:.0f} s)")
    out.append(on_test("DP-FedAvg ε = 1", "dp", sites, t.hp, seeds, epsilon=1.0, tuned=t))
    return {"sites": [s.name for s in sites], "tuned": out}


PUBLISHED = {
    "pooled": (0.735, 0.003),
    "FedAvg": (0.685, 0.028),
    "FedAdam": (0.726, None),
    "FedYogi": (0.731, None),
}


def flamby_verdicts(outcomes: Sequence[Outcome]) -> list[str]:
    """Measured (FLamby's exact split) against FLamby's published mean per-centre accuracy."""
    lines = []
    for o in outcomes:
        if "FLamby's exact split" not in o.label or "FLamby scaling" not in o.label:
            continue
        name = o.label.split(", FLamby scaling")[0]
        key = name.split(",")[0]
        if key not in PUBLISHED:
            continue
        m, sd = mean_std(o.accuracies)
        pub, pub_sd = PUBLISHED[key]
        spread = f" ± {pub_sd}" if pub_sd is not None else ""
        lines.append(
            f"- {name}: measured {m:.3f} ± {sd:.3f}, published {pub:.3f}{spread} ({m - pub:+.3f})"
        )
    return lines


def render(
    env: dict[str, str],
    binary: dict[str, object],
    severity: dict[str, object] | None,
    seconds: float,
) -> str:
    sites = binary["sites"]
    parts = [
        "## Utility on Fed-Heart-Disease",
        format_environment(env) + f"\n- wall time: {seconds / 60:.1f} min",
        "### Targets",
        "\n".join(binary["targets"]),  # type: ignore[arg-type]
        "\n".join(f"> {n}" for n in binary["notes"]) or "(no workarounds were needed)",  # type: ignore[attr-defined]
        "### Tuned on validation folds (test split untouched), mean ± std over seeds",
        outcome_table(binary["tuned"], sites, tuned=True),  # type: ignore[arg-type]
        "### DP-FedAvg against pooled: diagnostics",
        "Best validation accuracy / AUC (mean of the CV folds) for each number of rounds:",
        str(binary["rounds_tradeoff"]),
        "The tuned DP settings run with almost no noise (ε = 1000), on the test split:",
        outcome_table(binary["ablation"], sites, tuned=False),  # type: ignore[arg-type]
        "Noise each site calibrates for the tuned settings (its whole run), RDP vs PRV accounting:",
        str(binary["calibration"]),
        "### Effect of secure aggregation (default settings) on the tuned DP-FedAvg ε = 1",
        (outcome_table(binary["secure"], sites, tuned=False) + "\n\n" if binary["secure"] else "")  # type: ignore[arg-type]
        + str(binary["secure_note"]),
        "### Fixed demo setting (conf/simulate.yaml), reported as is",
        outcome_table(binary["fixed"], sites, tuned=False),  # type: ignore[arg-type]
        "### FLamby reproduction (published: pooled 0.735, FedAvg 0.685, FedAdam 0.726, FedYogi 0.731)",
        "FLamby's scaling (each centre standardized with its own training statistics; the pooled "
        "model trained on pooled-standardized rows and tested on each centre's own scaling) and "
        "FLamby's settings, on this project's split and on FLamby's exact (stratified) split:",
        outcome_table(binary["flamby"], sites, tuned=False),  # type: ignore[arg-type]
        "\n".join(flamby_verdicts(binary["flamby"])),  # type: ignore[arg-type]
    ]
    parts.append(
        "Reproduce: `python -m benchmarks.utility --seeds 5` (`--quick`: one fold, tiny grids, one "
        "seed; `--no-severity`)."
    )
    if severity is not None:
        parts += [
            "### Severity grade 0-4 (Cleveland, VA Long Beach, Switzerland)",
            outcome_table(severity["tuned"], severity["sites"], tuned=True),  # type: ignore[arg-type]
        ]
    return "\n\n".join(parts) + "\n"


def _jsonable(obj: object) -> object:
    if isinstance(obj, Outcome):
        return obj.to_json()
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    return obj


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: one fold, tiny grids, one seed"
    )
    parser.add_argument("--seeds", type=int, default=5, help="test seeds per method (default 5)")
    parser.add_argument(
        "--target-seeds",
        type=int,
        default=20,
        help="paired seeds for the target checks (default 20)",
    )
    parser.add_argument("--no-severity", action="store_true", help="skip the severity task")
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument(
        "--out", default=str(ROOT / "benchmarks" / "out"), help="folder for utility.{json,md}"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    configure_logging(verbose=args.verbose)
    torch.set_num_threads(1)
    env = environment()
    started = time.perf_counter()
    grids = make_grids(args.quick, args.seeds, args.target_seeds)
    with tempfile.TemporaryDirectory(prefix="clinfed-utility-") as tmp:
        folder = Path(tmp)
        (folder / "severity").mkdir()
        binary = binary_benchmark(grids, folder)
        severity = None if args.no_severity else severity_benchmark(grids, folder)
    seconds = time.perf_counter() - started
    text = render(env, binary, severity, seconds)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (out / f"utility{suffix}.md").write_text(text)
    document = {"environment": env, "seconds": seconds, "binary": binary, "severity": severity}
    (out / f"utility{suffix}.json").write_text(
        json.dumps(_jsonable(document), indent=1, allow_nan=True)
    )
    print(text)
    if not (args.quick or args.no_write):
        write_section(text)
        print(f"section written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
