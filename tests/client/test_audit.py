"""The audit log: durable appends, a hash chain that names the first tampered entry."""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from clinfed._journal import GENESIS, canonical
from clinfed.client.audit import AuditLog, verify_audit_log
from clinfed.errors import PrivacyError
from clinfed.privacy.ledger import PrivacyLedger


def _event(i: int) -> dict[str, Any]:
    return {"kind": "decision", "run_id": "flwr-7", "server_round": i, "decision": "accepted"}


def _log(path: Path, events: int) -> list[bytes]:
    with AuditLog.open(path) as log:
        for i in range(events):
            log.append(_event(i))
    return path.read_bytes().splitlines(keepends=True)


def test_every_package_name_resolves() -> None:
    import clinfed.client.audit as module

    assert all(hasattr(module, name) for name in module.__all__)


# ------------------------------------------------------------------------------ appending


def test_appended_events_verify_and_keep_their_values(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path) as log:
        log.append({"kind": "request", "fab_hash": "ab12", "run_id": "flwr-7", "rounds": 10})
        log.append({"kind": "decision", "decision": "refused", "reason": "policy refuses: x"})
        head = log.head

    report = verify_audit_log(path)

    assert report.ok and report.entries == 3 and report.head == head
    entries = [json.loads(line) for line in path.read_text().splitlines()]
    assert entries[0]["kind"] == "log-created"
    assert entries[1]["fab_hash"] == "ab12" and entries[1]["rounds"] == 10
    assert entries[2]["prev"] == entries[1]["hash"]
    assert all(e["at"].endswith("+00:00") for e in entries)


