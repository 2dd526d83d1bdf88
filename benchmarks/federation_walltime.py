"""Wall time of the demo federation (``conf/simulate.yaml``), phase by phase.

Two paths, each in a fresh Python process so that imports are counted:

* ``simulate`` — what ``clinfed simulate`` runs: :func:`clinfed.simulation.run_simulated_federation`
  (Flower's simulation engine on Ray);
* ``in-process`` — :func:`clinfed.simulation.run_inprocess_federation` (same ClientApp, server loop
  and strategies over an in-process Grid; no Ray).

The child process does what ``clinfed simulate`` does. Phases: Python start-up; imports
(clinfed, torch, Flower); config + site check (every site's data loaded once); engine start-up
(from the call until the server loop starts; for ``simulate`` this imports Flower's simulation
engine and Ray, which then start in the background); federation setup
(``FederationResult.setup_seconds``: discovery, scaling aggregates, the first model — with Ray the
ServerApp starts at once, so this phase also holds Ray's start-up and its workers loading the
ClientApp); rounds (``round_seconds``; the first one includes each site's noise calibration);
teardown (after the last round: results written, Ray shut down); process exit. The round ends
are taken from the server loop's own log records. The paths are interleaved over ``--repeats``;
the literal ``clinfed simulate`` command is timed once as a cross-check of the total.

    python -m benchmarks.federation_walltime            # ~3 min
    python -m benchmarks.federation_walltime --quick    # ~1 min
"""

from __future__ import annotations

import time

_T0 = time.time()  # first statement of the child process, before any heavy import

import argparse  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import os  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

from benchmarks.common import (  # noqa: E402
    RESULTS,
    ROOT,
    environment,
    fmt_mean_std,
    format_environment,
    markdown_table,
    mean_std,
    write_section,
)

CONFIG = ROOT / "conf" / "simulate.yaml"
PATHS = ("simulate", "in-process")


