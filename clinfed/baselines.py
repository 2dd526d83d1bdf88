"""Baselines beside the federated model, per site, in the same simulated run (simulation only).

Each baseline answers a hospital's question about the federated model:

* **local-only** — "would our own model have done better?" Each site trains alone, for as many
  epochs as the federation's rounds × local epochs, with DP-SGD calibrated to the site's own
  target (ε, δ), standardized with its own statistics.
* **pooled** — "what would centralizing the data buy?" One model on the union of the training
  splits, DP-SGD at the strictest site target, federation-wide standardization. **Simulation
  only**: no hospital would send its records anywhere; the report labels it so.
* **personalized** — "does fine-tuning the federated model on our data help?" A federation is
  trained and then fine-tuned at each site for ``report.personalize_epochs`` epochs, **within the
  site's one target ε**: one noise multiplier is calibrated for the federated steps *plus* the
  fine-tuning steps together; the federation runs with the ε that its own steps spend at that
  noise, and the fine-tuning's noise is then calibrated on top of the federation's actual history
  (:func:`clinfed.privacy.accountant.calibrate_noise` with ``history``), so the composition of
  both — what the personalized model has spent — is at most the target. Because the
  federated part gets less budget, this federation is a second run, not the main one.

Every model is trained by the one training loop (:func:`clinfed.client.training.train`) and
evaluated at each site by the function a hospital runs for the federated model
(:func:`clinfed.client.report.site_report`), whose output is parsed by the server's parser: the
numbers of a baseline are computed exactly as the federated model's.

Privacy: each baseline model is (ε, δ)-DP on its own, with the ε shown beside it. In a real
deployment a site would train **one** of them; the simulation trains all four on the same
records, which is fine for the public demo data and would need the budgets added up on real data.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import math
import secrets

import torch
from torch import nn

from clinfed.client.report import ReportRequest, site_report
from clinfed.client.site import SiteData, load_site_data
from clinfed.client.training import TrainSettings, train
from clinfed.config import CheckpointConfig, RunConfig, SimulationConfig, SiteConfig
from clinfed.errors import PrivacyError
from clinfed.models import create_model
from clinfed.models.scaling import FeatureStats, set_standardization
from clinfed.privacy.accountant import DPStep, calibrate_noise, epsilon_spent, planned_steps
from clinfed.server.evaluation import FinalEvaluation, SiteEvaluation, parse_site_report

__all__ = ["LOCAL_ONLY", "PERSONALIZED", "POOLED", "add_baselines"]

logger = logging.getLogger(__name__)

LOCAL_ONLY = "local-only"
POOLED = "pooled (simulation only)"
PERSONALIZED = "personalized"


def _new_model(run: RunConfig, data: SiteData) -> nn.Module:
    torch.manual_seed(run.seed)
    return create_model(
        run.model.name,
        num_features=data.num_features,
        num_classes=data.num_classes,
        hidden=list(run.model.hidden),
        dropout=run.model.dropout,
    )


def _settings(run: RunConfig, epochs: int) -> TrainSettings:
    t = run.train
    return TrainSettings(
        epochs=epochs,
        batch_size=t.batch_size,
        lr=t.lr,
        momentum=t.momentum,
        max_grad_norm=t.max_grad_norm,
    )


def _generator(site: SiteConfig, purpose: str) -> torch.Generator:
    """DP randomness: reproducible only where the simulated site fixed ``noise_seed``."""
    g = torch.Generator()
    if site.noise_seed is None:
        return g.manual_seed(secrets.randbits(63))
    digest = hashlib.sha256(f"{site.noise_seed}:{site.name}:{purpose}".encode()).digest()
    return g.manual_seed(int.from_bytes(digest[:8], "big") >> 1)


def _evaluate(
    model: nn.Module, data: SiteData, site: str, request: ReportRequest, epsilon: float
) -> SiteEvaluation:
    return dataclasses.replace(
        parse_site_report(site_report(model, data, request), site=site), epsilon=epsilon
    )


def _request(run: RunConfig) -> ReportRequest:
    r = run.report
    return ReportRequest(
        bootstrap=r.bootstrap, reliability_bins=r.reliability_bins, conformal_bins=r.conformal_bins
    )


def _train_private(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    run: RunConfig,
    epochs: int,
    target: SiteConfig,
    generator: torch.Generator,
) -> float:
    """Train ``model`` for ``epochs`` epochs within ``target``'s (ε, δ); return the ε spent."""
    if not run.train.dp:
        train(
            model,
            x,
            y,
            settings=_settings(run, epochs),
            noise_multiplier=None,
            generator=generator,
        )
        return math.inf
    p = target.privacy
    q, steps = planned_steps(
        num_records=len(y), batch_size=run.train.batch_size, epochs_per_round=epochs, rounds=1
    )
    sigma = calibrate_noise(
        target_epsilon=p.epsilon,
        target_delta=p.delta,
        sample_rate=q,
        steps=steps,
        accountant=p.accountant,
    )
    result = train(
        model,
        x,
        y,
        settings=_settings(run, epochs),
        noise_multiplier=sigma,
        generator=generator,
    )
    return epsilon_spent(
        [DPStep(noise_multiplier=sigma, sample_rate=q, steps=result.steps)],
        delta=p.delta,
        accountant=p.accountant,
    )