def test_a_reopened_log_continues_the_same_chain(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    _log(path, 2)

    with AuditLog.open(path) as log:
        entry = log.append(_event(9))

    assert entry["seq"] == 3
    assert verify_audit_log(path).ok


def test_an_append_is_fsynced_before_it_returns(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog.open(path)
    synced: list[int] = []
    real_fsync = os.fsync

    def fsync(fd: int) -> None:
        real_fsync(fd)
        synced.append(os.fstat(fd).st_ino)

    monkeypatch.setattr(os, "fsync", fsync)

    log.append(_event(1))

    assert synced == [path.stat().st_ino]


def test_an_infinite_epsilon_is_kept_as_text(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path / "a.jsonl") as log:
        entry = log.append({"kind": "decision", "epsilon": math.inf, "delta": 1e-5})

    assert entry["epsilon"] == "inf" and entry["delta"] == 1e-5


def test_numpy_scalars_are_logged_as_plain_numbers(tmp_path: Path) -> None:
    with AuditLog.open(tmp_path / "a.jsonl") as log:
        entry = log.append({"kind": "decision", "epsilon": np.float64(0.5)})

    assert type(entry["epsilon"]) is float


@pytest.mark.parametrize(
    ("event", "words"),
    [
        ({"run_id": "x"}, "needs a 'kind'"),
        ({"kind": "request", "losses": [0.1, 0.7]}, "never records or arrays"),
        ({"kind": "request", "record": {"age": 63}}, "never records or arrays"),
        ({"kind": "request", "x": torch.zeros(3)}, "never records or arrays"),
        ({"kind": "request", "x": np.ones(2)}, "never records or arrays"),
        ({"kind": "request", "reason": "two\nlines"}, "one printable line"),
        ({"kind": "request", "reason": "x" * 501}, "at most 500"),
        ({"kind": "request", "hash": "00"}, "not allowed"),
        ({"kind": "request", "at": "now"}, "not allowed"),
        ({"kind": "request", "Bad Key": 1}, "lower_snake_case"),
        ({"kind": "request", **{f"k{i}": i for i in range(60)}}, "at most 48 keys"),
    ],
)
def test_an_event_must_be_a_flat_mapping_of_short_scalars(
    tmp_path: Path, event: dict[str, Any], words: str
) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog.open(path)

    with pytest.raises(PrivacyError, match=words):
        log.append(event)

    assert verify_audit_log(path).entries == 1


def test_a_missing_folder_or_log_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(PrivacyError, match="does not exist"):
        AuditLog.open(tmp_path / "no" / "audit.jsonl")
    with pytest.raises(PrivacyError, match="does not exist"):
        verify_audit_log(tmp_path / "audit.jsonl")


def test_a_file_that_is_not_an_audit_log_is_refused(tmp_path: Path) -> None:
    PrivacyLedger.create(tmp_path / "ledger.jsonl").close()

    with pytest.raises(PrivacyError, match="not a clinfed audit log"):
        AuditLog.open(tmp_path / "ledger.jsonl")


# ------------------------------------------------------------------------------ tampering


def _rehash(line: bytes, **changes: Any) -> bytes:
    """``line`` with ``changes`` and a recomputed own hash (an attacker who knows the format)."""
    entry = json.loads(line)
    entry.update(changes)
    entry.pop("hash")
    entry["hash"] = hashlib.sha256(canonical(entry)).hexdigest()
    return canonical(entry) + b"\n"


def _edit(line: bytes) -> bytes:
    entry = json.loads(line)
    entry["server_round"] = entry.get("server_round", 0) + 1000
    return canonical(entry) + b"\n"


def _forged(lines: list[bytes], position: int) -> bytes:
    prev = json.loads(lines[position - 1])["hash"] if position else GENESIS
    body = {"kind": "decision", "decision": "accepted", "at": "2026-01-01T00:00:00+00:00"}
    return _rehash(canonical({**body, "seq": position, "prev": prev, "hash": ""}) + b"\n")


Tamper = Callable[[list[bytes]], list[bytes]]
EXAMPLES: list[tuple[str, Tamper, str, int]] = [
    ("edit a value", lambda ls: [*ls[:3], _edit(ls[3]), *ls[4:]], "edited", 4),
    (
        "edit and rehash",
        lambda ls: [*ls[:3], _rehash(ls[3], decision="refused"), *ls[4:]],
        "edited",
        4,
    ),
    ("reformat", lambda ls: [*ls[:2], ls[2].replace(b":", b": ", 1), *ls[3:]], "edited", 3),
    ("garbage line", lambda ls: [*ls[:2], b"not json\n", *ls[3:]], "malformed", 3),
    ("delete one", lambda ls: [*ls[:2], *ls[3:]], "deleted", 3),
    ("delete two", lambda ls: [*ls[:2], *ls[4:]], "deleted", 3),
    ("swap", lambda ls: [*ls[:2], ls[4], ls[3], ls[2], *ls[5:]], "reordered", 3),
    ("replay", lambda ls: [*ls[:4], ls[1], *ls[4:]], "inserted", 5),
    ("forge", lambda ls: [*ls[:2], _forged(ls, 2), *ls[2:]], "inserted", 3),
    ("truncate head", lambda ls: ls[2:], "truncated-head", 1),
    ("torn tail", lambda ls: [*ls, ls[1][:40]], "torn-tail", 7),
]


@pytest.mark.parametrize(
    ("tamper", "problem", "line"), [e[1:] for e in EXAMPLES], ids=[e[0] for e in EXAMPLES]
)
def test_verify_names_the_first_tampered_entry(
    tmp_path: Path, tamper: Tamper, problem: str, line: int
) -> None:
    path = tmp_path / "audit.jsonl"
    path.write_bytes(b"".join(tamper(_log(path, 5))))

    report = verify_audit_log(path)

    assert not report.ok
    assert (report.problem, report.line, report.index) == (problem, line, line - 1)
    assert report.detail


def test_a_tampered_log_cannot_be_appended_to(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _log(path, 4)
    path.write_bytes(b"".join([*lines[:2], *lines[3:]]))

    with pytest.raises(PrivacyError, match=r"damaged at line 3 \(deleted\)"):
        AuditLog.open(path)


def test_a_torn_last_line_is_repaired_on_open_and_the_repair_logged(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    lines = _log(path, 3)
    with path.open("ab") as f:
        f.write(lines[1][:30])

    with AuditLog.open(path) as log:
        log.append(_event(7))

    assert verify_audit_log(path).ok
    kinds = [json.loads(line)["kind"] for line in path.read_text().splitlines()]
    assert kinds[-2:] == ["torn-tail-recovered", "decision"]


# ------------------------------------------------------------------------------ property test

CLEAN: dict[int, list[bytes]] = {}


def _clean_log(tmp: Path, n: int) -> list[bytes]:
    """The lines of an untouched log of ``n`` entries (built once per size)."""
    if n not in CLEAN:
        CLEAN[n] = _log(tmp / f"clean-{n}.jsonl", n - 1)
    return list(CLEAN[n])


@st.composite
def tampers(draw: st.DrawFn) -> tuple[int, str, Tamper, set[tuple[str, int]]]:
    """A log size, a tamper and the (problem, 1-based line) answers that are right for it."""
    n = draw(st.integers(3, 12))
    kind = draw(st.sampled_from(["edit", "rehash", "delete", "head", "swap", "replay", "forge"]))
    if kind == "edit":
        k = draw(st.integers(0, n - 1))
        return n, kind, lambda ls: [*ls[:k], _edit(ls[k]), *ls[k + 1 :]], {("edited", k + 1)}
    if kind == "rehash":  # the last entry rewritten with a fresh hash is undetectable by design
        k = draw(st.integers(0, n - 2))
        change: Tamper = lambda ls: [*ls[:k], _rehash(ls[k], decision="x"), *ls[k + 1 :]]  # noqa: E731
        return n, kind, change, {("edited", k + 1)}
    if kind == "delete":  # removing the last entries is undetectable by design
        a = draw(st.integers(1, n - 2))
        b = draw(st.integers(a + 1, n - 1))
        return n, kind, lambda ls: [*ls[:a], *ls[b:]], {("deleted", a + 1)}
    if kind == "head":
        b = draw(st.integers(1, n - 1))
        return n, kind, lambda ls: ls[b:], {("truncated-head", 1)}
    if kind == "swap":
        a = draw(st.integers(0, n - 2))
        b = draw(st.integers(a + 1, n - 1))

        def swap(ls: list[bytes]) -> list[bytes]:
            ls = list(ls)
            ls[a], ls[b] = ls[b], ls[a]
            return ls

        return n, kind, swap, {("reordered", a + 1)}
    if kind == "replay":
        k = draw(st.integers(0, n - 1))
        p = draw(st.integers(0, n))
        # A copy right next to its original is indistinguishable from it: either line is right.
        right = (
            {("inserted", k + 1), ("inserted", k + 2)} if p in (k, k + 1) else {("inserted", p + 1)}
        )
        return n, kind, lambda ls: [*ls[:p], ls[k], *ls[p:]], right
    p = draw(st.integers(0, n - 2))
    return n, kind, lambda ls: [*ls[:p], _forged(ls, p), *ls[p:]], {("inserted", p + 1)}


@settings(max_examples=150, deadline=None)
@given(case=tampers())
def test_any_tamper_is_detected_at_the_right_entry(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[int, str, Tamper, set[tuple[str, int]]]
) -> None:
    n, kind, tamper, right = case
    tmp = tmp_path_factory.getbasetemp()
    path = tmp / "tampered.jsonl"
    path.write_bytes(b"".join(tamper(_clean_log(tmp, n))))

    report = verify_audit_log(path)

    assert not report.ok, kind
    assert (report.problem, report.line) in right, (kind, report)
