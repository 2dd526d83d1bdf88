"""Soak: 30 simulated sites x 50 rounds, random dropouts, a server restart in the middle.

The real ClientApp, server loop, strategy and secure aggregation (on, as by default) over the
in-process transport (:func:`clinfed.simulation.local_grid`), DP-SGD on, checkpointing on. Each
round every site independently fails with probability ``--dropout`` (10 %): half of the failures
are a site that is down when the round starts (not connected: not a participant), half a site
that crashes mid-round (its training reply never arrives: the round waits for its deadline, then
secure aggregation recovers the others' sum). After round ``--restart-after`` (25) the server
"dies" (an exception out of the round hook, after the round's checkpoint was written) and a fresh
server loop on a fresh transport (a new Flower run: the sites' in-memory state is gone as well)
resumes from the checkpoint.

It checks that the run completes, that every round is accounted for (one record per round:
completed, or aborted with a reason) and that memory does not grow by more than 10 % (resident
set size, ``VmRSS`` in ``/proc/self/status``, after round 1 — imports, data and calibration done —
and after the last round; ``VmHWM`` is the peak).

    python -m benchmarks.soak                # 30 sites x 50 rounds (~3-5 min on 2 cores)
    python -m benchmarks.soak --quick        # 6 sites x 8 rounds, a smoke test (~15 s)

The pytest version is ``tests/test_soak.py`` (``tox -e soak``).
"""

from __future__ import annotations

import argparse
import logging
import random
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import yaml
from flwr.app import Message

from benchmarks._sites import make_sites
from benchmarks.common import configure_logging, environment, format_environment, write_section
from clinfed.config import SimulationConfig, load_simulation_config
from clinfed.server.federation import run_federation
from clinfed.server.results import FederationResult
from clinfed.simulation import LocalGrid, local_grid

__all__ = ["SoakReport", "memory_kb", "run_soak"]

logger = logging.getLogger(__name__)


def memory_kb() -> dict[str, int]:
    """This process's resident set size now (``VmRSS``) and at its peak (``VmHWM``), in kB."""
    found: dict[str, int] = {}
    for line in Path("/proc/self/status").read_text(encoding="ascii").splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            found[key] = int(value.split()[0])
    return found


class _ServerKilledError(Exception):
    """The server process dying between two rounds (raised from the round hook)."""


@dataclass
class SoakReport:
    """What a soak run did and measured."""

    sites: int
    rounds: int
    dropout: float
    restart_after: int
    seconds: float = 0.0
    completed: int = 0
    aborted: int = 0
    aborted_reasons: list[str] = field(default_factory=list)
    accounted: bool = False
    resumed_from: int = 0
    down_at_start: int = 0
    lost_mid_round: int = 0
    rejected: int = 0
    rss_start_kb: int = 0
    rss_end_kb: int = 0
    peak_start_kb: int = 0
    peak_end_kb: int = 0
    final_round_sites: int = 0

    @property
    def rss_growth(self) -> float:
        return self.rss_end_kb / self.rss_start_kb - 1 if self.rss_start_kb else float("nan")

    def summary(self) -> str:
        return (
            f"{self.sites} sites x {self.rounds} rounds, dropout {self.dropout:.0%}, server "
            f"restarted after round {self.restart_after} (resumed from {self.resumed_from}): "
            f"{self.completed} completed, {self.aborted} aborted, every round accounted for: "
            f"{self.accounted}; failures injected: {self.down_at_start} down at round start, "
            f"{self.lost_mid_round} lost mid-round; RSS {self.rss_start_kb / 1024:.1f} MiB after "
            f"round 1 -> {self.rss_end_kb / 1024:.1f} MiB at the end ({self.rss_growth:+.1%}); "
            f"peak {self.peak_start_kb / 1024:.1f} -> {self.peak_end_kb / 1024:.1f} MiB; "
            f"{self.seconds:.0f} s"
        )


class _Failures:
    """Seeded site failures: before each round some sites are down, some lose their reply."""

    def __init__(self, *, dropout: float, seed: int, report: SoakReport) -> None:
        self.rng = random.Random(seed)
        self.dropout = dropout
        self.report = report
        self.lose: set[int] = set()  # node ids whose training reply is lost this round
        self.grid: LocalGrid | None = None

    def plan(self, grid: LocalGrid, *, allow_down: bool = True) -> None:
        """Decide the next round's failures (called before every round, from the round hook).

        ``allow_down=False`` before a server (re)start: a site down at discovery would not join
        the run at all, which is a different scenario.
        """
        self.grid = grid
        nodes = sorted(grid._contexts)
        failing = [n for n in nodes if self.rng.random() < self.dropout]
        down = {n for n in failing if allow_down and self.rng.random() < 0.5}
        grid.dropped = down
        self.lose = set(failing) - down
        self.report.down_at_start += len(down)
        self.report.lost_mid_round += len(self.lose)

    def __call__(self, request: Message, reply: Message) -> Message | None:
        if request.metadata.message_type != "train":
            return reply
        if request.metadata.dst_node_id in self.lose:
            return None  # the site crashed after it received the round: no reply ever comes
        return reply


