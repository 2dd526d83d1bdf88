"""The privacy ledger: durable, append-only, never under-counts, never silently resets."""

from __future__ import annotations

import contextlib
import json
import math
import multiprocessing
import os
import stat
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from clinfed.errors import PrivacyError
from clinfed.privacy.accountant import DPStep, epsilon_spent
from clinfed.privacy.ledger import BudgetExceeded, PrivacyLedger

STEP = DPStep(noise_multiplier=1.1, sample_rate=0.08, steps=12)
OTHER = DPStep(noise_multiplier=2.0, sample_rate=0.1, steps=10)
DELTA = 1e-5


def _eps(steps: list[DPStep], accountant: str = "rdp") -> float:
    return epsilon_spent(steps, delta=DELTA, accountant=accountant)


def _record(ledger: PrivacyLedger, run: str, server_round: int, step: DPStep = STEP) -> None:
    ledger.record(run_id=run, server_round=server_round, step=step, delta=DELTA, accountant="rdp")


@pytest.fixture
def ledger(tmp_path: Path) -> Iterator[PrivacyLedger]:
    with PrivacyLedger.create(tmp_path / "ledger.jsonl") as opened:
        yield opened


def test_every_package_name_resolves() -> None:
    import clinfed.privacy.ledger as module

    assert all(hasattr(module, name) for name in module.__all__)


# ------------------------------------------------------------------------------ accounting


def test_records_survive_reopening_in_order(ledger: PrivacyLedger) -> None:
    for r in (1, 2, 3):
        _record(ledger, "run-a", r)
    ledger.close()

    reopened = PrivacyLedger.open(ledger.path)

    assert [(r.run_id, r.server_round, r.step) for r in reopened.records()] == [
        ("run-a", 1, STEP),
        ("run-a", 2, STEP),
        ("run-a", 3, STEP),
    ]
    assert reopened.history() == [STEP] * 3


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_spent_composes_every_run_with_the_accountant(
    ledger: PrivacyLedger, accountant: str
) -> None:
    _record(ledger, "run-a", 1)
    _record(ledger, "run-b", 1, OTHER)
    _record(ledger, "run-a", 2)

    total = ledger.spent(delta=DELTA, accountant=accountant)
    run_a = ledger.spent(delta=DELTA, accountant=accountant, run_id="run-a")

    assert total == pytest.approx(_eps([STEP, OTHER, STEP], accountant), rel=1e-9)
    assert run_a == pytest.approx(_eps([STEP, STEP], accountant), rel=1e-9)
    assert ledger.spent(delta=DELTA, accountant=accountant, run_id="never") == 0.0
    assert total > run_a


def test_each_record_carries_the_epsilon_after_it_for_readers_of_the_file(
    ledger: PrivacyLedger,
) -> None:
    _record(ledger, "run-a", 1)
    _record(ledger, "run-b", 1, OTHER)

    lines = [json.loads(line) for line in ledger.path.read_text().splitlines()]

    assert lines[2]["eps_run"] == pytest.approx(_eps([OTHER]))
    assert lines[2]["eps_total"] == pytest.approx(_eps([STEP, OTHER]))
    assert stat.S_IMODE(ledger.path.stat().st_mode) == 0o600


def test_check_budget_passes_a_plan_that_fits_and_returns_the_numbers(
    ledger: PrivacyLedger,
) -> None:
    _record(ledger, "old-run", 1)

    check = ledger.check_budget(
        planned=[OTHER, OTHER],
        run_id="new-run",
        total_epsilon=10.0,
        total_delta=DELTA,
        accountant="rdp",
        max_run_epsilon=5.0,
    )

    assert check.spent_total == pytest.approx(_eps([STEP]))
    assert check.after_total == pytest.approx(_eps([STEP, OTHER, OTHER]))
    assert check.spent_run == 0.0
    assert check.after_run == pytest.approx(_eps([OTHER, OTHER]))