def _local_only(config: SimulationConfig) -> dict[str, SiteEvaluation]:
    run = config.run
    out = {}
    for site in config.sites:
        data = load_site_data(site)
        model = _new_model(run, data)
        set_standardization(model, *FeatureStats.of(data.x_train).standardization())
        eps = _train_private(
            model,
            data.x_train,
            data.y_train,
            run=run,
            epochs=run.rounds * run.train.local_epochs,
            target=site,
            generator=_generator(site, LOCAL_ONLY),
        )
        out[site.name] = _evaluate(model, data, site.name, _request(run), eps)
    return out


def _pooled(config: SimulationConfig) -> dict[str, SiteEvaluation]:
    run = config.run
    data = {s.name: load_site_data(s) for s in config.sites}
    x = torch.cat([d.x_train for d in data.values()])
    y = torch.cat([d.y_train for d in data.values()])
    # Every site's records are in the pool: the strictest site's target binds.
    strictest = min(config.sites, key=lambda s: (s.privacy.epsilon, s.privacy.delta))
    model = _new_model(run, next(iter(data.values())))
    set_standardization(model, *FeatureStats.of(x).standardization())
    eps = _train_private(
        model,
        x,
        y,
        run=run,
        epochs=run.rounds * run.train.local_epochs,
        target=strictest,
        generator=_generator(strictest, POOLED),
    )
    return {n: _evaluate(model, d, n, _request(run), eps) for n, d in data.items()}


