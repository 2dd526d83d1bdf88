"""The privacy ledger: every DP-SGD spend of a site's dataset, across all runs, written ahead.

A site's (ε, δ) target bounds one run; the dataset lives longer than any run. The ledger keeps the
``(σ, q, steps)`` of every round that ever trained on the dataset, so that the ε of **all runs
composed** (with the same accountant as one run: RDP or PRV, :mod:`clinfed.privacy.accountant`)
can be checked against the budget in the site's policy (:mod:`clinfed.client.policy`) before any
training starts. The unit of privacy is one patient record of the site's training data.

**Write-ahead rule.** A round's spend is recorded with :meth:`PrivacyLedger.record`, which
returns only once the record is on disk (file and, at creation, directory fsync'd); the caller
lets the update leave the site only after that. So a crash at any point either leaves the spend
recorded, or happens before the update could leave: the ledger may over-count (a recorded round
whose update was never sent), never under-count.

**Why JSON lines and not SQLite.** Each record is one line appended to a file that is never
rewritten: the operating system can enforce that (``chattr +a``), hospital IT can read it with any
tool and back it up by copying, and a hash chain (:mod:`clinfed._journal`) shows an edited,
deleted, inserted or reordered record. SQLite with ``synchronous=FULL`` would be as durable, but
rewrites pages in place, cannot run on an append-only file and hides the records behind a binary
format. The only crash artefact an append can leave, an incomplete last line, is recognised
exactly (no final newline), and moved aside: by the write-ahead rule its update never left.

**Never a silent reset.** :meth:`PrivacyLedger.open` refuses a missing ledger unless asked to
create one, and a damaged one (bad checksum or broken chain anywhere) raises
:class:`~clinfed.errors.PrivacyError`: an unreadable history must stop training, not restart the
budget at zero. A round trained without DP (only where the policy allows it) is recorded too, and
makes every later ε infinite.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from clinfed._journal import TORN_TAIL_KIND, Entry, Journal, JournalDamagedError, JournalScan
from clinfed.errors import PrivacyError
from clinfed.privacy.accountant import DPStep, epsilon_spent

__all__ = [
    "BudgetCheck",
    "BudgetExceeded",
    "LedgerRecord",
    "LedgerSummary",
    "PrivacyLedger",
    "RoundSpend",
    "RunSpend",
]

logger = logging.getLogger(__name__)

_FORMAT: Final = "clinfed-privacy-ledger/1"
_CREATED: Final = "created"
_DP_SGD: Final = "dp-sgd"
_NON_PRIVATE: Final = "non-private"
_ACCOUNTANTS: Final = ("rdp", "prv")
_TOLERANCE: Final = 1e-9
"""Relative slack for ε comparisons: the same history summed in another order differs in ulps."""


class BudgetExceeded(PrivacyError):  # noqa: N818 - reads as the event it reports
    """A planned or recorded spend would exceed the dataset's budget or the per-run maximum."""


@dataclass(frozen=True, kw_only=True)
class LedgerRecord:
    """One round that trained on the dataset. ``step is None``: trained WITHOUT DP."""

    seq: int
    run_id: str
    server_round: int
    step: DPStep | None
    recorded_at: str


@dataclass(frozen=True, kw_only=True)
class BudgetCheck:
    """ε of the dataset (all runs) and of one run, before and after a plan, at one δ."""

    spent_total: float
    after_total: float
    spent_run: float
    after_run: float


@dataclass(frozen=True, kw_only=True)
class RoundSpend:
    """One ledger record with the cumulative ε after it (of its run, and of the dataset)."""

    server_round: int
    steps: int
    noise_multiplier: float | None
    sample_rate: float | None
    run_epsilon: float
    total_epsilon: float
    recorded_at: str


@dataclass(frozen=True, kw_only=True)
class RunSpend:
    """Every record of one run, in ledger order, and the run's ε."""

    run_id: str
    epsilon: float
    rounds: tuple[RoundSpend, ...]