def test_check_budget_refuses_a_plan_beyond_the_total_with_spent_remaining_and_asked(
    ledger: PrivacyLedger,
) -> None:
    for r in (1, 2, 3):
        _record(ledger, "old-run", r)
    spent = _eps([STEP] * 3)
    budget = spent + 0.1

    with pytest.raises(BudgetExceeded) as error:
        ledger.check_budget(
            planned=STEP,
            run_id="new-run",
            total_epsilon=budget,
            total_delta=DELTA,
            accountant="rdp",
            max_run_epsilon=budget,
        )

    message = str(error.value)
    assert "\n" not in message
    assert f"spent {spent:.4g}" in message
    assert "remaining 0.1" in message
    assert "asked" in message and "total budget" in message


def test_check_budget_refuses_a_run_beyond_its_own_maximum(ledger: PrivacyLedger) -> None:
    _record(ledger, "run-a", 1)

    with pytest.raises(BudgetExceeded, match="per-run maximum 1 "):
        ledger.check_budget(
            planned=[STEP] * 10,
            run_id="run-a",
            total_epsilon=100.0,
            total_delta=DELTA,
            accountant="rdp",
            max_run_epsilon=1.0,
        )


def test_record_checks_the_budget_again_under_the_lock(tmp_path: Path) -> None:
    # Two processes (two handles): both pass check_budget, the second to record must be refused.
    path = tmp_path / "ledger.jsonl"
    first, second = PrivacyLedger.create(path), PrivacyLedger.open(path)
    budget = _eps([STEP]) * 1.01
    for handle in (first, second):
        handle.check_budget(
            planned=STEP,
            run_id="r",
            total_epsilon=budget,
            total_delta=DELTA,
            accountant="rdp",
            max_run_epsilon=budget,
        )
    first.record(
        run_id="r", server_round=1, step=STEP, delta=DELTA, accountant="rdp", total_epsilon=budget
    )

    with pytest.raises(BudgetExceeded):
        second.record(
            run_id="s",
            server_round=1,
            step=STEP,
            delta=DELTA,
            accountant="rdp",
            total_epsilon=budget,
        )

    assert len(PrivacyLedger.open(path).records()) == 1


def test_a_round_without_dp_makes_every_later_epsilon_infinite(ledger: PrivacyLedger) -> None:
    _record(ledger, "private", 1)
    ledger.record_non_private(run_id="baseline", server_round=1)

    assert math.isinf(ledger.spent(delta=DELTA, accountant="rdp"))
    assert ledger.spent(delta=DELTA, accountant="rdp", run_id="private") == pytest.approx(
        _eps([STEP])
    )
    with pytest.raises(BudgetExceeded, match="round 1 of run 'baseline' trained on it WITHOUT"):
        ledger.check_budget(
            planned=STEP,
            run_id="next",
            total_epsilon=100.0,
            total_delta=DELTA,
            accountant="rdp",
            max_run_epsilon=100.0,
        )


def test_summary_shows_spent_and_remaining_per_run_and_round(ledger: PrivacyLedger) -> None:
    _record(ledger, "run-a", 1)
    _record(ledger, "run-a", 2)
    _record(ledger, "run-b", 1, OTHER)

    summary = ledger.summary(delta=DELTA, accountant="rdp", total_epsilon=10.0)

    assert summary.spent == pytest.approx(_eps([STEP, STEP, OTHER]))
    assert summary.remaining == pytest.approx(10.0 - summary.spent)
    assert [run.run_id for run in summary.runs] == ["run-a", "run-b"]
    assert [r.run_epsilon for r in summary.runs[0].rounds] == pytest.approx(
        [_eps([STEP]), _eps([STEP, STEP])]
    )
    assert summary.runs[1].rounds[0].total_epsilon == pytest.approx(summary.spent)
    text = summary.as_text()
    assert "remaining" in text and "run run-a" in text and "round    2" in text


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"run_id": ""}, "run_id"),
        ({"run_id": "a\nb"}, "run_id"),
        ({"server_round": 0}, "server_round"),
        ({"delta": 1.0}, "delta"),
        ({"accountant": "gdp"}, "accountant"),
    ],
)
def test_record_refuses_bad_arguments(
    ledger: PrivacyLedger, kwargs: dict[str, Any], words: str
) -> None:
    args: dict[str, Any] = {
        "run_id": "r",
        "server_round": 1,
        "step": STEP,
        "delta": DELTA,
        "accountant": "rdp",
    }

    with pytest.raises(PrivacyError, match=words):
        ledger.record(**{**args, **kwargs})

    assert ledger.records() == []


