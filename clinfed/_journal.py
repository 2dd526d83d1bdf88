"""Append-only, hash-chained, fsync'd JSON-lines files: the storage of the ledger and the audit log.

Used by :mod:`clinfed.privacy.ledger` (every DP-SGD spend of a site's dataset) and
:mod:`clinfed.client.audit` (every request a site received and what it decided). One entry per
line, in canonical JSON (sorted keys, no spaces, ASCII only), each entry holding:

* ``seq`` — its position: 0, 1, 2, …;
* ``at`` — when it was written (UTC, ISO 8601, to the second);
* ``prev`` — the ``hash`` of the entry before it (64 zeros for the first entry);
* ``hash`` — the SHA-256 of its own canonical bytes without the ``hash`` key.

An edited entry fails its own hash; a deleted, inserted or reordered one breaks the ``seq`` and
``prev`` links, so :func:`scan_journal` names the first damaged line and what happened to it. What
no chain can show on its own: its *last* entries removed, or the whole file rewritten with fresh
hashes. Against that, anchor the head hash (:attr:`JournalScan.head`) somewhere else.

**Durability.** :meth:`Journal.append` writes the complete line with ``write`` on an ``O_APPEND``
descriptor, ``fsync``'s the file and only then returns. A new journal is written to a hidden file
beside it, fsync'd, hard-linked into place (``link`` never overwrites, so two processes cannot
both create it) and its directory fsync'd. Every operation holds an exclusive ``flock`` on the
file, so processes never interleave (Flower starts one ClientApp process per message).

**Crashes.** A crash in the middle of an append leaves at worst an incomplete last line (no final
newline). That append never returned, so nothing that waited for it happened (the write-ahead
rule of its callers). On the next operation the incomplete bytes are copied to a side file, the
journal is truncated back to its last complete line and the repair is appended as an entry of
kind ``torn-tail-recovered``. Any other damage is reported and never repaired.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import re
import secrets
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal

from clinfed.errors import PrivacyError

__all__ = [
    "GENESIS",
    "RESERVED_KEYS",
    "TORN_TAIL_KIND",
    "ChainProblem",
    "Entry",
    "Journal",
    "JournalDamagedError",
    "JournalScan",
    "ProblemKind",
    "canonical",
    "read_journal",
    "scan_journal",
]

logger = logging.getLogger(__name__)

GENESIS: Final = "0" * 64
"""The ``prev`` of the first entry."""

RESERVED_KEYS: Final = frozenset({"seq", "prev", "hash", "at"})
"""Keys the journal writes itself; an entry's body may not use them."""

TORN_TAIL_KIND: Final = "torn-tail-recovered"
"""``kind`` of the entry that records the repair of an incomplete last line."""

ProblemKind = Literal["malformed", "edited", "deleted", "reordered", "inserted", "truncated-head"]

Entry = dict[str, Any]
"""One decoded entry: its body plus ``seq``, ``prev`` and ``hash``."""

_HEX64 = re.compile(r"[0-9a-f]{64}")


def canonical(entry: Mapping[str, object]) -> bytes:
    """The canonical bytes of ``entry``: sorted keys, no spaces, ASCII, no NaN or infinity."""
    text = json.dumps(
        entry, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False
    )
    return text.encode("ascii")


def _digest(body: Mapping[str, object]) -> str:
    return hashlib.sha256(canonical(body)).hexdigest()


@dataclass(frozen=True)
class ChainProblem:
    """The first damaged entry of a journal.

    ``line`` is 1-based. For a deletion it is the line right after the gap; for a truncated head,
    line 1.
    """

    line: int
    kind: ProblemKind
    detail: str


@dataclass(frozen=True)
class JournalScan:
    """What a journal file holds, verified entry by entry."""

    entries: tuple[Entry, ...]
    """The entries before the first problem (all of them when ``problem`` is ``None``)."""
    lines: int
    """Complete lines in the file."""
    problem: ChainProblem | None
    torn_tail: bytes
    """Bytes after the last newline: an append that never completed."""
    complete_length: int
    """Bytes up to and including the last newline."""

    @property
    def head(self) -> str:
        """The hash of the last verified entry (:data:`GENESIS` for none)."""
        return str(self.entries[-1]["hash"]) if self.entries else GENESIS


class JournalDamagedError(PrivacyError):
    """A journal's chain is broken: an entry was edited, deleted, inserted or reordered."""

    def __init__(self, message: str, *, problem: ChainProblem | None = None) -> None:
        super().__init__(message)
        self.problem = problem or ChainProblem(0, "malformed", message)


# ------------------------------------------------------------------------------ verification


@dataclass(frozen=True)
class _Line:
    entry: Entry | None
    kind: ProblemKind
    detail: str


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    result: dict[str, Any] = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _refuse_constant(name: str) -> None:
    raise ValueError(f"{name} is not allowed")


