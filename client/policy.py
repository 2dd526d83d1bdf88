"""A hospital's site policy: the rules its IT department sets for any run on the site's data.

The policy is a YAML file owned by hospital IT, kept on the site's machine outside the app folder
(Flower ships the app folder to every node) and never sent anywhere. It states:

* ``budget`` — the **total** privacy budget ``(epsilon, delta)`` of the site's dataset across
  all runs, ever, and the ``accountant`` that composes them (enforced with the privacy ledger,
  :mod:`clinfed.privacy.ledger`);
* ``run`` — limits on any one run: ``max_epsilon``, ``max_rounds``, ``min_noise_multiplier``,
  ``max_grad_norm`` (the per-record clipping bound), ``require_dp`` (default true),
  ``require_secure_aggregation`` and ``allowed_models``;
* ``egress.allowed_metrics`` — which metrics may leave the site, a subset of the wire
  whitelist (:data:`clinfed.wire.TRAIN_METRIC_KEYS` | :data:`clinfed.wire.EVALUATE_METRIC_KEYS`).

Every limit must be written out: a policy has no silent defaults (only ``accountant: rdp`` and
``require_dp: true``, the strict choices). All ε are at the budget's δ; the unit of privacy is
one patient record of the site's training data.

A bad policy fails at start-up with a one-line :class:`~clinfed.errors.ConfigError` naming the
key (:func:`load_site_policy`); a request that breaks it is refused before any record is touched
with a one-line :class:`PolicyViolation` (:func:`check_request`, :func:`check_metrics`) that says
which rule, what was asked and what the policy allows — never trimmed or adjusted silently.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from clinfed import wire
from clinfed.config import load_config
from clinfed.errors import ConfigError, PrivacyError
from clinfed.models import registered_models

__all__ = [
    "BudgetPolicy",
    "EgressPolicy",
    "PolicyRequest",
    "PolicyViolation",
    "RunPolicy",
    "SitePolicy",
    "check_metrics",
    "check_request",
    "load_site_policy",
]

logger = logging.getLogger(__name__)

_WIRE_METRICS = wire.TRAIN_METRIC_KEYS | wire.EVALUATE_METRIC_KEYS | wire.REPORT_METRIC_KEYS


def _number(key: str, value: object, *, low: float, low_open: bool = True) -> float:
    """``value`` as a finite number above ``low`` (or at least ``low``), else a ConfigError."""
    if (
        isinstance(value, int | float)
        and not isinstance(value, bool)
        and math.isfinite(value)
        and (value > low if low_open else value >= low)
    ):
        return float(value)
    bound = f"> {low:g}" if low_open else f">= {low:g}"
    raise ConfigError(f"{key} must be a finite number {bound}; found {value!r}.")


def _names(key: str, values: object, known: Iterable[str], what: str) -> tuple[str, ...]:
    known = sorted(known)
    if not isinstance(values, tuple | list) or not values:
        raise ConfigError(
            f"{key} must list at least one {what}; found {values!r}. Known: {', '.join(known)}."
        )
    unknown = [v for v in values if v not in known]
    if unknown:
        raise ConfigError(
            f"{key} names unknown {what}(s) {', '.join(map(repr, unknown))}; known: {', '.join(known)}."
        )
    return tuple(values)


@dataclass(frozen=True, kw_only=True)
class BudgetPolicy:
    """The dataset's total budget, over every run that will ever train on it."""

    epsilon: float
    delta: float
    accountant: Literal["rdp", "prv"] = "rdp"

    def __post_init__(self) -> None:
        _number("budget.epsilon", self.epsilon, low=0.0)
        delta = _number("budget.delta", self.delta, low=0.0)
        if delta >= 1:
            raise ConfigError(
                f"budget.delta must be in (0, 1); found {self.delta!r}. Use a value well below "
                "1/n for n training records, e.g. 1e-5."
            )
        if self.accountant not in ("rdp", "prv"):
            raise ConfigError(f"budget.accountant must be rdp or prv; found {self.accountant!r}.")