# ------------------------------------------------------------------------------ never a reset


def test_a_missing_ledger_is_refused_not_silently_created(tmp_path: Path) -> None:
    with pytest.raises(PrivacyError) as error:
        PrivacyLedger.open(tmp_path / "gone.jsonl")

    assert "does not exist" in str(error.value) and "reset" in str(error.value)
    assert not (tmp_path / "gone.jsonl").exists()


def test_an_existing_ledger_is_never_recreated(ledger: PrivacyLedger) -> None:
    _record(ledger, "r", 1)

    with pytest.raises(PrivacyError, match="already exists"):
        PrivacyLedger.create(ledger.path)

    assert len(PrivacyLedger.open(ledger.path, create=True).records()) == 1


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def _edit_value(line: bytes) -> bytes:
    entry = json.loads(line)
    entry["steps"] = 1  # fewer steps: a smaller spend
    return json.dumps(entry, sort_keys=True, separators=(",", ":")).encode() + b"\n"


TAMPERS: dict[str, Callable[[list[bytes]], list[bytes]]] = {
    "edited": lambda ls: [*ls[:2], _edit_value(ls[2]), *ls[3:]],
    "deleted": lambda ls: [*ls[:2], *ls[3:]],
    "reordered": lambda ls: [*ls[:2], ls[3], ls[2], *ls[4:]],
    "inserted": lambda ls: [*ls[:3], ls[1], *ls[3:]],
    "truncated-head": lambda ls: ls[1:],
    "bad last line": lambda ls: [*ls[:-1], _edit_value(ls[-1])],
    "emptied": lambda ls: [],
}


@pytest.mark.parametrize("tamper", sorted(TAMPERS))
def test_a_damaged_ledger_refuses_to_train_instead_of_resetting(
    ledger: PrivacyLedger, tamper: str
) -> None:
    for r in (1, 2, 3, 4):
        _record(ledger, "r", r)
    ledger.close()
    ledger.path.write_bytes(b"".join(TAMPERS[tamper](_lines(ledger.path))))

    with pytest.raises(PrivacyError) as error:
        PrivacyLedger.open(ledger.path)

    message = str(error.value)
    assert "\n" not in message
    assert "damaged at line" in message and "Refusing to train" in message
    assert "never delete" in message


def test_a_record_of_an_unknown_kind_is_refused(ledger: PrivacyLedger) -> None:
    from clinfed._journal import Journal

    with Journal.open(ledger.path) as journal:
        journal.append({"kind": "dp-sgd-v2", "run": "r", "round": 1})

    with pytest.raises(PrivacyError, match="unknown record kind"):
        ledger.records()


def test_a_ledger_replaced_while_open_is_refused(ledger: PrivacyLedger) -> None:
    _record(ledger, "r", 1)
    ledger.path.rename(ledger.path.with_suffix(".old"))
    PrivacyLedger.create(ledger.path).close()

    with pytest.raises(PrivacyError, match="removed or replaced"):
        _record(ledger, "r", 2)


# ------------------------------------------------------------------------------ crashes


def test_a_torn_last_line_is_set_aside_and_the_repair_recorded(ledger: PrivacyLedger) -> None:
    _record(ledger, "r", 1)
    _record(ledger, "r", 2)
    ledger.close()
    complete = ledger.path.read_bytes()
    torn = _lines(ledger.path)[-1][:57]  # a third record, cut mid-write
    with ledger.path.open("ab") as f:
        f.write(torn)

    reopened = PrivacyLedger.open(ledger.path)
    _record(reopened, "r", 3)

    assert [r.server_round for r in reopened.records()] == [1, 2, 3]
    sides = list(ledger.path.parent.glob("ledger.jsonl.torn-*"))
    assert [s.read_bytes() for s in sides] == [torn]
    entries = [json.loads(line) for line in ledger.path.read_text().splitlines()]
    assert ledger.path.read_bytes().startswith(complete)
    assert entries[3]["kind"] == "torn-tail-recovered" and entries[3]["length"] == len(torn)