class _RoundClock(logging.Handler):
    """Keeps the wall-clock time of the server loop's per-round log records."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.round_ends: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        if str(record.msg).startswith("round %d/%d"):
            self.round_ends.append(record.created)


def child(path: str, overrides: list[str], launched: float) -> None:
    """Run one federation as ``clinfed simulate`` does; print its timeline as JSON (last line)."""
    imports_start = time.time()
    import clinfed.simulation as simulation
    from clinfed.config import load_simulation_config

    imported = time.time()
    clock = _RoundClock()
    fed_logger = logging.getLogger("clinfed.server.federation")
    fed_logger.setLevel(logging.INFO)
    fed_logger.addHandler(clock)
    fed_logger.propagate = False
    logging.getLogger("flwr").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="clinfed-walltime-") as out:
        config = load_simulation_config(CONFIG, [*overrides, f"output_dir={out}"])
        check_sites = getattr(simulation, "check_sites", None)
        if check_sites is not None:  # as the CLI: load every site's data before any process starts
            check_sites(config)
        called = time.time()
        if path == "simulate":  # imports Flower's simulation engine and Ray inside, as the CLI
            result = simulation.run_simulated_federation(config).result
        else:
            result = simulation.run_inprocess_federation(config)
        returned = time.time()
    rounds = list(result.round_seconds)
    timeline: dict[str, object] = {
        "path": path,
        "launched": launched,
        "first_statement": _T0,
        "imports_start": imports_start,
        "imported": imported,
        "called": called,
        "returned": returned,
        "setup_seconds": result.setup_seconds,
        "round_seconds": rounds,
        "round_ends": clock.round_ends,
        "secure_aggregation": bool(getattr(result, "secure_aggregation", False)),
        "dp": bool(result.dp),
        "sites": list(result.sites),
    }
    print("RESULT " + json.dumps(timeline), flush=True)


def _child_env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(
        {
            "RAY_USAGE_STATS_ENABLED": "0",
            "FLWR_TELEMETRY_ENABLED": "0",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        }
    )
    return env


def run_child(path: str, overrides: list[str]) -> dict[str, float | str | bool]:
    launched = time.time()
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.federation_walltime",
            "--child",
            path,
            "--launched",
            repr(launched),
            "--",
            *overrides,
        ],
        cwd=ROOT,
        env=_child_env(),
        capture_output=True,
        text=True,
        check=False,
    )
    exited = time.time()
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"{path} child failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    t = json.loads(lines[-1].removeprefix("RESULT "))
    rounds: list[float] = t["round_seconds"]
    setup = float(t["setup_seconds"])
    ends: list[float] = t["round_ends"]
    if len(ends) == len(rounds) and rounds:
        federation_start = ends[0] - rounds[0] - setup
        engine = federation_start - t["called"]
        teardown = t["returned"] - ends[-1]
    else:  # the log line changed: engine start-up and teardown only together
        engine = t["returned"] - t["called"] - setup - sum(rounds)
        teardown = 0.0
    return {
        "path": path,
        "python start-up": t["first_statement"] - launched,
        "imports": t["imported"] - t["imports_start"],
        "config + site check": t["called"] - t["imported"],
        "engine start-up": engine,
        "federation setup": setup,
        "first round": rounds[0],
        "mean round (2..R)": (sum(rounds[1:]) / (len(rounds) - 1))
        if len(rounds) > 1
        else float("nan"),
        "mean round (all)": sum(rounds) / len(rounds),
        "rounds total": sum(rounds),
        "teardown": teardown,
        "process exit": exited - t["returned"],
        "total": exited - launched,
        "secure aggregation": t["secure_aggregation"],
        "dp": t["dp"],
        "sites": len(t["sites"]),
        "rounds": len(rounds),
    }


def time_cli(overrides: list[str]) -> float:
    """The literal ``clinfed simulate`` command, end to end (one run)."""
    exe = Path(sys.executable).with_name("clinfed")
    with tempfile.TemporaryDirectory(prefix="clinfed-walltime-cli-") as out:
        started = time.time()
        proc = subprocess.run(
            [str(exe), "simulate", "--config", str(CONFIG), *overrides, f"output_dir={out}"],
            cwd=ROOT,
            env=_child_env(),
            capture_output=True,
            text=True,
            check=False,
        )
        took = time.time() - started
    if proc.returncode != 0:
        raise RuntimeError(f"clinfed simulate failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return took


PHASES = (
    "python start-up",
    "imports",
    "config + site check",
    "engine start-up",
    "federation setup",
    "first round",
    "mean round (2..R)",
    "mean round (all)",
    "teardown",
    "process exit",
    "total",
)


def render(
    env: dict[str, str],
    runs: dict[str, list[dict[str, float | str | bool]]],
    cli: float | None,
    overrides: list[str],
) -> str:
    header = ["phase (seconds)", *[f"{p} (mean ± std)" for p in runs]]
    rows = []
    for phase in PHASES:
        rows.append(
            [phase, *[fmt_mean_std([float(r[phase]) for r in v], 2) for v in runs.values()]]
        )
    first = next(iter(runs.values()))
    any_run = first[0]
    parts = [
        "## Wall time of the demo federation",
        format_environment(env),
        f"Config: `conf/simulate.yaml` {' '.join(overrides)} — {any_run['sites']} sites, "
        f"{any_run['rounds']} rounds, DP {'on' if any_run['dp'] else 'off'}, secure aggregation "
        f"{'on' if any_run['secure aggregation'] else 'off'}; {len(first)} "
        "interleaved repeats per path, each in a fresh process.",
        markdown_table(header, rows),
    ]
    sim = runs.get("simulate")
    inproc = runs.get("in-process")
    if sim and inproc:
        s, _ = mean_std([float(r["mean round (2..R)"]) for r in sim])
        i, _ = mean_std([float(r["mean round (2..R)"]) for r in inproc])
        parts.append(
            f"Round overhead of the Ray engine: {s:.3f} s vs {i:.3f} s in-process ({s / i:.1f}x)."
        )
    parts.append(
        "With Ray the ServerApp starts at once and its discovery query waits for the Ray workers, so "
        "Ray's start-up shows as *federation setup*; the first round includes every site's noise "
        "calibration (sequential in-process, parallel on Ray)."
    )
    if cli is not None:
        parts.append(f"`clinfed simulate` end to end (one run, wall clock): {cli:.1f} s.")
    parts.append(
        "Reproduce: `python -m benchmarks.federation_walltime` (`--quick`: 1 repeat, 3 rounds)."
    )
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--quick", action="store_true", help="smoke test: 1 repeat, 3 rounds, no CLI run"
    )
    parser.add_argument("--repeats", type=int, default=None, help="repeats per path (default 3)")
    parser.add_argument(
        "--no-cli", action="store_true", help="skip the literal `clinfed simulate` run"
    )
    parser.add_argument("--child", choices=PATHS, help=argparse.SUPPRESS)
    parser.add_argument("--launched", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "out"))
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. rounds=5")
    args = parser.parse_args(argv)
    if args.child:
        child(args.child, args.overrides, args.launched)
        return 0
    env = environment()
    overrides = list(args.overrides) + (["rounds=3"] if args.quick else [])
    repeats = args.repeats or (1 if args.quick else 3)
    runs: dict[str, list[dict[str, float | str | bool]]] = {p: [] for p in PATHS}
    for r in range(repeats):
        for path in PATHS if r % 2 == 0 else PATHS[::-1]:
            runs[path].append(run_child(path, overrides))
            print(f"repeat {r + 1}/{repeats} {path}: {runs[path][-1]['total']:.1f} s", flush=True)
    cli = None if (args.quick or args.no_cli) else time_cli(overrides)
    text = render(env, runs, cli, overrides)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    suffix = "-quick" if args.quick else ""
    (out / f"federation_walltime{suffix}.md").write_text(text)
    (out / f"federation_walltime{suffix}.json").write_text(
        json.dumps({"environment": env, "runs": runs, "cli_seconds": cli}, indent=1)
    )
    print(text)
    if not (args.quick or args.no_write):
        write_section(text)
        print(f"section written to {RESULTS}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
