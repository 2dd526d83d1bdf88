"""What a hospital site does when the server asks: describe itself, train, evaluate.

Transport-free: these functions take typed values and return typed values; :mod:`clinfed.client.app`
translates Flower messages to and from them. The site's data, schema and privacy target come from
its own :class:`~clinfed.config.SiteConfig` and never leave the site; what leaves is decided here
and checked again by :func:`clinfed.client.mods.egress_guard_mod`.
"""

from __future__ import annotations

import hashlib
import logging
import math
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import cache

import numpy as np
import torch
from flwr.app import MetricRecordValues
from torch import nn

from clinfed.client.data import (
    DatasetSchema,
    SiteTable,
    load_schema,
    load_site_table,
    split_train_test,
)
from clinfed.client.training import EvalResult, TrainResult, TrainSettings, evaluate, train
from clinfed.config import SiteConfig
from clinfed.errors import PrivacyError, UpdateRejectedError
from clinfed.privacy.accountant import DPStep, calibrate_noise, epsilon_spent, planned_steps

__all__ = [
    "DPState",
    "RoundPlan",
    "RoundRequest",
    "SiteData",
    "check_own_update",
    "describe_site",
    "flat_metrics",
    "load_site_data",
    "plan_round",
    "restore_dp_state",
    "run_round",
    "schema_fingerprint",
    "seeded_bytes",
    "site_evaluate",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SiteData:
    """A site's training and held-out test splits as tensors (never leave the site)."""

    schema: DatasetSchema
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    x_cal: torch.Tensor = field(default_factory=lambda: torch.zeros(0, 0))
    """Conformal calibration split: carved from the training rows, never trained on."""
    y_cal: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.int64))

    @property
    def num_features(self) -> int:
        return int(self.x_train.shape[1])

    @property
    def num_classes(self) -> int:
        return len(self.schema.class_names)


def schema_fingerprint(schema: DatasetSchema) -> str:
    """A short hash of the encoded feature layout and classes; all sites must agree on it."""
    text = "\x1f".join([*schema.encoded_feature_names, "\x1e", *schema.class_names])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _tensors(table: SiteTable) -> tuple[torch.Tensor, torch.Tensor]:
    return (
        torch.from_numpy(np.ascontiguousarray(table.features, dtype=np.float32)),
        torch.from_numpy(table.labels.astype(np.int64)),
    )


@cache
def _load(
    path: str,
    schema_path: str,
    test_fraction: float,
    split_seed: int,
    calibration_fraction: float = 0.0,
) -> SiteData:
    schema = load_schema(schema_path)
    table = load_site_table(path, schema)
    train_table, test_table = split_train_test(table, test_fraction=test_fraction, seed=split_seed)
    calibration: tuple[torch.Tensor, torch.Tensor] | None = None
    if calibration_fraction > 0:
        # Carved from the training rows with its own seed, before any training: the model never
        # sees them, so their conformity scores are exchangeable with the test split's.
        train_table, cal_table = split_train_test(
            train_table, test_fraction=calibration_fraction, seed=split_seed + 1
        )
        calibration = _tensors(cal_table)
    logger.info(
        "loaded %s: %d training, %d calibration and %d test records, %d features, %d classes",
        table.source,
        len(train_table),
        0 if calibration is None else len(calibration[1]),
        len(test_table),
        schema.num_encoded_features,
        len(schema.class_names),
    )
    x_train, y_train = _tensors(train_table)
    x_test, y_test = _tensors(test_table)
    if calibration is None:
        return SiteData(schema, x_train, y_train, x_test, y_test)
    return SiteData(schema, x_train, y_train, x_test, y_test, *calibration)


def describe_site(site: SiteConfig) -> str:
    """Load the site's data as training would and say, in a few lines, what was found."""
    data = load_site_data(site)
    return (
        f"site {site.name}: data OK — {len(data.y_train)} training, {len(data.y_cal)} calibration "
        f"and {len(data.y_test)} test records, {data.num_features} encoded features, "
        f"classes {list(data.schema.class_names)}; "
        f"privacy target epsilon {site.privacy.epsilon:g}, delta {site.privacy.delta:g} "
        f"({site.privacy.accountant})"
    )


def load_site_data(site: SiteConfig) -> SiteData:
    """Load and split the site's data once per process (validated against its schema)."""
    d = site.data
    return _load(d.path, d.schema, d.test_fraction, d.split_seed, d.calibration_fraction)


@dataclass(frozen=True)
class RoundRequest:
    """A training request as the site understands it (parsed from the server's message)."""

    server_round: int
    num_rounds: int
    settings: TrainSettings
    dp: bool