class CrashError(Exception):
    """The process dies here."""


_CALLS = ("open", "write", "fsync", "link", "unlink", "ftruncate")


class FaultyDisk:
    """Counts the file-system calls made through ``os`` and crashes at call number ``at``.

    ``power_loss`` then also throws away what was not made durable: file bytes after the size at
    the last ``fsync`` of that file (keeping half of them when ``torn``), and directory entries
    added after the last ``fsync`` of their directory.
    """

    def __init__(self, folder: Path, *, at: int, power_loss: bool, torn: bool) -> None:
        self.folder, self.at, self.power_loss, self.torn = folder, at, power_loss, torn
        self.calls = 0
        self.real = {name: getattr(os, name) for name in _CALLS}
        # What is already there when the fault injection starts is on disk.
        self.synced_size = {p.stat().st_ino: p.stat().st_size for p in folder.iterdir()}
        self.synced_names = {p.name for p in folder.iterdir()}

    def install(self, monkeypatch: pytest.MonkeyPatch) -> None:
        for name in _CALLS:
            monkeypatch.setattr(os, name, self._wrap(name))

    def _wrap(self, name: str) -> Callable[..., Any]:
        real = self.real[name]

        def call(*args: Any, **kwargs: Any) -> Any:
            self.calls += 1
            if self.calls == self.at:
                if name == "write" and self.torn:
                    real(args[0], bytes(args[1])[: len(args[1]) // 2])
                raise CrashError(f"crash at {name} (call {self.at})")
            result = real(*args, **kwargs)
            if name == "fsync":
                info = os.fstat(args[0])
                if stat.S_ISDIR(info.st_mode):
                    self.synced_names = {p.name for p in self.folder.iterdir()}
                else:
                    self.synced_size[info.st_ino] = info.st_size
            return result

        return call

    def lose_power(self) -> None:
        if not self.power_loss:
            return
        for path in self.folder.iterdir():
            if path.name not in self.synced_names:
                path.unlink()
                continue
            data = path.read_bytes()
            keep = self.synced_size.get(path.stat().st_ino, 0)
            if len(data) > keep:
                lost = len(data) - keep
                path.write_bytes(data[: keep + (lost // 2 if self.torn else 0)])


def _run_crashing(
    folder: Path,
    scenario: Callable[[list[int]], None],
    *,
    at: int,
    power_loss: bool,
    torn: bool,
) -> tuple[list[int], FaultyDisk]:
    released: list[int] = []
    disk = FaultyDisk(folder, at=at, power_loss=power_loss, torn=torn)
    with pytest.MonkeyPatch.context() as patch:
        disk.install(patch)
        with contextlib.suppress(CrashError):
            scenario(released)
    disk.lose_power()
    return released, disk


def _records_three_rounds(path: Path) -> Callable[[list[int]], None]:
    def scenario(released: list[int]) -> None:
        ledger = PrivacyLedger.open(path, create=True)
        for r in (1, 2, 3):
            _record(ledger, "run", r)
            released.append(r)  # the update leaves the site only once record() returned

    return scenario


def _assert_nothing_released_is_missing(path: Path, released: list[int]) -> None:
    if not path.exists():
        assert released == []
        return
    ledger = PrivacyLedger.open(path)  # every crash state must open without a damage error
    rounds = [r.server_round for r in ledger.records()]
    assert set(released) <= set(rounds), f"released {released}, recorded {rounds}"
    assert ledger.spent(delta=DELTA, accountant="rdp") >= _eps([STEP] * len(released)) - 1e-12
    _record(ledger, "run", 9)  # and stays usable
    assert PrivacyLedger.open(path).records()[-1].server_round == 9


MODES = [
    pytest.param(False, False, id="process-crash"),
    pytest.param(False, True, id="process-crash-torn-write"),
    pytest.param(True, False, id="power-loss"),
    pytest.param(True, True, id="power-loss-torn"),
]


@pytest.mark.parametrize(("power_loss", "torn"), MODES)
def test_a_crash_at_any_point_never_undercounts_what_was_released(
    tmp_path: Path, power_loss: bool, torn: bool
) -> None:
    dry = tmp_path / "dry"
    dry.mkdir()
    _, disk = _run_crashing(
        dry, _records_three_rounds(dry / "l.jsonl"), at=0, power_loss=False, torn=False
    )
    assert disk.calls >= 10

    outcomes: set[int] = set()
    repaired = 0
    for at in range(1, disk.calls + 1):
        folder = tmp_path / f"at-{at}"
        folder.mkdir()
        path = folder / "l.jsonl"

        released, _ = _run_crashing(
            folder, _records_three_rounds(path), at=at, power_loss=power_loss, torn=torn
        )

        _assert_nothing_released_is_missing(path, released)
        outcomes.add(len(released))
        repaired += bool(list(folder.glob("l.jsonl.torn-*")))
    assert outcomes == {0, 1, 2}  # crashes before, between and after the confirmed records
    assert (repaired > 0) == torn  # only a torn write leaves an incomplete line


@pytest.mark.parametrize(("power_loss", "torn"), MODES)
def test_a_crash_while_repairing_a_torn_line_never_undercounts(
    tmp_path: Path, power_loss: bool, torn: bool
) -> None:
    def prepare(folder: Path) -> Path:
        path = folder / "l.jsonl"
        with PrivacyLedger.create(path) as ledger:
            _record(ledger, "run", 1)
            _record(ledger, "run", 2)
        with path.open("ab") as f:
            f.write(b'{"accountant":"rdp","at":"2026')
            f.flush()
            os.fsync(f.fileno())
        return path

    def scenario(path: Path) -> Callable[[list[int]], None]:
        def run(released: list[int]) -> None:
            released.extend([1, 2])
            ledger = PrivacyLedger.open(path)
            _record(ledger, "run", 3)
            released.append(3)

        return run

    dry = tmp_path / "dry"
    dry.mkdir()
    _, disk = _run_crashing(dry, scenario(prepare(dry)), at=0, power_loss=False, torn=False)
    assert disk.calls >= 8

    for at in range(1, disk.calls + 1):
        folder = tmp_path / f"at-{at}"
        folder.mkdir()
        path = prepare(folder)

        released, _ = _run_crashing(folder, scenario(path), at=at, power_loss=power_loss, torn=torn)

        _assert_nothing_released_is_missing(path, released)
        assert list(folder.glob("l.jsonl.torn-*"))  # the torn bytes are kept, whatever happened


def test_a_failed_write_poisons_the_handle_until_reopened(
    ledger: PrivacyLedger, monkeypatch: pytest.MonkeyPatch
) -> None:
    def failing_fsync(fd: int) -> None:
        raise OSError(5, "Input/output error")

    with monkeypatch.context() as patch:
        patch.setattr(os, "fsync", failing_fsync)
        with pytest.raises(OSError, match="Input/output"):
            _record(ledger, "r", 1)

    with pytest.raises(PrivacyError, match="failed"):
        ledger.spent(delta=DELTA, accountant="rdp")
    # The write reached the file even though fsync failed: counted (over-counting is safe).
    assert [r.server_round for r in PrivacyLedger.open(ledger.path).records()] == [1]


def _record_many(path: str, run: str) -> None:
    ledger = PrivacyLedger.open(path)
    for r in range(1, 11):
        _record(ledger, run, r)


def test_concurrent_processes_never_interleave(ledger: PrivacyLedger) -> None:
    context = multiprocessing.get_context("fork")
    workers = [
        context.Process(target=_record_many, args=(str(ledger.path), f"run-{i}")) for i in range(3)
    ]

    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)

    assert [w.exitcode for w in workers] == [0, 0, 0]
    records = PrivacyLedger.open(ledger.path).records()
    assert len(records) == 30
    for i in range(3):
        assert [r.server_round for r in records if r.run_id == f"run-{i}"] == list(range(1, 11))