def _config(
    folder: Path, *, sites: int, rounds: int, seed: int, timeout_s: float
) -> SimulationConfig:
    paths = make_sites(sites, folder / "sites", seed=seed, resample=True, rows_per_site=60)
    document = {
        "name": "soak",
        "rounds": rounds,
        "seed": seed,
        "min_sites": max(2, sites // 2),
        "round_timeout_s": timeout_s,
        "output_dir": str(folder / "results"),
        "model": {"name": "logreg"},
        "train": {"local_epochs": 1, "batch_size": 16, "lr": 0.5, "max_grad_norm": 1.0},
        "secure_aggregation": {"max_sites": max(2, sites)},
        "checkpoint": {"dir": str(folder / "checkpoints"), "run_id": f"soak-{seed}"},
        "federation": {"sites": [str(p) for p in paths]},
    }
    path = folder / "soak.yaml"
    path.write_text(yaml.safe_dump(document), encoding="utf-8")
    return load_simulation_config(path)


def run_soak(
    *,
    sites: int = 30,
    rounds: int = 50,
    dropout: float = 0.1,
    restart_after: int = 25,
    seed: int = 0,
    timeout_s: float = 5.0,
    folder: Path | None = None,
    progress: Callable[[str], None] | None = None,
) -> SoakReport:
    """Run the soak (see the module docstring) and return what it measured."""
    report = SoakReport(sites=sites, rounds=rounds, dropout=dropout, restart_after=restart_after)
    with tempfile.TemporaryDirectory(prefix="clinfed-soak-") as tmp:
        config = _config(
            folder or Path(tmp), sites=sites, rounds=rounds, seed=seed, timeout_s=timeout_s
        )
        failures = _Failures(dropout=dropout, seed=seed + 1, report=report)
        started = time.monotonic()

        def hook(grid: LocalGrid, *, kill_at: int | None) -> Callable[[FederationResult], None]:
            def on_round_end(result: FederationResult) -> None:
                done = result.rounds[-1].round
                if done == 1:
                    mem = memory_kb()
                    report.rss_start_kb, report.peak_start_kb = mem["VmRSS"], mem["VmHWM"]
                if progress is not None and (done % 5 == 0 or done == 1):
                    progress(
                        f"round {done}/{rounds}: {result.rounds[-1].status} ({time.monotonic() - started:.0f} s)"
                    )
                if kill_at is not None and done == kill_at:
                    raise _ServerKilledError
                failures.plan(grid)

            return on_round_end

        first = local_grid(config)
        first.reply_filter = failures
        failures.plan(first, allow_down=False)
        try:
            run_federation(first, config.run, on_round_end=hook(first, kill_at=restart_after))
            raise RuntimeError("the server was not killed; is restart_after < rounds?")
        except _ServerKilledError:
            pass
        # A fresh server loop on a fresh transport: a new Flower run, the sites' state gone too.
        second = local_grid(config)
        second.reply_filter = failures
        failures.plan(second, allow_down=False)
        result = run_federation(second, config.run, on_round_end=hook(second, kill_at=None))
        mem = memory_kb()
        report.rss_end_kb, report.peak_end_kb = mem["VmRSS"], mem["VmHWM"]
        report.seconds = time.monotonic() - started
    numbers = [r.round for r in result.rounds]
    report.accounted = numbers == list(range(1, rounds + 1)) and all(
        r.status == "completed" or (r.status == "aborted" and r.detail) for r in result.rounds
    )
    report.completed = sum(r.status == "completed" for r in result.rounds)
    report.aborted = sum(r.status == "aborted" for r in result.rounds)
    report.aborted_reasons = [
        f"round {r.round}: {r.detail}" for r in result.rounds if r.status != "completed"
    ]
    report.resumed_from = result.resumed_from
    report.rejected = sum(e.kind.endswith("-rejected") for e in result.events)
    report.final_round_sites = sum(
        1 for m in result.metrics if m.round == rounds and m.phase == "evaluate" and not m.error
    )
    return report


def _section(report: SoakReport) -> str:
    reasons = "\n".join(f"  - {r}" for r in report.aborted_reasons) or "  - none"
    return f"""## Soak: {report.sites} sites x {report.rounds} rounds, dropouts, a server restart

{report.summary()}.

- rounds: {report.completed} completed, {report.aborted} aborted; every round accounted for
  (exactly one record per round 1..{report.rounds}, each aborted one with its reason):
  **{report.accounted}**. Aborted rounds:
{reasons}
- failures injected (seeded; {report.dropout:.0%} of site-rounds): {report.down_at_start} site-rounds
  down at round start, {report.lost_mid_round} training replies lost mid-round (each costs the
  round's deadline, `round_timeout_s`); the server restarted after round {report.restart_after}
  and resumed from its checkpoint at round {report.resumed_from + 1} on a new transport (the sites'
  in-memory state lost; their DP history restored, worst case, as they keep no ledger here).
- memory (this process, `/proc/self/status`): RSS {report.rss_start_kb / 1024:.1f} MiB after round 1,
  {report.rss_end_kb / 1024:.1f} MiB after round {report.rounds} (**{report.rss_growth:+.1%}**,
  limit +10 %); peak (VmHWM) {report.peak_start_kb / 1024:.1f} MiB -> {report.peak_end_kb / 1024:.1f} MiB.
- wall time {report.seconds:.0f} s; secure aggregation on, DP-SGD on, logreg, 60 records per
  site (resampled from the four Fed-Heart-Disease cohorts, `benchmarks/_sites.py`).

Reproduce: `python -m benchmarks.soak` (or `tox -e soak`, which asserts the same).

{format_environment(environment())}
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="6 sites x 8 rounds (smoke test)")
    parser.add_argument("--sites", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    configure_logging(verbose=args.verbose)
    sites, rounds = (6, 8) if args.quick else (args.sites, args.rounds)
    report = run_soak(
        sites=sites, rounds=rounds, restart_after=rounds // 2, seed=args.seed, progress=print
    )
    print(report.summary())
    if not args.quick:
        write_section(_section(report))
        print("written to benchmarks/RESULTS.md")
    ok = report.accounted and report.rss_growth <= 0.10
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