@dataclass(frozen=True, kw_only=True)
class LedgerSummary:
    """What a ledger holds: ε spent over all runs, what remains of the budget, per run and round."""

    path: str
    delta: float
    accountant: str
    spent: float
    budget: float | None
    runs: tuple[RunSpend, ...]

    @property
    def remaining(self) -> float | None:
        """``budget - spent`` (never below 0), or ``None`` without a budget."""
        return None if self.budget is None else max(0.0, self.budget - self.spent)

    def as_text(self) -> str:
        """A table for hospital IT: one line per run and per round."""
        head = f"privacy ledger {self.path}: epsilon spent {self.spent:.4g}"
        if self.budget is not None:
            head += f" of {self.budget:g} (remaining {self.remaining:.4g})"
        lines = [f"{head} at delta {self.delta:g} ({self.accountant}), {len(self.runs)} run(s)"]
        for run in self.runs:
            lines.append(
                f"  run {run.run_id}: epsilon {run.epsilon:.4g}, {len(run.rounds)} round(s)"
            )
            for r in run.rounds:
                noise = "NO DP" if r.noise_multiplier is None else f"sigma {r.noise_multiplier:.4g}"
                rate = "" if r.sample_rate is None else f", q {r.sample_rate:.4g}"
                lines.append(
                    f"    round {r.server_round:>4}: {r.steps:>5} steps, {noise}{rate}; "
                    f"run epsilon {r.run_epsilon:.4g}, dataset epsilon {r.total_epsilon:.4g} "
                    f"({r.recorded_at})"
                )
        return "\n".join(lines)


def _epsilon(history: Sequence[DPStep | None], *, delta: float, accountant: str) -> float:
    if any(step is None for step in history):
        return math.inf
    return epsilon_spent([s for s in history if s is not None], delta=delta, accountant=accountant)


def _check_accounting(*, delta: float, accountant: str) -> None:
    if not 0 < delta < 1:
        raise PrivacyError(f"delta must be in (0, 1); found {delta}.")
    if accountant not in _ACCOUNTANTS:
        raise PrivacyError(
            f"accountant must be one of {', '.join(_ACCOUNTANTS)}; found {accountant!r}."
        )


def _check_run_id(run_id: str, server_round: int) -> None:
    if not run_id or not run_id.isprintable() or len(run_id) > 200:
        raise PrivacyError(f"run_id must be 1-200 printable characters; found {run_id!r}.")
    if isinstance(server_round, bool) or not isinstance(server_round, int) or server_round < 1:
        raise PrivacyError(f"server_round must be an integer >= 1; found {server_round!r}.")