@dataclass
class DPState:
    """The site's DP state for one run: the calibrated noise and every step taken so far.

    Kept in Flower's ``context.state`` between rounds so that ε is cumulative over the run.
    """

    plan: str = ""
    noise_multiplier: float = 0.0
    history: list[DPStep] = field(default_factory=list)
    non_private_rounds: int = 0


def _plan_signature(request: RoundRequest, num_records: int) -> str:
    s = request.settings
    return (
        f"rounds={request.num_rounds};epochs={s.epochs};steps={s.local_steps};"
        f"batch={s.batch_size};n={num_records}"
    )


@dataclass(frozen=True)
class RoundPlan:
    """What a round will spend, known before any record is touched.

    ``step`` is this round's DP-SGD step (``None`` when the round trains without DP, which only a
    site with ``privacy.required: false`` accepts); ``epsilon_after`` the run's ε once it is done.
    """

    step: DPStep | None
    epsilon_after: float


def plan_round(
    data: SiteData, request: RoundRequest, *, site: SiteConfig, state: DPState
) -> RoundPlan:
    """Plan one round under the site's privacy target, refusing what would break it.

    On the first round the noise multiplier is calibrated so that the **whole planned run**
    (``num_rounds`` rounds of ``epochs`` epochs) spends at most the site's target ε. Every round
    checks that the steps already taken plus this round's stay within the target.
    """
    target = site.privacy
    if not request.dp:
        if target.required:
            raise PrivacyError(
                f"site {site.name} requires differential privacy, but the server asked to train "
                "without it (train.dp=false). Refused; the site's privacy.required setting rules."
            )
        return RoundPlan(step=None, epsilon_after=math.inf)
    n = len(data.y_train)
    sample_rate, total_steps = planned_steps(
        num_records=n,
        batch_size=request.settings.batch_size,
        epochs_per_round=request.settings.epochs,
        local_steps=request.settings.local_steps,
        rounds=request.num_rounds,
    )
    plan = _plan_signature(request, n)
    if not state.plan:
        state.noise_multiplier = calibrate_noise(
            target_epsilon=target.epsilon,
            target_delta=target.delta,
            sample_rate=sample_rate,
            steps=total_steps,
            accountant=target.accountant,
        )
        state.plan = plan
        logger.info(
            "calibrated noise multiplier %.4f for epsilon %.3g, delta %.1g over %d rounds "
            "(%d steps, q=%.4f)",
            state.noise_multiplier,
            target.epsilon,
            target.delta,
            request.num_rounds,
            total_steps,
            sample_rate,
        )
    elif plan != state.plan:
        raise PrivacyError(
            f"the run's plan changed mid-run ({state.plan} -> {plan}); the noise was calibrated "
            "for the first plan. Start a new run to change rounds, epochs or batch size."
        )
    this_round = DPStep(
        noise_multiplier=state.noise_multiplier,
        sample_rate=sample_rate,
        steps=total_steps // request.num_rounds,
    )
    after = epsilon_spent(
        [*state.history, this_round], delta=target.delta, accountant=target.accountant
    )
    if after > target.epsilon * (1 + 1e-9):
        spent = epsilon_spent(state.history, delta=target.delta, accountant=target.accountant)
        raise PrivacyError(
            f"round {request.server_round} would bring site {site.name} to epsilon {after:.4g}, "
            f"above its target {target.epsilon:g} (spent so far {spent:.4g}). Refused before "
            "training."
        )
    return RoundPlan(step=this_round, epsilon_after=after)


def run_round(
    model: nn.Module,
    data: SiteData,
    request: RoundRequest,
    plan: RoundPlan,
    *,
    site: SiteConfig,
    state: DPState,
) -> TrainResult:
    """Train ``model`` in place for the planned round and account for it in ``state``."""
    if plan.step is None:
        logger.warning(
            "training WITHOUT differential privacy (site allows it: privacy.required=false)"
        )
        result = train(
            model,
            data.x_train,
            data.y_train,
            settings=request.settings,
            noise_multiplier=None,
            generator=_generator(site, request.server_round),
        )
        state.non_private_rounds += 1
        return result
    result = train(
        model,
        data.x_train,
        data.y_train,
        settings=request.settings,
        noise_multiplier=plan.step.noise_multiplier,
        generator=_generator(site, request.server_round),
    )
    if result.steps != plan.step.steps:  # pragma: no cover - a bug, never a user error
        raise PrivacyError(
            f"took {result.steps} steps, accounted {plan.step.steps}; refusing to send."
        )
    state.history.append(plan.step)
    return result