@dataclass(frozen=True, kw_only=True)
class RunPolicy:
    """Limits on any one run."""

    max_epsilon: float
    max_rounds: int
    min_noise_multiplier: float
    max_grad_norm: float
    require_secure_aggregation: bool
    allowed_models: tuple[str, ...]
    require_dp: bool = True

    def __post_init__(self) -> None:
        _number("run.max_epsilon", self.max_epsilon, low=0.0)
        if (
            isinstance(self.max_rounds, bool)
            or not isinstance(self.max_rounds, int)
            or self.max_rounds < 1
        ):
            raise ConfigError(f"run.max_rounds must be an integer >= 1; found {self.max_rounds!r}.")
        _number("run.min_noise_multiplier", self.min_noise_multiplier, low=0.0, low_open=False)
        _number("run.max_grad_norm", self.max_grad_norm, low=0.0)
        for key in ("require_secure_aggregation", "require_dp"):
            if not isinstance(getattr(self, key), bool):
                raise ConfigError(f"run.{key} must be true or false; found {getattr(self, key)!r}.")
        _names("run.allowed_models", self.allowed_models, registered_models(), "model")


@dataclass(frozen=True, kw_only=True)
class EgressPolicy:
    """What may leave the site besides the model update."""

    allowed_metrics: tuple[str, ...]

    def __post_init__(self) -> None:
        _names("egress.allowed_metrics", self.allowed_metrics, _WIRE_METRICS, "metric")


@dataclass(frozen=True, kw_only=True)
class _PolicyFile:
    budget: BudgetPolicy
    run: RunPolicy
    egress: EgressPolicy


@dataclass(frozen=True, kw_only=True)
class SitePolicy:
    """A site's policy (see the module docstring); ``source`` names its file in messages."""

    budget: BudgetPolicy
    run: RunPolicy
    egress: EgressPolicy
    source: str = "<in memory>"

    def __post_init__(self) -> None:
        if self.run.max_epsilon > self.budget.epsilon:
            raise ConfigError(
                f"run.max_epsilon {self.run.max_epsilon:g} > budget.epsilon {self.budget.epsilon:g}: "
                "one run could spend more than the dataset's whole budget. Lower run.max_epsilon."
            )


def load_site_policy(path: str | Path) -> SitePolicy:
    """Read and check the policy file at ``path``; any problem is a one-line ConfigError."""
    try:
        loaded = load_config(_PolicyFile, path)
    except TypeError as error:
        # OmegaConf's merge raises a bare TypeError for a mapping where a list belongs (or the
        # reverse); clinfed.config._merge should turn it into a ConfigError for every config.
        if "incompatible container types" not in str(error):
            raise
        raise ConfigError(
            f"{path}: a value has the wrong shape (a mapping where a list belongs, or a list where "
            "a mapping belongs). Compare the file with conf/policies/demo-policy.yaml."
        ) from None
    try:
        policy = SitePolicy(
            budget=loaded.budget, run=loaded.run, egress=loaded.egress, source=str(path)
        )
    except ConfigError as error:
        raise ConfigError(f"{path}: {error}") from None
    logger.info(
        "site policy %s: budget epsilon %g at delta %g (%s); per run at most epsilon %g, %d rounds",
        path,
        policy.budget.epsilon,
        policy.budget.delta,
        policy.budget.accountant,
        policy.run.max_epsilon,
        policy.run.max_rounds,
    )
    return policy


class PolicyViolation(PrivacyError):  # noqa: N818 - the name the site policy documents
    """A request breaks the site's policy; ``rules`` names the broken rules (policy keys)."""

    def __init__(self, message: str, *, rules: tuple[str, ...] = ()) -> None:
        super().__init__(message)
        self.rules = rules


def _refuse(policy: SitePolicy, broken: list[tuple[str, str]]) -> PolicyViolation:
    reasons = "; ".join(reason for _, reason in broken)
    return PolicyViolation(
        f"policy refuses: {reasons} (policy file {policy.source})",
        rules=tuple(rule for rule, _ in broken),
    )