class PrivacyLedger:
    """A site's durable record of every DP-SGD spend on its dataset (see the module docstring).

    Open it with :meth:`open` (or :meth:`create` once, when the dataset is first used). Every
    method re-reads and re-verifies the file under an exclusive lock, so several processes can
    share one ledger; each answer reflects every record any of them made.
    """

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self.path = journal.path

    # -------------------------------------------------------------------------- opening

    @classmethod
    def create(cls, path: str | Path) -> PrivacyLedger:
        """Create an empty ledger at ``path``; refuses if a file is already there."""
        path = Path(path)
        try:
            journal = Journal.create(path, {"kind": _CREATED, "format": _FORMAT})
        except FileExistsError:
            raise PrivacyError(
                f"privacy ledger {path} already exists; open it instead of creating it "
                "(creating would reset the dataset's budget)."
            ) from None
        except FileNotFoundError:
            raise PrivacyError(
                f"cannot create privacy ledger {path}: folder {path.parent} does not exist."
            ) from None
        logger.info("created privacy ledger %s", path)
        return cls._checked(journal)

    @classmethod
    def open(cls, path: str | Path, *, create: bool = False) -> PrivacyLedger:
        """Open the ledger at ``path``; a missing one is created only if ``create`` is true.

        Raises :class:`~clinfed.errors.PrivacyError` for a missing (without ``create``) or damaged
        ledger.
        """
        path = Path(path)
        try:
            journal = Journal.open(path)
        except FileNotFoundError:
            if create:
                try:
                    return cls.create(path)
                except PrivacyError:
                    if not path.exists():
                        raise
                    journal = Journal.open(path)  # another process created it meanwhile
            else:
                raise PrivacyError(
                    f"privacy ledger {path} does not exist. If no run has ever trained on this "
                    "dataset, create it once (PrivacyLedger.create); otherwise restore it from a "
                    "backup — starting a new one would reset the dataset's budget to zero."
                ) from None
        return cls._checked(journal)

    @classmethod
    def _checked(cls, journal: Journal) -> PrivacyLedger:
        ledger = cls(journal)
        try:
            ledger.records()
        except BaseException:
            journal.close()
            raise
        return ledger

    def close(self) -> None:
        self._journal.close()

    def __enter__(self) -> PrivacyLedger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -------------------------------------------------------------------------- reading

    def _damaged(self, line: int, what: str) -> PrivacyError:
        return PrivacyError(
            f"privacy ledger {self.path} is damaged at line {line}: {what}. Refusing to train: a "
            "damaged ledger cannot show what was spent. Restore it from a backup; never delete "
            "it (that would reset the dataset's budget to zero)."
        )

    def _broken_chain(self, error: JournalDamagedError) -> PrivacyError:
        return self._damaged(error.problem.line, f"{error.problem.detail} ({error.problem.kind})")

    def _parse(self, scan: JournalScan) -> list[LedgerRecord]:
        entries = scan.entries
        if not entries or entries[0].get("kind") != _CREATED or entries[0].get("format") != _FORMAT:
            raise self._damaged(1, f"it does not start with a {_FORMAT} creation entry")
        return [r for e in entries[1:] if (r := self._record_of(e)) is not None]

    def _record_of(self, entry: Entry) -> LedgerRecord | None:
        kind, line = entry.get("kind"), entry["seq"] + 1
        if kind == TORN_TAIL_KIND:
            return None
        if kind not in (_DP_SGD, _NON_PRIVATE):
            raise self._damaged(
                line, f"unknown record kind {kind!r} (written by a newer clinfed? upgrade it)"
            )
        try:
            run_id, server_round = entry["run"], entry["round"]
            if not isinstance(run_id, str):
                raise TypeError("run")
            _check_run_id(run_id, server_round)
            step = None
            if kind == _DP_SGD:
                sigma, rate, steps = entry["sigma"], entry["q"], entry["steps"]
                if not all(
                    isinstance(v, int | float) and not isinstance(v, bool) for v in (sigma, rate)
                ):
                    raise TypeError("sigma/q")
                if isinstance(steps, bool) or not isinstance(steps, int):
                    raise TypeError("steps")
                step = DPStep(noise_multiplier=float(sigma), sample_rate=float(rate), steps=steps)
            return LedgerRecord(
                seq=entry["seq"],
                run_id=run_id,
                server_round=server_round,
                step=step,
                recorded_at=str(entry.get("at", "")),
            )
        except (KeyError, TypeError, PrivacyError):
            raise self._damaged(line, f"its {kind} record lacks a valid field") from None

    def _read(self) -> list[LedgerRecord]:
        try:
            return self._parse(self._journal.read())
        except JournalDamagedError as error:
            raise self._broken_chain(error) from None

    def records(self) -> list[LedgerRecord]:
        """Every round recorded, in order."""
        return self._read()

    def history(self, run_id: str | None = None) -> list[DPStep]:
        """The DP-SGD steps of all runs, or of ``run_id`` (rounds without DP are not steps)."""
        return [
            r.step
            for r in self._read()
            if r.step is not None and (run_id is None or r.run_id == run_id)
        ]

    def spent(self, *, delta: float, accountant: str, run_id: str | None = None) -> float:
        """ε at ``delta`` of every recorded round composed, or of ``run_id``'s rounds.

        Infinite once any round in scope trained without DP.
        """
        _check_accounting(delta=delta, accountant=accountant)
        steps = [r.step for r in self._read() if run_id is None or r.run_id == run_id]
        return _epsilon(steps, delta=delta, accountant=accountant)

    # -------------------------------------------------------------------------- budget

    def _check(
        self,
        records: Sequence[LedgerRecord],
        planned: Sequence[DPStep | None],
        *,
        run_id: str,
        total_epsilon: float | None,
        total_delta: float,
        accountant: str,
        max_run_epsilon: float | None,
    ) -> BudgetCheck:
        every = [r.step for r in records]
        mine = [r.step for r in records if r.run_id == run_id]
        check = BudgetCheck(
            spent_total=_epsilon(every, delta=total_delta, accountant=accountant),
            after_total=_epsilon([*every, *planned], delta=total_delta, accountant=accountant),
            spent_run=_epsilon(mine, delta=total_delta, accountant=accountant),
            after_run=_epsilon([*mine, *planned], delta=total_delta, accountant=accountant),
        )
        at = f"at delta {total_delta:g} ({accountant})"
        if math.isinf(check.spent_total) and total_epsilon is not None:
            bare = next(r for r in records if r.step is None)
            raise BudgetExceeded(
                f"privacy budget refused for run {run_id!r}: the dataset has no budget left — round "
                f"{bare.server_round} of run {bare.run_id!r} trained on it WITHOUT differential "
                f"privacy (ledger {self.path}, record #{bare.seq}), so no epsilon bounds it any more."
            )
        if total_epsilon is not None and check.after_total > total_epsilon * (1 + _TOLERANCE):
            runs = len({r.run_id for r in records})
            raise BudgetExceeded(
                f"privacy budget refused for run {run_id!r}: the dataset would reach epsilon "
                f"{check.after_total:.4g} > its total budget {total_epsilon:g} {at} — spent "
                f"{check.spent_total:.4g} by {runs} run(s), remaining "
                f"{max(0.0, total_epsilon - check.spent_total):.4g}, asked "
                f"{check.after_total - check.spent_total:.4g} more. Plan fewer rounds, or ask "
                f"hospital IT (ledger {self.path})."
            )
        if max_run_epsilon is not None and check.after_run > max_run_epsilon * (1 + _TOLERANCE):
            raise BudgetExceeded(
                f"privacy budget refused for run {run_id!r}: the run would reach epsilon "
                f"{check.after_run:.4g} > the per-run maximum {max_run_epsilon:g} {at} — spent "
                f"{check.spent_run:.4g} in this run, remaining "
                f"{max(0.0, max_run_epsilon - check.spent_run):.4g}, asked "
                f"{check.after_run - check.spent_run:.4g} more (ledger {self.path})."
            )
        return check

    def check_budget(
        self,
        *,
        planned: DPStep | Sequence[DPStep],
        run_id: str,
        total_epsilon: float,
        total_delta: float,
        accountant: str,
        max_run_epsilon: float,
    ) -> BudgetCheck:
        """Refuse, before any training, a plan that would exceed the dataset's or the run's budget.

        ``planned`` is what is about to be spent (a round, or the rest of the run). The dataset's ε
        composes every recorded round of every run with ``planned``; the run's ε composes
        ``run_id``'s rounds with it; both at ``total_delta``. Raises :class:`BudgetExceeded`
        with what was spent, what remains and what was asked; returns the numbers otherwise.
        """
        _check_accounting(delta=total_delta, accountant=accountant)
        plan = [planned] if isinstance(planned, DPStep) else list(planned)
        return self._check(
            self._read(),
            plan,
            run_id=run_id,
            total_epsilon=total_epsilon,
            total_delta=total_delta,
            accountant=accountant,
            max_run_epsilon=max_run_epsilon,
        )

    # -------------------------------------------------------------------------- writing

    def record(
        self,
        *,
        run_id: str,
        server_round: int,
        step: DPStep,
        delta: float,
        accountant: str,
        total_epsilon: float | None = None,
        max_run_epsilon: float | None = None,
    ) -> LedgerRecord:
        """Record one round's DP-SGD ``step``; returns once it is durable.

        Call it after training and **before** the update leaves the site. ``delta`` and
        ``accountant`` (the policy's) give the ε written beside the record for readers of the
        file. With ``total_epsilon`` and/or ``max_run_epsilon`` the budget is checked again under
        the ledger's lock right before the write (another run may have spent since
        :meth:`check_budget`): :class:`BudgetExceeded` and nothing written if it no longer fits.
        """
        _check_run_id(run_id, server_round)
        _check_accounting(delta=delta, accountant=accountant)
        if not isinstance(step, DPStep):
            raise PrivacyError(f"step must be a DPStep; found {type(step).__name__}.")

        def build(scan: JournalScan) -> dict[str, object]:
            after = self._check(
                self._parse(scan),
                [step],
                run_id=run_id,
                total_epsilon=total_epsilon,
                total_delta=delta,
                accountant=accountant,
                max_run_epsilon=max_run_epsilon,
            )
            return {
                "kind": _DP_SGD,
                "run": run_id,
                "round": server_round,
                "sigma": step.noise_multiplier,
                "q": step.sample_rate,
                "steps": step.steps,
                "delta": delta,
                "accountant": accountant,
                "eps_run": _json_number(after.after_run),
                "eps_total": _json_number(after.after_total),
            }

        return self._append(build)

    def record_non_private(self, *, run_id: str, server_round: int) -> LedgerRecord:
        """Record a round trained WITHOUT DP; from then on the dataset's ε is infinite."""
        _check_run_id(run_id, server_round)
        logger.warning(
            "recording round %d of run %s as trained without differential privacy: the dataset's "
            "epsilon is infinite from now on",
            server_round,
            run_id,
        )
        body = {"kind": _NON_PRIVATE, "run": run_id, "round": server_round}
        return self._append(lambda _: body)

    def _append(self, build: Callable[[JournalScan], dict[str, object]]) -> LedgerRecord:
        try:
            written = self._journal.append_built(build)
        except JournalDamagedError as error:
            raise self._broken_chain(error) from None
        record = self._record_of(written)
        if record is None:  # pragma: no cover - build always makes a round record
            raise PrivacyError("the ledger wrote a record it cannot read back; refusing to go on.")
        return record

    # -------------------------------------------------------------------------- reporting

    def summary(
        self, *, delta: float, accountant: str, total_epsilon: float | None = None
    ) -> LedgerSummary:
        """Spent and remaining ε, per run and per round, at ``delta`` (for ``clinfed ledger``)."""
        _check_accounting(delta=delta, accountant=accountant)
        every: list[DPStep | None] = []
        per_run: dict[str, list[DPStep | None]] = {}
        rounds: dict[str, list[RoundSpend]] = {}
        for r in self._read():
            every.append(r.step)
            per_run.setdefault(r.run_id, []).append(r.step)
            rounds.setdefault(r.run_id, []).append(
                RoundSpend(
                    server_round=r.server_round,
                    steps=0 if r.step is None else r.step.steps,
                    noise_multiplier=None if r.step is None else r.step.noise_multiplier,
                    sample_rate=None if r.step is None else r.step.sample_rate,
                    run_epsilon=_epsilon(per_run[r.run_id], delta=delta, accountant=accountant),
                    total_epsilon=_epsilon(every, delta=delta, accountant=accountant),
                    recorded_at=r.recorded_at,
                )
            )
        return LedgerSummary(
            path=str(self.path),
            delta=delta,
            accountant=accountant,
            spent=_epsilon(every, delta=delta, accountant=accountant),
            budget=total_epsilon,
            runs=tuple(
                RunSpend(run_id=run, epsilon=spends[-1].run_epsilon, rounds=tuple(spends))
                for run, spends in rounds.items()
            ),
        )


def _json_number(value: float) -> float | str:
    """``value`` as JSON can hold it: infinity as the string ``"inf"``."""
    return value if math.isfinite(value) else "inf"