def _parse(line: bytes) -> _Line:
    try:
        value = json.loads(
            line, object_pairs_hook=_no_duplicate_keys, parse_constant=_refuse_constant
        )
    except (ValueError, RecursionError):
        return _Line(None, "malformed", "the line is not a JSON object")
    if not isinstance(value, dict):
        return _Line(None, "malformed", "the line is not a JSON object")
    seq, prev, own = value.get("seq"), value.get("prev"), value.get("hash")
    if type(seq) is not int or seq < 0 or not isinstance(prev, str) or not isinstance(own, str):
        return _Line(None, "malformed", "the entry lacks a valid seq, prev or hash")
    if not _HEX64.fullmatch(prev) or not _HEX64.fullmatch(own):
        return _Line(None, "malformed", "the entry's prev or hash is not a SHA-256 hex digest")
    body = {k: v for k, v in value.items() if k != "hash"}
    try:
        if _digest(body) != own:
            return _Line(None, "edited", f"entry #{seq} does not match its own hash")
        if canonical(value) != line:
            return _Line(None, "edited", f"entry #{seq} is not in its canonical form")
    except ValueError:  # a number too large for a float (1e999) decodes as infinity
        return _Line(None, "malformed", "the entry holds a number that is not finite")
    return _Line(value, "edited", "")


def _classify(j: int, entry: Entry, lines: list[_Line]) -> ChainProblem:
    """Why the chain breaks at 0-based line ``j``, whose ``entry`` parsed and matched its hash."""
    seqs = [line.entry["seq"] if line.entry is not None else None for line in lines]
    seq = entry["seq"]
    twins = [i for i, s in enumerate(seqs) if s == seq and i != j]
    if twins:
        inserted = j
        if j > 0 and seqs[j - 1] == seq:
            # Two neighbours claim the same position; the genuine one is the one its successor
            # links to.
            after = lines[j + 1].entry if j + 1 < len(lines) else None
            if after is not None and after["prev"] == entry["hash"]:
                inserted = j - 1
        where = ", ".join(str(i + 1) for i in sorted([j, *twins]))
        return ChainProblem(
            inserted + 1,
            "inserted",
            f"entry #{seq} appears more than once (lines {where}); the one at line "
            f"{inserted + 1} is not part of the chain",
        )
    if seq > j:
        if j in seqs[j + 1 :]:
            moved = seqs.index(j, j + 1)
            return ChainProblem(
                j + 1,
                "reordered",
                f"line {j + 1} holds entry #{seq} where entry #{j} belongs (found at line {moved + 1})",
            )
        if j == 0:
            return ChainProblem(
                1,
                "truncated-head",
                f"the file starts at entry #{seq}: its first {seq} entries are missing",
            )
        missing = f"#{j}" if seq == j + 1 else f"#{j}..#{seq - 1}"
        return ChainProblem(j + 1, "deleted", f"entries {missing} are missing before line {j + 1}")
    if j == 0:
        return ChainProblem(
            1, "edited", "the first entry does not start the chain (prev is not the genesis hash)"
        )
    return ChainProblem(
        j,
        "edited",
        f"entry #{j - 1} was changed after it was written: entry #{j} links to a different hash",
    )


def scan_journal(data: bytes) -> JournalScan:
    """Verify the bytes of a journal file; never raises on any input."""
    end = data.rfind(b"\n") + 1
    lines = [_parse(raw) for raw in data[:end].split(b"\n")[:-1]] if end else []
    good: list[Entry] = []
    prev = GENESIS
    problem: ChainProblem | None = None
    for j, line in enumerate(lines):
        entry = line.entry
        if entry is None:
            problem = ChainProblem(j + 1, line.kind, line.detail)
            break
        if entry["seq"] != j or entry["prev"] != prev:
            problem = _classify(j, entry, lines)
            break
        good.append(entry)
        prev = entry["hash"]
    if problem is not None:
        good = good[: problem.line - 1]
    return JournalScan(tuple(good), len(lines), problem, data[end:], end)


