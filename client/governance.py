"""The hospital's controls around every request: policy, privacy ledger, audit log.

:class:`Governance` is opened per request from the site's own config (Flower may start a fresh
process for every message, so nothing is kept in memory between requests): the policy is read
and validated, the ledger and the audit log are opened and their chains verified. Without a
``governance.policy`` in the site config (simulations that do not set one) every method is a
no-op except the audit, which then also does nothing.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping

import clinfed
from clinfed.client.audit import AuditLog
from clinfed.client.policy import (
    PolicyRequest,
    SitePolicy,
    check_metrics,
    check_request,
    load_site_policy,
)
from clinfed.client.site import RoundPlan, RoundRequest
from clinfed.config import SiteConfig
from clinfed.errors import PrivacyError
from clinfed.privacy.accountant import DPStep
from clinfed.privacy.ledger import PrivacyLedger

__all__ = ["APP_HASH_ENV", "Governance", "app_identity"]

APP_HASH_ENV = "CLINFED_APP_HASH"
"""Set by the site's launcher (``clinfed-clientapp``) to the SHA-256 of the approved app bundle."""


def app_identity() -> str:
    """The running app's identity for the audit log.

    Its verified bundle hash when launched by the site's approval-checking launcher, else the
    clinfed version (simulation, tests).
    """
    digest = os.environ.get(APP_HASH_ENV, "")
    return f"fab:{digest}" if digest else f"clinfed {clinfed.__version__} (not launched as a FAB)"


logger = logging.getLogger(__name__)


class Governance:
    """The site's policy, ledger and audit log for one request."""

    def __init__(self, site: SiteConfig) -> None:
        self.site = site
        g = site.governance
        self.policy: SitePolicy | None = load_site_policy(g.policy) if g.policy else None
        if self.policy is not None and self.policy.budget.accountant != site.privacy.accountant:
            raise PrivacyError(
                f"site {site.name}: privacy.accountant ({site.privacy.accountant}) differs from the "
                f"policy's budget.accountant ({self.policy.budget.accountant}); use the same one."
            )
        self._ledger_path = g.ledger
        self._audit_path = g.audit_log

    @property
    def enabled(self) -> bool:
        return self.policy is not None

    def audit(self, **event: str | int | float | bool) -> None:
        """Append one entry to the audit log (durable before returning)."""
        if not self._audit_path:
            return
        log = AuditLog.open(self._audit_path)
        try:
            log.append({"site": self.site.name, "app": app_identity(), **event})
        finally:
            log.close()

    def _ledger(self) -> PrivacyLedger:
        return PrivacyLedger.open(self._ledger_path, create=True)

    def check_training(
        self,
        *,
        run_id: str,
        request: RoundRequest,
        plan: RoundPlan,
        model: str,
        secure_aggregation: bool,
        metric_keys: Iterable[str],
        fresh_state: bool,
    ) -> None:
        """Refuse, before training, what the policy or the remaining budget does not allow."""
        policy = self.policy
        if policy is None:
            return
        s = request.settings
        dp = plan.step is not None
        check_request(
            policy,
            PolicyRequest(
                model=model,
                rounds=request.num_rounds,
                local_epochs=s.epochs,
                local_steps=s.local_steps,
                batch_size=s.batch_size,
                max_grad_norm=s.max_grad_norm,
                dp=dp,
                secure_aggregation=secure_aggregation,
                run_epsilon=self.site.privacy.epsilon if dp else None,
                delta=self.site.privacy.delta if dp else None,
                noise_multiplier=plan.step.noise_multiplier if plan.step else None,
            ),
        )
        check_metrics(policy, metric_keys)
        with self._ledger() as ledger:
            if fresh_state and ledger.history(run_id):
                raise PrivacyError(
                    f"site {self.site.name} lost its state in the middle of run {run_id} (the ledger "
                    "has rounds the site no longer remembers); start a new run."
                )
            if plan.step is not None:
                remaining = request.num_rounds - request.server_round + 1
                ledger.check_budget(
                    planned=[plan.step] * remaining,
                    run_id=run_id,
                    total_epsilon=policy.budget.epsilon,
                    total_delta=policy.budget.delta,
                    accountant=policy.budget.accountant,
                    max_run_epsilon=policy.run.max_epsilon,
                )

    def run_history(self, run_id: str) -> list[DPStep | None] | None:
        """The rounds recorded for ``run_id``, in ledger order; ``None`` without a ledger.

        A ``None`` step is a round trained without DP.
        """
        if self.policy is None:
            return None
        with self._ledger() as ledger:
            return [r.step for r in ledger.records() if r.run_id == run_id]

    def record_spend(
        self, *, run_id: str, server_round: int, plan: RoundPlan
    ) -> Mapping[str, float]:
        """Write the round's spend durably — call it after training, before the update leaves."""
        policy = self.policy
        if policy is None:
            return {}
        with self._ledger() as ledger:
            if any(r.run_id == run_id and r.server_round == server_round for r in ledger.records()):
                # The server re-ran a round after a restart: a new release, so a new charge.
                logger.warning(
                    "round %d of run %s is charged a second time: the server ran it again "
                    "(after a restart); both releases count",
                    server_round,
                    run_id,
                )
            if plan.step is None:
                ledger.record_non_private(run_id=run_id, server_round=server_round)
            else:
                ledger.record(
                    run_id=run_id,
                    server_round=server_round,
                    step=plan.step,
                    delta=policy.budget.delta,
                    accountant=policy.budget.accountant,
                    total_epsilon=policy.budget.epsilon,
                    max_run_epsilon=policy.run.max_epsilon,
                )
            b = policy.budget
            return {
                "epsilon_run": ledger.spent(delta=b.delta, accountant=b.accountant, run_id=run_id),
                "epsilon_total": ledger.spent(delta=b.delta, accountant=b.accountant),
            }

    def check_metrics(self, keys: Iterable[str]) -> None:
        """Refuse a reply carrying a metric the policy does not let out."""
        if self.policy is not None:
            check_metrics(self.policy, keys)