def _personalized(config: SimulationConfig) -> dict[str, SiteEvaluation]:
    from clinfed.simulation import run_inprocess_federation  # noqa: PLC0415 - imports Flower

    run = config.run
    extra = run.report.personalize_epochs
    plans: dict[str, tuple[float, int, int, float]] = {}
    sites = []
    for site in config.sites:
        data = load_site_data(site)
        p = site.privacy
        q, fed_steps = planned_steps(
            num_records=len(data.y_train),
            batch_size=run.train.batch_size,
            epochs_per_round=run.train.local_epochs,
            rounds=run.rounds,
        )
        _, tune_steps = planned_steps(
            num_records=len(data.y_train),
            batch_size=run.train.batch_size,
            epochs_per_round=extra,
            rounds=1,
        )
        eps_fed = p.epsilon
        if run.train.dp:
            shared = calibrate_noise(
                target_epsilon=p.epsilon,
                target_delta=p.delta,
                sample_rate=q,
                steps=fed_steps + tune_steps,
                accountant=p.accountant,
            )
            eps_fed = epsilon_spent(
                [DPStep(noise_multiplier=shared, sample_rate=q, steps=fed_steps)],
                delta=p.delta,
                accountant=p.accountant,
            )
        plans[site.name] = (q, fed_steps, tune_steps, eps_fed)
        sites.append(dataclasses.replace(site, privacy=dataclasses.replace(p, epsilon=eps_fed)))
    fed_run = dataclasses.replace(
        run,
        name=f"{run.name}-personalize",
        report=dataclasses.replace(run.report, enabled=False),
        # its own short run: never the main run's checkpoint (a resumable demo has one)
        checkpoint=CheckpointConfig(),
    )
    result = run_inprocess_federation(dataclasses.replace(config, run=fed_run, sites=tuple(sites)))
    spent_fed = {s: m.epsilon for s, m in result.final("train").items()}
    out = {}
    for site in config.sites:
        data = load_site_data(site)
        q, fed_steps, tune_steps, eps_fed = plans[site.name]
        if site.name not in spent_fed:
            out[site.name] = SiteEvaluation(
                site=site.name, error="the personalization federation has no result for this site"
            )
            continue
        model = _new_model(run, data)
        model.load_state_dict(result.final_state)
        if run.scaling == "local":
            set_standardization(model, *FeatureStats.of(data.x_train).standardization())
        generator = _generator(site, PERSONALIZED)
        if not run.train.dp:
            train(
                model,
                data.x_train,
                data.y_train,
                settings=_settings(run, extra),
                noise_multiplier=None,
                generator=generator,
            )
            out[site.name] = _evaluate(model, data, site.name, _request(run), math.inf)
            continue
        p = site.privacy
        # The federation's actual history at this site: the noise the site calibrated itself.
        fed_sigma = calibrate_noise(
            target_epsilon=eps_fed,
            target_delta=p.delta,
            sample_rate=q,
            steps=fed_steps,
            accountant=p.accountant,
        )
        history = [DPStep(noise_multiplier=fed_sigma, sample_rate=q, steps=fed_steps)]
        reconstructed = epsilon_spent(history, delta=p.delta, accountant=p.accountant)
        if reconstructed < spent_fed[site.name] - 1e-9:  # never under-count what was spent
            raise PrivacyError(
                f"site {site.name}: the federation reported epsilon {spent_fed[site.name]:.6g}, "
                f"more than its planned history's {reconstructed:.6g}; refusing to fine-tune."
            )
        tune_sigma = calibrate_noise(
            target_epsilon=p.epsilon,
            target_delta=p.delta,
            sample_rate=q,
            steps=tune_steps,
            accountant=p.accountant,
            history=history,
        )
        history.append(DPStep(noise_multiplier=tune_sigma, sample_rate=q, steps=tune_steps))
        total = epsilon_spent(history, delta=p.delta, accountant=p.accountant)
        if total > p.epsilon * (1 + 1e-9):
            raise PrivacyError(
                f"site {site.name}: personalization would spend epsilon {total:.4g} in all, "
                f"above the target {p.epsilon:g} (federated part {reconstructed:.4g}). Refused."
            )
        result_tune = train(
            model,
            data.x_train,
            data.y_train,
            settings=_settings(run, extra),
            noise_multiplier=tune_sigma,
            generator=generator,
        )
        if result_tune.steps != tune_steps:  # pragma: no cover - a bug, never a user error
            raise PrivacyError(f"fine-tuning took {result_tune.steps} steps, planned {tune_steps}.")
        out[site.name] = _evaluate(model, data, site.name, _request(run), total)
    return out


def add_baselines(config: SimulationConfig, evaluation: FinalEvaluation) -> None:
    """Add the local-only, pooled and personalized models' per-site results to ``evaluation``."""
    run = config.run
    epochs = run.rounds * run.train.local_epochs
    logger.info("baselines: local-only, pooled (simulation only), personalized")
    evaluation.models[LOCAL_ONLY] = _local_only(config)
    evaluation.descriptions[LOCAL_ONLY] = (
        f"each site alone: {epochs} epochs of DP-SGD on its own training split, noise calibrated "
        "to the site's own target (ε, δ), the site's own standardization"
    )
    evaluation.models[POOLED] = _pooled(config)
    evaluation.descriptions[POOLED] = (
        f"SIMULATION ONLY — the union of every site's training split in one place (impossible in "
        f"a real federation): {epochs} epochs of DP-SGD at the strictest site target"
    )
    evaluation.models[PERSONALIZED] = _personalized(config)
    evaluation.descriptions[PERSONALIZED] = (
        f"a second federation, then {run.report.personalize_epochs} epochs of local DP-SGD "
        "fine-tuning at each site; one noise level is calibrated so that federation + "
        "fine-tuning together spend at most the site's target ε (the ε shown is that "
        "composition, RDP/PRV as the site's accountant)"
    )