def restore_dp_state(
    plan: RoundPlan,
    request: RoundRequest,
    *,
    site: SiteConfig,
    state: DPState,
    ledger_history: list[DPStep | None] | None,
) -> str:
    """Rebuild the DP history of a run this site has no state for, though it is under way.

    This happens when the server restarted and resumed a run (a new Flower run: the site's
    ``context.state`` is empty) or the site's node restarted. ``plan`` is the round planned on the
    empty state (its noise calibration is a function of the run's plan, so it is the one used
    before). The history then comes from:

    * the site's privacy ledger (``ledger_history``: this run's records, in order) — exact, so the
      site is charged neither less nor twice; every recorded step must match the plan;
    * without a ledger: the worst case, as if the site had trained in every earlier round
      (``server_round - 1`` steps) — ε may be over-reported, never under-reported.

    Returns a one-line description for the site's log.
    """
    earlier = request.server_round - 1
    if ledger_history is None:
        if plan.step is None:
            state.non_private_rounds = earlier
        else:
            state.history = [plan.step] * earlier
        return (
            f"site {site.name} has no state for rounds 1-{earlier} of this run and no privacy "
            f"ledger: counting all {earlier} earlier round(s) as spent (worst case)"
        )
    for step in ledger_history:
        if step is not None and step != plan.step:
            raise PrivacyError(
                f"site {site.name}: the ledger's records of this run ({step}) do not match the "
                f"resumed run's plan ({plan.step}); the run's settings changed. Start a new run."
            )
    state.history = [s for s in ledger_history if s is not None]
    state.non_private_rounds = sum(1 for s in ledger_history if s is None)
    return (
        f"site {site.name} restored {len(ledger_history)} round(s) of this run from its privacy "
        "ledger"
    )


def check_own_update(update: np.ndarray, *, site: str, max_norm: float) -> None:
    """Refuse to send an update that is not finite or whose L2 norm exceeds ``max_norm``.

    The site's own check, before its update is masked: with secure aggregation the server cannot
    look at one update, so a diverged one must be stopped here. Raises
    :class:`~clinfed.errors.UpdateRejectedError`; the reason reaches the server.
    """
    finite = np.isfinite(update)
    if not finite.all():
        raise UpdateRejectedError(
            f"site {site} refuses to send its update: {int(np.count_nonzero(~finite))} of "
            f"{update.size} values are NaN/Inf (local training diverged; lower train.lr or "
            "train.max_grad_norm)."
        )
    norm = float(np.linalg.norm(update.astype(np.float64)))
    if norm > max_norm:
        raise UpdateRejectedError(
            f"site {site} refuses to send its update: its L2 norm {norm:.4g} exceeds "
            f"validation.max_update_norm {max_norm:g} (local training diverged, or raise the bound)."
        )


def site_evaluate(model: nn.Module, data: SiteData) -> EvalResult:
    """Evaluate ``model`` on the site's held-out test split."""
    return evaluate(model, data.x_test, data.y_test)


def _generator(site: SiteConfig, server_round: int) -> torch.Generator:
    """The site's DP randomness: from the OS unless a simulation fixed ``noise_seed``."""
    g = torch.Generator()
    if site.noise_seed is None:
        g.manual_seed(secrets.randbits(63))
    else:
        digest = hashlib.sha256(f"{site.noise_seed}:{site.name}:{server_round}".encode()).digest()
        g.manual_seed(int.from_bytes(digest[:8], "big") >> 1)
    return g


def seeded_bytes(
    site: SiteConfig, server_round: int, purpose: str
) -> Callable[[int], bytes] | None:
    """Reproducible randomness for ``purpose`` when a simulation fixed ``noise_seed``, else None.

    ``None`` means: use the operating system's randomness (production). The bytes are a
    function of (noise_seed, site, round, purpose) only, so a run resumed from a checkpoint draws
    exactly what an uninterrupted one would.
    """
    if site.noise_seed is None:
        return None
    stream = hashlib.shake_256(f"{site.noise_seed}:{site.name}:{server_round}:{purpose}".encode())
    used = 0

    def take(n: int) -> bytes:
        nonlocal used
        chunk = stream.digest(used + n)[used:]
        used += n
        return chunk

    return take


def flat_metrics(values: Mapping[str, float | int]) -> dict[str, MetricRecordValues]:
    """Metrics as plain Python ``int``/``float`` (MetricRecord rejects numpy scalars)."""
    return {k: (int(v) if isinstance(v, int) else float(v)) for k, v in values.items()}