def read_journal(path: Path) -> JournalScan:
    """Scan the journal at ``path`` under a shared lock, changing nothing."""
    fd = os.open(path, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        return scan_journal(_read_all(fd))
    finally:
        os.close(fd)


# ------------------------------------------------------------------------------ file operations


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    chunks: list[bytes] = []
    offset = 0
    while offset < size:
        chunk = os.pread(fd, size - offset, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    return b"".join(chunks)


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _create_durably(path: Path, data: bytes) -> None:
    """Create ``path`` holding ``data``, all or nothing; ``FileExistsError`` if it exists."""
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(6)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        _write_all(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    try:
        os.link(tmp, path)
    finally:
        tmp.unlink()
    _fsync_dir(path.parent)


def _make_entry(body: Mapping[str, object], *, seq: int, prev: str) -> Entry:
    clash = RESERVED_KEYS & set(body)
    if clash:
        raise ValueError(f"entry keys {sorted(clash)} are reserved for the journal")
    entry: Entry = {**body, "at": datetime.now(UTC).isoformat(timespec="seconds")}
    entry.update(seq=seq, prev=prev)
    entry["hash"] = _digest(entry)
    return entry


class Journal:
    """An open journal file (see the module docstring for the format and its guarantees)."""

    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd
        self._inode = os.fstat(fd).st_ino
        self._failed: str | None = None

    @classmethod
    def create(cls, path: Path, first: Mapping[str, object]) -> Journal:
        """Create a journal whose entry #0 is ``first``; ``FileExistsError`` if ``path`` exists."""
        _create_durably(path, canonical(_make_entry(first, seq=0, prev=GENESIS)) + b"\n")
        return cls.open(path)

    @classmethod
    def open(cls, path: Path) -> Journal:
        """Open an existing journal for reading and appending; ``FileNotFoundError`` if absent."""
        return cls(path, os.open(path, os.O_RDWR | os.O_APPEND))

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @contextlib.contextmanager
    def _locked(self) -> Iterator[JournalScan]:
        if self._fd < 0:
            raise PrivacyError(f"{self.path} is closed.")
        if self._failed is not None:
            raise PrivacyError(
                f"an earlier write to {self.path} failed ({self._failed}), so what it holds is "
                "unconfirmed; open it again before going on."
            )
        fcntl.flock(self._fd, fcntl.LOCK_EX)
        try:
            try:
                same = self.path.stat().st_ino == self._inode
            except FileNotFoundError:
                same = False
            if not same:
                raise PrivacyError(
                    f"{self.path} was removed or replaced while it was open; refusing to go on."
                )
            scan = scan_journal(_read_all(self._fd))
            if scan.problem is not None:
                p = scan.problem
                raise JournalDamagedError(
                    f"{self.path} is damaged at line {p.line} ({p.kind}): {p.detail}", problem=p
                )
            if scan.torn_tail:
                scan = self._recover(scan)
            yield scan
        finally:
            fcntl.flock(self._fd, fcntl.LOCK_UN)

    def read(self) -> JournalScan:
        """The verified entries (repairing an incomplete last line first, see the module doc)."""
        with self._locked() as scan:
            return scan

    def append(self, body: Mapping[str, object]) -> Entry:
        """Append ``body`` as the next entry; returns once it is on disk (fsync'd).

        Once a write has failed, every later operation on this object raises until the journal
        is opened again.
        """
        return self.append_built(lambda _: body)

    def append_built(self, build: Callable[[JournalScan], Mapping[str, object]]) -> Entry:
        """Append the body that ``build`` makes from the current entries, under the lock.

        What ``build`` sees cannot change before the write; if it raises, nothing is written.
        """
        with self._locked() as scan:
            return self._append_locked(scan, build(scan))

    def _append_locked(self, scan: JournalScan, body: Mapping[str, object]) -> Entry:
        entry = _make_entry(body, seq=len(scan.entries), prev=scan.head)
        data = canonical(entry) + b"\n"
        try:
            _write_all(self._fd, data)
            os.fsync(self._fd)
        except BaseException as error:
            self._failed = f"{type(error).__name__}: {error}"
            raise
        return entry

    def _recover(self, scan: JournalScan) -> JournalScan:
        tail = scan.torn_tail
        digest = hashlib.sha256(tail).hexdigest()
        side = self.path.with_name(f"{self.path.name}.torn-{scan.complete_length}-{digest[:12]}")
        logger.warning(
            "%s ends with an incomplete entry (%d bytes, a crash during a write); it was never "
            "confirmed, so nothing depended on it. Moving it to %s.",
            self.path,
            len(tail),
            side.name,
        )
        with contextlib.suppress(FileExistsError):  # an earlier recovery stopped before truncating
            _create_durably(side, tail)
        try:
            os.ftruncate(self._fd, scan.complete_length)
            os.fsync(self._fd)
        except BaseException as error:
            self._failed = f"{type(error).__name__}: {error}"
            raise
        clean = JournalScan(scan.entries, scan.lines, None, b"", scan.complete_length)
        entry = self._append_locked(
            clean,
            {
                "kind": TORN_TAIL_KIND,
                "offset": scan.complete_length,
                "length": len(tail),
                "sha256": digest,
                "side_file": side.name,
            },
        )
        return JournalScan(
            (*scan.entries, entry),
            scan.lines + 1,
            None,
            b"",
            scan.complete_length + len(canonical(entry)) + 1,
        )
