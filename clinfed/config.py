"""Configuration: YAML files + ``key=value`` overrides, parsed once into frozen dataclasses.

Two kinds of settings never mix:

* **Run settings** (:class:`RunConfig`) belong to the coordinating lab: rounds, model, strategy,
  local training hyper-parameters. They travel to the sites inside Flower messages.
* **Site settings** (:class:`SiteConfig`) belong to a hospital: where its data is, its schema and
  its privacy target. They are read on the site and never leave it.

Everything is validated here, at the edge. Below the entry points code receives typed values only.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from clinfed.errors import ConfigError

__all__ = [
    "CheckpointConfig",
    "FederationConfig",
    "ModelConfig",
    "PrivacyTarget",
    "ReportConfig",
    "RobustAggregationConfig",
    "RunConfig",
    "SecureAggregationConfig",
    "ServerDeployConfig",
    "SimulationConfig",
    "SiteConfig",
    "SiteConnectionConfig",
    "SiteDataConfig",
    "SiteGovernanceConfig",
    "StrategyConfig",
    "TrainConfig",
    "UpdateValidationConfig",
    "load_config",
    "load_run_config",
    "load_server_config",
    "load_simulation_config",
    "load_site_config",
    "to_yaml",
]

_T = TypeVar("_T")

STRATEGIES = ("fedavg", "fedprox", "fedadam", "fedyogi")
ACCOUNTANTS = ("rdp", "prv")
SCALINGS = ("federated", "local", "none")
ROBUST_METHODS = ("none", "trimmed-mean", "median")


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ConfigError(message)


@dataclass(frozen=True)
class ModelConfig:
    """Which model of the registry to train, and its options."""

    name: str = "logreg"
    hidden: list[int] = field(default_factory=lambda: [32])
    dropout: float = 0.0

    def __post_init__(self) -> None:
        _require(
            all(h > 0 for h in self.hidden),
            f"model.hidden must list positive layer widths; found {list(self.hidden)}. "
            "Use e.g. model.hidden=[32,16].",
        )
        _require(
            0.0 <= self.dropout < 1.0,
            f"model.dropout must be in [0, 1); found {self.dropout}.",
        )


@dataclass(frozen=True)
class StrategyConfig:
    """Server-side aggregation.

    ``fedavg`` (McMahan et al., 2017), ``fedprox`` (Li et al., 2020; ``proximal_mu``),
    ``fedadam`` or ``fedyogi`` (Reddi et al., 2021; ``server_lr``, ``beta_1``, ``beta_2``,
    ``tau``). Flower's FedAdam bias-corrects its server step; its FedYogi does not (as FLamby's).
    """

    name: str = "fedavg"
    proximal_mu: float = 0.01
    server_lr: float = 0.05
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3

    def __post_init__(self) -> None:
        _require(
            self.name in STRATEGIES,
            f"strategy.name must be one of {', '.join(STRATEGIES)}; found {self.name!r}.",
        )
        _require(
            self.proximal_mu >= 0, f"strategy.proximal_mu must be >= 0; found {self.proximal_mu}."
        )
        _require(self.server_lr > 0, f"strategy.server_lr must be > 0; found {self.server_lr}.")
        _require(0 <= self.beta_1 < 1, f"strategy.beta_1 must be in [0, 1); found {self.beta_1}.")
        _require(0 <= self.beta_2 < 1, f"strategy.beta_2 must be in [0, 1); found {self.beta_2}.")
        _require(self.tau > 0, f"strategy.tau must be > 0; found {self.tau}.")


@dataclass(frozen=True)
class TrainConfig:
    """Local training at each site, per round.

    ``batch_size`` is the *expected* batch size of Poisson sampling: each record joins a step's
    batch independently with probability ``batch_size / n_train``. ``max_grad_norm`` is the
    per-record clipping bound of DP-SGD (the sensitivity of one step). ``local_steps > 0``
    replaces ``local_epochs``: every site takes that many Poisson-sampled steps per round,
    whatever its size (FLamby's "100 local updates"); 0 = ``local_epochs`` epochs.
    """

    local_epochs: int = 1
    local_steps: int = 0
    batch_size: int = 32
    lr: float = 0.1
    momentum: float = 0.0
    max_grad_norm: float = 1.0
    dp: bool = True

    def __post_init__(self) -> None:
        _require(
            self.local_epochs >= 1, f"train.local_epochs must be >= 1; found {self.local_epochs}."
        )
        _require(
            self.local_steps >= 0,
            f"train.local_steps must be >= 0 (0 = use local_epochs); found {self.local_steps}.",
        )
        _require(self.batch_size >= 1, f"train.batch_size must be >= 1; found {self.batch_size}.")
        _require(self.lr > 0, f"train.lr must be > 0; found {self.lr}.")
        _require(
            0 <= self.momentum < 1, f"train.momentum must be in [0, 1); found {self.momentum}."
        )
        _require(
            self.max_grad_norm > 0,
            f"train.max_grad_norm must be > 0 (it bounds each record's influence); "
            f"found {self.max_grad_norm}.",
        )


@dataclass(frozen=True)
class SecureAggregationConfig:
    """Secure aggregation (on by default): the server learns only the sum of the sites' updates.

    ``mode``: ``pairwise`` (one message exchange per round; the server must honour the round
    deadline) or ``double`` (adds per-round self-masks: two exchanges, safe against a server that
    lies about who dropped). ``bits``: masked values live in Z_2^bits (32 = a float32 model's
    size). ``clip_range``: every weighted update value must lie in [-r, r]; values outside are
    clipped *and counted*. ``on_out_of_range``: ``count`` (report the round's total) or
    ``fail-round`` (abort the round, keep the model). ``threshold``: least number of sites whose
    sum may be learned (0 = a majority of the round's sites, at least 2). ``on_abort``:
    ``continue`` with the next round or ``stop`` the run when a round is aborted.
    """

    enabled: bool = True
    mode: str = "pairwise"
    bits: int = 32
    clip_range: float = 1.0
    max_sites: int = 30
    threshold: int = 0
    on_out_of_range: str = "count"
    on_abort: str = "continue"

    def __post_init__(self) -> None:
        _require(
            self.mode in ("pairwise", "double"),
            f"secure_aggregation.mode must be pairwise or double; found {self.mode!r}.",
        )
        _require(
            8 <= self.bits <= 64, f"secure_aggregation.bits must be in 8..64; found {self.bits}."
        )
        _require(
            self.clip_range > 0 and math.isfinite(self.clip_range),
            f"secure_aggregation.clip_range must be a finite number > 0; found {self.clip_range}.",
        )
        _require(
            2 <= self.max_sites <= 65535,
            f"secure_aggregation.max_sites must be in 2..65535; found {self.max_sites}.",
        )
        _require(
            self.threshold == 0 or 2 <= self.threshold <= self.max_sites,
            f"secure_aggregation.threshold must be 0 (majority) or in 2..max_sites; found {self.threshold}.",
        )
        _require(
            self.on_out_of_range in ("count", "fail-round"),
            f"secure_aggregation.on_out_of_range must be count or fail-round; found {self.on_out_of_range!r}.",
        )
        _require(
            self.on_abort in ("continue", "stop"),
            f"secure_aggregation.on_abort must be continue or stop; found {self.on_abort!r}.",
        )


@dataclass(frozen=True)
class CheckpointConfig:
    """Checkpoint and resume (server side).

    With ``dir`` set, the server writes the run's state atomically after every round to
    ``dir/run_id/checkpoint.pt`` (global model, strategy state such as FedAdam's moments, round,
    per-site metrics and events, reported privacy spend); starting again with the same ``run_id``
    resumes at the next round. ``run_id`` names the run across server restarts (letters, digits,
    ``-``, ``_``, ``.``); sites key their privacy ledger on it.
    """

    dir: str = ""
    run_id: str = ""

    def __post_init__(self) -> None:
        if not self.dir:
            _require(
                not self.run_id,
                f"checkpoint.run_id ({self.run_id!r}) needs checkpoint.dir; set both "
                "(e.g. checkpoint.dir=checkpoints checkpoint.run_id=study-2026-11) or neither.",
            )
            return
        _require(
            bool(self.run_id)
            and len(self.run_id) <= 100
            and all(c.isalnum() or c in "-_." for c in self.run_id)
            and not self.run_id.startswith("."),
            f"checkpoint.run_id must be 1-100 letters, digits, '-', '_' or '.' (not starting with "
            f"'.') when checkpoint.dir is set; found {self.run_id!r}. Use e.g. "
            "checkpoint.run_id=study-2026-11.",
        )


@dataclass(frozen=True)
class UpdateValidationConfig:
    """Checks on every site's update before aggregation (and by each site before it sends).

    ``max_update_norm`` bounds the L2 norm of a site's update (its trained model minus the global
    model it received): a sanity bound, far above what DP-SGD's clipped, noised steps produce,
    that catches a diverged or malicious update. DP noise grows with the square root of the
    number of parameters (a 100k-parameter MLP's honest update is ~150, a 1M one's a few
    hundred), so the default, 1e4, suits models up to ~10M parameters; tighten it for small
    models (a logistic regression's update is ~1). With secure aggregation the server cannot see
    one update, so each site checks its own before masking and refuses to send it.
    """

    max_update_norm: float = 1e4

    def __post_init__(self) -> None:
        _require(
            self.max_update_norm > 0 and math.isfinite(self.max_update_norm),
            f"validation.max_update_norm must be a finite number > 0; found {self.max_update_norm}.",
        )


@dataclass(frozen=True)
class RobustAggregationConfig:
    """Optional Byzantine-robust aggregation of the sites' updates (plain mode only).

    ``method``: ``none`` (the strategy's weighted mean), ``trimmed-mean`` (coordinate-wise, drops
    the ``trim_fraction`` largest and smallest values of each coordinate; Yin et al., ICML 2018)
    or ``median`` (coordinate-wise). Both need every site's individual update, which secure
    aggregation hides by design: combining them is refused.
    """

    method: str = "none"
    trim_fraction: float = 0.2

    def __post_init__(self) -> None:
        _require(
            self.method in ROBUST_METHODS,
            f"robust_aggregation.method must be one of {', '.join(ROBUST_METHODS)}; "
            f"found {self.method!r}.",
        )
        _require(
            0 <= self.trim_fraction < 0.5,
            f"robust_aggregation.trim_fraction must be in [0, 0.5); found {self.trim_fraction}.",
        )


@dataclass(frozen=True)
class ReportConfig:
    """The end-of-run report (``report.html`` beside the raw results).

    After the last round every site evaluates the final model on its own splits and sends only
    aggregates: ``bootstrap`` resamples for 95 % intervals, a ``reliability_bins`` reliability
    diagram, and its calibration scores' counts on a ``conformal_bins`` grid, from which the
    server sets the conformal threshold at risk level ``alpha``: one for the whole federation
    (``conformal_scope: federation``, a guarantee for the pooled population) or, with ``site``,
    at each site the larger of that and the site's own quantile (a guarantee at every site that
    holds enough calibration records, at the price of more abstention). ``baselines`` (simulation only)
    adds local-only, pooled and personalized models, the last fine-tuned for
    ``personalize_epochs`` epochs within the site's own ε (see README, "The report").
    """

    enabled: bool = True
    alpha: float = 0.1
    bootstrap: int = 1000
    reliability_bins: int = 10
    conformal_bins: int = 50
    conformal_scope: str = "federation"
    baselines: bool = True
    personalize_epochs: int = 2

    def __post_init__(self) -> None:
        _require(
            0 < self.alpha < 1, f"report.alpha must be in (0, 1); found {self.alpha}. Use e.g. 0.1."
        )
        _require(
            100 <= self.bootstrap <= 10_000,
            f"report.bootstrap must be in 100..10000 resamples; found {self.bootstrap}.",
        )
        _require(
            1 <= self.reliability_bins <= 20,
            f"report.reliability_bins must be in 1..20; found {self.reliability_bins}.",
        )
        _require(
            2 <= self.conformal_bins <= 100,
            f"report.conformal_bins must be in 2..100 (sites refuse finer grids); found "
            f"{self.conformal_bins}.",
        )
        _require(
            self.conformal_scope in ("federation", "site"),
            f"report.conformal_scope must be federation or site; found {self.conformal_scope!r}.",
        )
        _require(
            self.personalize_epochs >= 1,
            f"report.personalize_epochs must be >= 1; found {self.personalize_epochs}.",
        )


@dataclass(frozen=True)
class RunConfig:
    """What the coordinating lab asks of a federation (sent to the sites)."""

    name: str = "demo"
    rounds: int = 10
    seed: int = 0
    min_sites: int = 2
    expected_sites: int = 0
    round_timeout_s: float = 300.0
    scaling: str = "federated"
    output_dir: str = "results"
    on_site_refusal: str = "continue"
    model: ModelConfig = field(default_factory=ModelConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    secure_aggregation: SecureAggregationConfig = field(default_factory=SecureAggregationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    validation: UpdateValidationConfig = field(default_factory=UpdateValidationConfig)
    robust_aggregation: RobustAggregationConfig = field(default_factory=RobustAggregationConfig)
    report: ReportConfig = field(default_factory=ReportConfig)

    def __post_init__(self) -> None:
        _require(
            self.robust_aggregation.method == "none" or not self.secure_aggregation.enabled,
            f"robust_aggregation.method={self.robust_aggregation.method} needs every site's own "
            "update, which secure aggregation hides from the server; it cannot be combined with "
            "secure aggregation. Use robust_aggregation.method=none, or turn secure aggregation "
            "off explicitly (secure_aggregation.enabled=false) if the sites agree.",
        )
        _require(self.rounds >= 1, f"rounds must be >= 1; found {self.rounds}. Use e.g. rounds=10.")
        _require(self.min_sites >= 1, f"min_sites must be >= 1; found {self.min_sites}.")
        _require(
            self.expected_sites == 0 or self.expected_sites >= self.min_sites,
            f"expected_sites must be 0 (wait for min_sites) or >= min_sites ({self.min_sites}); "
            f"found {self.expected_sites}.",
        )
        _require(
            self.round_timeout_s > 0 and math.isfinite(self.round_timeout_s),
            f"round_timeout_s must be > 0 seconds; found {self.round_timeout_s}.",
        )
        _require(
            self.scaling in SCALINGS,
            f"scaling must be one of {', '.join(SCALINGS)}; found {self.scaling!r}.",
        )
        _require(bool(self.name.strip()), "name must not be empty.")
        _require(
            self.on_site_refusal in ("continue", "stop"),
            f"on_site_refusal must be continue or stop; found {self.on_site_refusal!r}.",
        )


@dataclass(frozen=True)
class PrivacyTarget:
    """A site's (ε, δ) target for one run: the whole run, all rounds, must stay within it.

    The unit of privacy is one patient record of this site's training split. ``required``
    (default true) makes the site refuse any request to train without differential privacy.
    """

    epsilon: float = 1.0
    delta: float = 1e-5
    accountant: str = "rdp"
    required: bool = True

    def __post_init__(self) -> None:
        _require(
            self.epsilon > 0,
            f"privacy.epsilon must be > 0; found {self.epsilon}. Typical clinical targets are 0.5-8.",
        )
        _require(
            0 < self.delta < 1,
            f"privacy.delta must be in (0, 1); found {self.delta}. "
            "Use a value well below 1/n, e.g. 1e-5.",
        )
        _require(
            self.accountant in ACCOUNTANTS,
            f"privacy.accountant must be one of {', '.join(ACCOUNTANTS)}; found {self.accountant!r}.",
        )


@dataclass(frozen=True)
class SiteDataConfig:
    """Where a site's data is and how it is split (held-out test split for evaluation)."""

    path: str = "???"
    schema: str = "???"
    test_fraction: float = 0.34
    split_seed: int = 43
    calibration_fraction: float = 0.0
    """Share of the training split held out, before any training, for conformal calibration."""

    def __post_init__(self) -> None:
        _require(
            0 < self.test_fraction < 1,
            f"data.test_fraction must be in (0, 1); found {self.test_fraction}.",
        )
        _require(
            0 <= self.calibration_fraction < 1,
            f"data.calibration_fraction must be in [0, 1); found {self.calibration_fraction}. "
            "Use e.g. 0.2 (0 = no conformal calibration at this site).",
        )


@dataclass(frozen=True)
class SiteConnectionConfig:
    """How a deployed site reaches the federation server (sites dial out; nothing dials in).

    ``superlink`` is ``host:port`` of the server; ``root_certificates`` the federation CA that
    signed the server's TLS certificate; ``auth_private_key`` the site's own OpenSSH private key
    (its public half is registered at the server). ``insecure`` (plaintext, no authentication)
    exists for local development only. After a lost connection the site reconnects with
    Flower's exponential backoff (capped delay); ``reconnect_max_retries`` /
    ``reconnect_max_wait_s`` (``--max-retries`` / ``--max-wait-time``) make it give up, 0 = never.
    """

    superlink: str = ""
    root_certificates: str = ""
    auth_private_key: str = ""
    insecure: bool = False
    runtime_port: int = 9094
    reconnect_max_retries: int = 0
    reconnect_max_wait_s: float = 0.0

    def __post_init__(self) -> None:
        _require(
            1 <= self.runtime_port <= 65535,
            f"connection.runtime_port must be a TCP port; found {self.runtime_port}.",
        )
        _require(
            self.reconnect_max_retries >= 0,
            "connection.reconnect_max_retries must be >= 0 (0: retry forever); "
            f"found {self.reconnect_max_retries}.",
        )
        _require(
            self.reconnect_max_wait_s >= 0 and math.isfinite(self.reconnect_max_wait_s),
            "connection.reconnect_max_wait_s must be a finite number >= 0 (0: no limit); "
            f"found {self.reconnect_max_wait_s}.",
        )


@dataclass(frozen=True)
class SiteGovernanceConfig:
    """The hospital's controls: its policy file, its privacy ledger and its audit log.

    All three live on the site and never leave it. With a ``policy``, every request is checked
    against it, every DP spend is written to the ``ledger`` before the update leaves, and every
    request and decision goes to the ``audit_log``. A deployed site must have all three.
    """

    policy: str = ""
    ledger: str = ""
    audit_log: str = ""

    def __post_init__(self) -> None:
        if self.policy:
            _require(
                bool(self.ledger) and bool(self.audit_log),
                "governance.ledger and governance.audit_log are required with a governance.policy "
                "(e.g. /var/lib/clinfed/ledger.jsonl and /var/lib/clinfed/audit.jsonl).",
            )


@dataclass(frozen=True)
class SiteConfig:
    """A hospital's own settings; read on the site, never sent anywhere.

    ``noise_seed`` seeds the site's DP randomness (Poisson sampling and Gaussian noise). Leave it
    unset in production: the seed is then drawn from the operating system and nobody, not even
    the coordinating lab, can predict (and so subtract) the noise. Fix it only for reproducible
    simulations.
    """

    name: str = "???"
    data: SiteDataConfig = field(default_factory=SiteDataConfig)
    privacy: PrivacyTarget = field(default_factory=PrivacyTarget)
    noise_seed: int | None = None
    torch_threads: int = 1
    connection: SiteConnectionConfig = field(default_factory=SiteConnectionConfig)
    approved_apps: list[str] = field(default_factory=list)
    governance: SiteGovernanceConfig = field(default_factory=SiteGovernanceConfig)

    def __post_init__(self) -> None:
        for digest in self.approved_apps:
            _require(
                len(digest) == 64 and all(c in "0123456789abcdef" for c in digest),
                f"approved_apps entries must be 64-character lowercase SHA-256 app hashes "
                f"(from `clinfed app-hash`); found {digest!r}.",
            )
        _require(
            bool(self.name.strip()) and self.name.replace("-", "").replace("_", "").isalnum(),
            f"site name must be letters, digits, '-' or '_'; found {self.name!r}.",
        )
        _require(
            self.torch_threads >= 1, f"torch_threads must be >= 1; found {self.torch_threads}."
        )


@dataclass(frozen=True)
class ServerDeployConfig:
    """The coordinating lab's SuperLink: where it listens, its TLS material, its state.

    TLS and site authentication are on unless ``insecure`` (local development only).
    """

    host: str = "0.0.0.0"  # noqa: S104 - the server must be reachable by the sites
    port: int = 9093
    certificate: str = ""
    private_key: str = ""
    ca_certificate: str = ""
    database: str = "state/superlink.db"
    insecure: bool = False

    def __post_init__(self) -> None:
        _require(1 <= self.port <= 65535, f"port must be a TCP port; found {self.port}.")
        if not self.insecure:
            for key in ("certificate", "private_key", "ca_certificate"):
                _require(
                    bool(getattr(self, key)),
                    f"{key} is required (TLS is on by default); create it with `clinfed pki init` "
                    "or set insecure: true for local development only.",
                )


def load_server_config(path: str | Path, overrides: Sequence[str] = ()) -> ServerDeployConfig:
    """The server's deployment config; relative paths resolve against the file's folder."""
    server = load_config(ServerDeployConfig, path, overrides)
    base = Path(path).resolve().parent

    def resolved(value: str) -> str:
        return _resolve(value, base) if value else ""

    return dataclasses.replace(
        server,
        certificate=resolved(server.certificate),
        private_key=resolved(server.private_key),
        ca_certificate=resolved(server.ca_certificate),
        database=resolved(server.database),
    )


@dataclass(frozen=True)
class FederationConfig:
    """The simulated federation: which site configs take part and how they run."""

    sites: list[str] = field(
        default_factory=lambda: ["sites/paris.yaml", "sites/nantes.yaml", "sites/berlin.yaml"]
    )
    epsilon: float | None = None
    calibration_fraction: float | None = None
    cpus_per_site: float = 1.0
    fresh_site_state: bool = True

    def __post_init__(self) -> None:
        _require(len(self.sites) >= 1, "federation.sites must list at least one site config.")
        _require(
            self.epsilon is None or self.epsilon > 0,
            f"federation.epsilon must be > 0 when set; found {self.epsilon}.",
        )
        _require(
            self.calibration_fraction is None or 0 <= self.calibration_fraction < 1,
            f"federation.calibration_fraction must be in [0, 1) when set; found "
            f"{self.calibration_fraction}.",
        )
        _require(
            self.cpus_per_site > 0,
            f"federation.cpus_per_site must be > 0; found {self.cpus_per_site}.",
        )


@dataclass(frozen=True)
class SimulationConfig:
    """A local simulated federation: run settings plus the simulated sites' own configs."""

    run: RunConfig
    sites: tuple[SiteConfig, ...]
    federation: FederationConfig


# ----------------------------------------------------------------------------- loading


def _merge(schema: type[_T], sources: Sequence[Any], where: str) -> _T:
    """Merge ``sources`` into the structured ``schema`` and build the frozen dataclass."""
    try:
        merged = OmegaConf.merge(OmegaConf.structured(schema), *sources)
        obj = OmegaConf.to_object(merged)
    except ConfigError as error:
        raise ConfigError(f"{where}: {error}") from None
    except OmegaConfBaseException as error:
        raise ConfigError(f"{where}: {_describe_omegaconf_error(error)}") from None
    except TypeError as error:  # OmegaConf: a mapping where a list is expected, or the reverse
        first = str(error).splitlines()[0]
        raise ConfigError(f"{where}: a value has the wrong shape ({first}).") from None
    if not isinstance(obj, schema):  # pragma: no cover - OmegaConf guarantees the type
        raise ConfigError(f"{where}: expected a {schema.__name__} mapping.")
    return obj


def _describe_omegaconf_error(error: OmegaConfBaseException) -> str:
    key = getattr(error, "full_key", None) or getattr(error, "key", None)
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    if "issing mandatory value" in text:
        return f"required key {key!r} is not set. Add it to the config file."
    if "Key '" in text and "not in" in text:
        return f"unknown key {key!r}. Check its spelling against the configuration reference in README.md."
    if key:
        return f"invalid value for {key!r}: {text}"
    return text


def _read_yaml(path: Path) -> Any:
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist. Check the path.")
    try:
        loaded = OmegaConf.load(path)
    except Exception as error:  # noqa: BLE001 - any parse failure of a user file is a user error
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(f"config file {path} is not valid YAML: {first}") from None
    if loaded is None or not OmegaConf.is_dict(loaded):
        raise ConfigError(f"config file {path} must hold a mapping of keys to values.")
    return loaded


def _dotlist(overrides: Sequence[str]) -> Any:
    for item in overrides:
        if "=" not in item or item.startswith("="):
            raise ConfigError(
                f"command-line override {item!r} must look like key=value, e.g. rounds=5."
            )
    try:
        return OmegaConf.from_dotlist(list(overrides))
    except OmegaConfBaseException as error:
        raise ConfigError(f"command-line overrides: {_describe_omegaconf_error(error)}") from None
    except yaml.YAMLError as error:  # a value YAML cannot read, e.g. a control character
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        raise ConfigError(
            f"command-line overrides: a value is not valid YAML ({first}); quote it or remove "
            "control characters."
        ) from None


def load_config(schema: type[_T], path: str | Path | None, overrides: Sequence[str] = ()) -> _T:
    """Load ``path`` (optional) merged with ``key=value`` ``overrides`` into ``schema``."""
    sources: list[Any] = []
    where = "config"
    if path is not None:
        sources.append(_read_yaml(Path(path)))
        where = str(path)
    if overrides:
        sources.append(_dotlist(overrides))
    return _merge(schema, sources, where)


def load_run_config(path: str | Path | None, overrides: Sequence[str] = ()) -> RunConfig:
    """The coordinating lab's run settings."""
    return load_config(RunConfig, path, overrides)


def _resolve(path_text: str, base: Path) -> str:
    path = Path(path_text).expanduser()
    return str(path if path.is_absolute() else (base / path).resolve())


def load_site_config(path: str | Path, overrides: Sequence[str] = ()) -> SiteConfig:
    """A hospital's site config; relative data/schema paths resolve against the file's folder."""
    site = load_config(SiteConfig, path, overrides)
    base = Path(path).resolve().parent
    data = dataclasses.replace(
        site.data,
        path=_resolve(site.data.path, base),
        schema=_resolve(site.data.schema, base),
    )
    c = site.connection
    connection = dataclasses.replace(
        c,
        root_certificates=_resolve(c.root_certificates, base) if c.root_certificates else "",
        auth_private_key=_resolve(c.auth_private_key, base) if c.auth_private_key else "",
    )
    g = site.governance
    governance = dataclasses.replace(
        g,
        **{
            k: _resolve(getattr(g, k), base)
            for k in ("policy", "ledger", "audit_log")
            if getattr(g, k)
        },
    )
    return dataclasses.replace(site, data=data, connection=connection, governance=governance)


def load_simulation_config(path: str | Path, overrides: Sequence[str] = ()) -> SimulationConfig:
    """A simulated federation: run keys at the top level, simulated sites under ``federation``.

    Overrides use the same keys, e.g. ``rounds=5``, ``strategy.name=fedadam`` or
    ``federation.epsilon=0.3`` (the last one sets every simulated site's target ε; it exists in
    simulation only — a real site's target is its own).
    """
    raw = _read_yaml(Path(path))
    cli = _dotlist(overrides) if overrides else OmegaConf.create({})
    fed_raw = [raw.get("federation", {}), cli.get("federation", {})]
    run_raw = [
        OmegaConf.masked_copy(c, [str(k) for k in c if k != "federation"]) for c in (raw, cli)
    ]
    run = _merge(RunConfig, run_raw, str(path))
    federation = _merge(FederationConfig, fed_raw, f"{path} (federation)")
    base = Path(path).resolve().parent
    sites = []
    for site_path in federation.sites:
        site = load_site_config(_resolve(site_path, base))
        if federation.epsilon is not None:
            site = dataclasses.replace(
                site, privacy=dataclasses.replace(site.privacy, epsilon=federation.epsilon)
            )
        if federation.calibration_fraction is not None:
            site = dataclasses.replace(
                site,
                data=dataclasses.replace(
                    site.data, calibration_fraction=federation.calibration_fraction
                ),
            )
        sites.append(site)
    names = [s.name for s in sites]
    if len(set(names)) != len(names):
        raise ConfigError(f"{path}: site names must be unique; found {names}.")
    if federation.fresh_site_state:
        # Each simulated run gets new site ledgers and audit logs (under the output folder), so
        # that repeated demo runs do not spend the demo sites' budgets; a real site's persist.
        # A resumable run (checkpoint.run_id) keeps its site state across restarts: the sites
        # restore their DP history from these ledgers when the server resumes the run.
        stamp = run.checkpoint.run_id or datetime.now(UTC).strftime("%Y%m%d-%H%M%S-%f")
        root = Path(run.output_dir).resolve() / "site-state" / f"{run.name}-{stamp}"
        sites = [
            dataclasses.replace(
                s,
                governance=dataclasses.replace(
                    s.governance,
                    ledger=str(root / s.name / "ledger.jsonl"),
                    audit_log=str(root / s.name / "audit.jsonl"),
                ),
            )
            if s.governance.policy
            else s
            for s in sites
        ]
    for key, value in (("min_sites", run.min_sites), ("expected_sites", run.expected_sites)):
        if value > len(sites):
            raise ConfigError(
                f"{key} is {value} but the simulation has only {len(sites)} site(s) under "
                f"federation.sites. Lower {key} or list more sites."
            )
    if run.expected_sites == 0:
        # Every simulated site is started with the run: discovery waits for all of them (Flower's
        # engine registers the nodes one by one while the ServerApp is already running).
        run = dataclasses.replace(run, expected_sites=len(sites))
    return SimulationConfig(run=run, sites=tuple(sites), federation=federation)


def to_yaml(obj: Any) -> str:
    """The resolved config as YAML (for the results folder)."""
    return OmegaConf.to_yaml(OmegaConf.structured(obj))
