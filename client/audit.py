"""The site's audit log: every request received and every decision taken, hash-chained.

One JSON line per event, append-only and fsync'd before :meth:`AuditLog.append` returns, each
entry holding the SHA-256 of the entry before it (:mod:`clinfed._journal`). The ClientApp writes
one entry when a request arrives (the app's identity — FAB hash, run id — and what was asked)
and one for its decision (accepted or refused and why, ε spent, bytes sent).
:func:`verify_audit_log` re-reads a log and names the first entry that was edited, deleted,
inserted or reordered, or a truncated head.

Entries describe decisions, never patients: an event is a flat mapping of short one-line texts
and finite numbers (no lists, no nested records, no tensors), so a per-record value cannot be
written by accident. A chain shows tampering inside the file, not the removal of its last
entries or a rewrite of the whole file: for that, keep :attr:`AuditReport.head` (the hash of the
last entry) somewhere else, e.g. in the hospital's central log.
"""

from __future__ import annotations

import logging
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Literal

from clinfed._journal import (
    GENESIS,
    RESERVED_KEYS,
    Entry,
    Journal,
    JournalDamagedError,
    ProblemKind,
    read_journal,
)
from clinfed.errors import PrivacyError

__all__ = ["AuditLog", "AuditReport", "AuditValue", "verify_audit_log"]

logger = logging.getLogger(__name__)

AuditValue = str | int | float | bool | None
"""What an audit event may hold: one scalar per key."""

_FORMAT: Final = "clinfed-audit-log/1"
_KEY = re.compile(r"[a-z][a-z0-9_]{0,63}")
_MAX_TEXT: Final = 500
_MAX_KEYS: Final = 48


def _check_event(event: Mapping[str, object]) -> dict[str, AuditValue]:
    if not isinstance(event.get("kind"), str) or not event["kind"]:
        raise PrivacyError("an audit event needs a 'kind' (e.g. 'request' or 'decision').")
    if len(event) > _MAX_KEYS:
        raise PrivacyError(f"an audit event holds at most {_MAX_KEYS} keys; found {len(event)}.")
    clean: dict[str, AuditValue] = {}
    for key, value in event.items():
        if not isinstance(key, str) or not _KEY.fullmatch(key) or key in RESERVED_KEYS:
            raise PrivacyError(
                f"audit key {key!r} is not allowed: use lower_snake_case names other than "
                f"{', '.join(sorted(RESERVED_KEYS))}."
            )
        if isinstance(value, float) and not math.isfinite(value):
            clean[key] = str(value)  # "inf" (e.g. epsilon after training without DP), "nan"
        elif isinstance(value, str):
            if len(value) > _MAX_TEXT or not value.isprintable():
                raise PrivacyError(
                    f"audit value {key!r} must be one printable line of at most {_MAX_TEXT} "
                    "characters."
                )
            clean[key] = value
        elif value is None or isinstance(value, bool):
            clean[key] = value
        elif isinstance(value, int | float):
            clean[key] = int(value) if isinstance(value, int) else float(value)
        else:
            raise PrivacyError(
                f"audit value {key!r} is a {type(value).__name__}; only one text, number, "
                "true/false or null per key may be logged (never records or arrays)."
            )
    return clean


@dataclass(frozen=True, kw_only=True)
class AuditReport:
    """What :func:`verify_audit_log` found.

    ``entries`` counts the verified entries (all of them when ``ok``). When not ``ok``, ``line``
    (1-based) is the first damaged entry — for a deletion, the entry right after the gap — and
    ``problem`` says what happened to it; ``torn-tail`` is an incomplete last line (a crash
    during a write, repaired on the next :meth:`AuditLog.open`).
    """

    ok: bool
    entries: int
    head: str
    line: int | None = None
    problem: ProblemKind | Literal["torn-tail"] | None = None
    detail: str = ""

    @property
    def index(self) -> int | None:
        """0-based position of the first damaged entry."""
        return None if self.line is None else self.line - 1


def verify_audit_log(path: str | Path) -> AuditReport:
    """Re-read the audit log at ``path`` and check its chain entry by entry; changes nothing."""
    path = Path(path)
    try:
        scan = read_journal(path)
    except FileNotFoundError:
        raise PrivacyError(f"audit log {path} does not exist.") from None
    if scan.problem is not None:
        return AuditReport(
            ok=False,
            entries=len(scan.entries),
            head=scan.head,
            line=scan.problem.line,
            problem=scan.problem.kind,
            detail=scan.problem.detail,
        )
    if scan.torn_tail:
        return AuditReport(
            ok=False,
            entries=len(scan.entries),
            head=scan.head,
            line=scan.lines + 1,
            problem="torn-tail",
            detail=f"the last {len(scan.torn_tail)} bytes are an incomplete entry (a crash during a write)",
        )
    if not scan.entries or scan.entries[0].get("kind") != "log-created":
        return AuditReport(
            ok=False,
            entries=len(scan.entries),
            head=scan.head,
            line=1,
            problem="truncated-head",
            detail="the log does not start with its creation entry",
        )
    return AuditReport(ok=True, entries=len(scan.entries), head=scan.head)


class AuditLog:
    """An open, verified audit log; create or open it with :meth:`open`."""

    def __init__(self, journal: Journal) -> None:
        self._journal = journal
        self.path = journal.path

    @classmethod
    def open(cls, path: str | Path) -> AuditLog:
        """Open the log at ``path`` (creating it if absent) after verifying its whole chain.

        A damaged log raises :class:`~clinfed.errors.PrivacyError`: the site cannot keep an
        accountable trail on top of one that was tampered with.
        """
        path = Path(path)
        try:
            journal = Journal.open(path)
        except FileNotFoundError:
            try:
                journal = Journal.create(path, {"kind": "log-created", "format": _FORMAT})
                logger.info("created audit log %s", path)
            except FileExistsError:
                journal = Journal.open(path)
            except FileNotFoundError:
                raise PrivacyError(
                    f"cannot create audit log {path}: folder {path.parent} does not exist."
                ) from None
        log = cls(journal)
        try:
            log._read()
        except BaseException:
            journal.close()
            raise
        return log

    def _read(self) -> tuple[Entry, ...]:
        try:
            entries = self._journal.read().entries
        except JournalDamagedError as error:
            raise self._damaged(error) from None
        if entries[0].get("kind") != "log-created" or entries[0].get("format") != _FORMAT:
            raise PrivacyError(f"{self.path} is not a clinfed audit log ({_FORMAT}).")
        return entries

    def _damaged(self, error: JournalDamagedError) -> PrivacyError:
        p = error.problem
        return PrivacyError(
            f"audit log {self.path} is damaged at line {p.line} ({p.kind}): {p.detail}. Keep it "
            "as evidence (verify_audit_log) and start a new log under another name."
        )

    @property
    def head(self) -> str:
        """The hash of the last entry: anchor it elsewhere to detect a truncated tail."""
        entries = self._read()
        return str(entries[-1]["hash"]) if entries else GENESIS

    def append(self, event: Mapping[str, object]) -> Entry:
        """Append ``event`` (a flat mapping with a ``kind``) with the time; durable on return."""
        clean = _check_event(event)
        try:
            return self._journal.append(clean)
        except JournalDamagedError as error:
            raise self._damaged(error) from None

    def close(self) -> None:
        self._journal.close()

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