@dataclass(frozen=True, kw_only=True)
class PolicyRequest:
    """What a site knows about a run before training, to check against its policy.

    ``run_epsilon`` and ``delta`` are the run's planned target (the ε the whole run may spend
    at that δ) and ``noise_multiplier`` the noise calibrated for it; all three are ``None``
    exactly when ``dp`` is false. Every field is a scalar, so the request can go into the audit
    log as it is (``dataclasses.asdict``).
    """

    model: str
    rounds: int
    local_epochs: int
    batch_size: int
    max_grad_norm: float
    dp: bool
    secure_aggregation: bool
    run_epsilon: float | None
    delta: float | None
    noise_multiplier: float | None
    local_steps: int = 0

    def __post_init__(self) -> None:
        planned = (self.run_epsilon, self.delta, self.noise_multiplier)
        if self.dp and any(v is None for v in planned):
            raise PrivacyError(
                "a DP request must carry its planned run_epsilon, delta and noise_multiplier."
            )
        if not self.dp and any(v is not None for v in planned):
            raise PrivacyError(
                "a request without DP has no run_epsilon, delta or noise_multiplier; pass None."
            )


def check_request(policy: SitePolicy, request: PolicyRequest) -> None:
    """Refuse ``request`` if it breaks any rule of ``policy``, naming every broken rule.

    Checks what a single request can break; the dataset's total budget depends on every earlier
    run and is checked by :meth:`clinfed.privacy.ledger.PrivacyLedger.check_budget`.
    """
    run = policy.run
    broken: list[tuple[str, str]] = []
    if run.require_dp and not request.dp:
        broken.append(("run.require_dp", "training without DP, but run.require_dp is true"))
    if run.require_secure_aggregation and not request.secure_aggregation:
        broken.append(
            (
                "run.require_secure_aggregation",
                "a run without secure aggregation, but run.require_secure_aggregation is true",
            )
        )
    if request.model not in run.allowed_models:
        broken.append(
            (
                "run.allowed_models",
                f"model {request.model!r} is not in run.allowed_models [{', '.join(run.allowed_models)}]",
            )
        )
    if request.rounds > run.max_rounds:
        broken.append(
            ("run.max_rounds", f"rounds {request.rounds} > run.max_rounds {run.max_rounds}")
        )
    if request.max_grad_norm > run.max_grad_norm:
        broken.append(
            (
                "run.max_grad_norm",
                f"max_grad_norm {request.max_grad_norm:g} > run.max_grad_norm {run.max_grad_norm:g}",
            )
        )
    if request.dp:
        sigma, eps, delta = request.noise_multiplier, request.run_epsilon, request.delta
        if sigma is not None and sigma < run.min_noise_multiplier:
            broken.append(
                (
                    "run.min_noise_multiplier",
                    f"noise multiplier {sigma:.4g} < run.min_noise_multiplier {run.min_noise_multiplier:g}",
                )
            )
        if eps is not None and eps > run.max_epsilon:
            broken.append(
                ("run.max_epsilon", f"run epsilon {eps:g} > run.max_epsilon {run.max_epsilon:g}")
            )
        if delta is not None and delta > policy.budget.delta:
            broken.append(
                ("budget.delta", f"run delta {delta:g} > budget.delta {policy.budget.delta:g}")
            )
    if broken:
        raise _refuse(policy, broken)


def check_metrics(policy: SitePolicy, keys: Iterable[str]) -> None:
    """Refuse to let metrics ``keys`` leave the site unless ``egress.allowed_metrics`` lists them.

    Never trims: a reply holding a disallowed metric is refused as a whole.
    """
    extra = sorted(set(keys) - set(policy.egress.allowed_metrics))
    if extra:
        raise _refuse(
            policy,
            [
                (
                    "egress.allowed_metrics",
                    f"metric(s) {', '.join(extra)} may not leave the site; egress.allowed_metrics is "
                    f"[{', '.join(policy.egress.allowed_metrics)}]",
                )
            ],
        )
