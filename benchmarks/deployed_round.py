"""Wall time of a deployed round (3 sites, loopback, TLS) against a simulated round, one run.

A real deployment on this machine: ``clinfed pki init``, a SuperLink with TLS and site
authentication (``clinfed server start``), Paris, Nantes and Berlin as SuperNodes with their own
data, policy, ledger and audit log (``clinfed site start``), and ``flwr run`` with secure
aggregation and DP on — the loopback test's deployment, timed. Three variants, one after another
on the same PKI and data:

- **clinfed**: as shipped — tasks fork from the site's warm launcher (``clinfed.deploy.warm``),
  sites poll every 0.1 s, the ServerApp notices replies within 50 ms (``PromptGrid``);
- **cold tasks**: the same, but a fresh process per task, as Flower starts them
  (``CLINFED_TASK_LAUNCHER=cold``);
- **Flower's defaults**: cold tasks and Flower's own polling (SuperNode 3 s, SuperExec 1 s,
  ServerApp 3 s; ``CLINFED_POLL_S=flower``).

and the same federation in process (``run_inprocess_federation``: same sites, model, DP and
secure aggregation, no transport) as the compute floor. The difference between variants is what
process start and polling cost; clinfed's own tasks are profiled (``CLINFED_TASK_PROFILE_DIR``)
to split a task into app work and Flower's runtime I/O.

Reproduce: ``python -m benchmarks.deployed_round`` (``--rounds N``, ``--variants clinfed``).
"""

from __future__ import annotations

import argparse
import json
import os
import pstats
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.common import (
    environment,
    format_environment,
    markdown_table,
    median,
    write_section,
)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
SITES = {"paris": "cleveland", "nantes": "hungary", "berlin": "va-long-beach"}
VARIANTS = {
    "clinfed": {},
    "cold tasks": {"CLINFED_TASK_LAUNCHER": "cold"},
    "Flower's defaults": {"CLINFED_TASK_LAUNCHER": "cold", "CLINFED_POLL_S": "flower"},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise TimeoutError(f"nothing listens on port {port}")


def _run(args: Sequence[str], env: dict[str, str], cwd: Path, timeout: float = 120) -> str:
    done = subprocess.run(
        list(args), env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout, check=False
    )
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:3])} failed: {done.stderr[-2000:]}")
    return done.stdout


@dataclass
class Deployment:
    """PKI, server config, site configs; processes started per variant."""

    root: Path
    env: dict[str, str]
    port: int
    app_hash: str = ""
    site_configs: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def create(cls, root: Path) -> Deployment:
        env = {
            **os.environ,
            "FLWR_HOME": str(root / "flwr-home"),
            "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
            "FLWR_TELEMETRY_ENABLED": "0",
        }
        for key in ("CLINFED_TASK_LAUNCHER", "CLINFED_POLL_S", "CLINFED_TASK_PROFILE_DIR"):
            env.pop(key, None)
        clinfed = str(BIN / "clinfed")
        sites = [a for s in SITES for a in ("--site", s)]
        _run(
            [clinfed, "pki", "init", "--dir", "pki", "--server-host", "127.0.0.1", *sites],
            env,
            root,
        )
        d = cls(root, env, _free_port())
        (root / "server.yaml").write_text(
            f"host: 127.0.0.1\nport: {d.port}\ncertificate: pki/server/server.pem\n"
            "private_key: pki/server/server-key.pem\nca_certificate: pki/server/ca.pem\n"
            "database: state/superlink.db\n"
        )
        (root / "flwr-home").mkdir()
        (root / "flwr-home" / "config.toml").write_text(
            f'[superlink.bench]\naddress = "127.0.0.1:{d.port}"\n'
            f'root-certificates = "{root}/pki/ca/ca.pem"\n'
        )
        d.app_hash = _run([clinfed, "app-hash", str(REPO)], env, root).strip()
        for name, cohort in SITES.items():
            d.site_configs[name] = d._site_config(name, cohort)
        return d

    def _site_config(self, name: str, cohort: str) -> Path:
        home = self.root / "sites" / name
        (home / "data").mkdir(parents=True)
        (home / "state").mkdir()
        data = REPO / "data" / "heart-disease"
        shutil.copy(data / "sites" / f"{cohort}.csv", home / "data" / "site.csv")
        shutil.copy(data / "schema-binary.yaml", home / "data" / "schema.yaml")
        shutil.copy(REPO / "conf" / "policies" / "demo-policy.yaml", home / "policy.yaml")
        path = home / "site.yaml"
        path.write_text(
            f"name: {name}\ndata:\n  path: data/site.csv\n  schema: data/schema.yaml\n"
            "privacy:\n  epsilon: 1.0\n  delta: 1.0e-5\n"
            f"connection:\n  superlink: 127.0.0.1:{self.port}\n"
            f"  root_certificates: {self.root}/pki/sites/{name}/ca.pem\n"
            f"  auth_private_key: {self.root}/pki/sites/{name}/auth-key\n"
            f"  runtime_port: {_free_port()}\n"
            f"approved_apps: ['{self.app_hash}']\n"
            "governance:\n  policy: policy.yaml\n  ledger: state/ledger.jsonl\n"
            "  audit_log: state/audit.jsonl\n"
        )
        return path

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen[str]:
        log = (self.root / f"{name}.log").open("a")
        return subprocess.Popen(
            args,
            cwd=self.root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )

    @contextmanager
    def running(self, extra_env: dict[str, str], profile_dir: Path | None) -> Iterator[None]:
        """Server and three sites up (registered on first use), stopped on exit."""
        env = {**self.env, **extra_env}
        if profile_dir is not None:
            env["CLINFED_TASK_PROFILE_DIR"] = str(profile_dir)
        clinfed = str(BIN / "clinfed")
        processes = [self._start("server", [clinfed, "server", "start", "server.yaml"], env)]
        try:
            _wait_for_port(self.port)
            if not (self.root / "registered").exists():
                for name in SITES:
                    key = self.root / "pki" / "sites" / name / "auth-key.pub"
                    _run(
                        [
                            *(str(BIN / "flwr"), "supernode", "register", str(key), "bench"),
                            *("--name", name),
                        ],
                        self.env,
                        self.root,
                    )
                (self.root / "registered").touch()
            self._wait_for_sites(online=0)  # the previous variant's sites have left
            for name, config in self.site_configs.items():
                processes.append(self._start(name, [clinfed, "site", "start", str(config)], env))
            self._wait_for_sites()
            yield
        finally:
            # Sites first, while the server can still record them leaving: a site that restarts
            # while the SuperLink still lists it online is refused (exit code 305).
            for process in reversed(processes):
                if process.poll() is None:
                    os.killpg(process.pid, signal.SIGTERM)
                try:
                    process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    os.killpg(process.pid, signal.SIGKILL)

    def _online(self) -> int:
        out = subprocess.run(
            [str(BIN / "flwr"), "supernode", "list", "bench", "--format", "json"],
            env=self.env,
            cwd=self.root,
            capture_output=True,
            text=True,
            check=False,
        ).stdout
        try:
            nodes = json.loads(out).get("nodes", [])
        except ValueError:
            nodes = []
        return sum(str(n.get("status", "")).lower() == "online" for n in nodes)

    def _wait_for_sites(self, *, online: int = len(SITES), timeout: float = 240) -> None:
        """Until the SuperLink lists ``online`` sites as online (all three, or none)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            count = self._online()
            if (count >= online) if online else count == 0:
                return
            time.sleep(1)
        raise TimeoutError(f"the SuperLink did not list {online} site(s) online")

    def federate(self, rounds: int, tag: str) -> dict[str, object]:
        """``flwr run`` with secure aggregation and DP; the run's metrics.json."""
        out = self.root / "results" / tag
        overrides = f"rounds={rounds} min_sites=3 round_timeout_s=300 output_dir={out}"
        started = time.monotonic()
        log = _run(
            [
                str(BIN / "flwr"),
                "run",
                str(REPO),
                "bench",
                "--stream",
                "--run-config",
                f'overrides="{overrides}"',
            ],
            self.env,
            self.root,
            timeout=1800,
        )
        wall = time.monotonic() - started
        folders = list(out.glob("*/"))
        if len(folders) != 1:
            raise RuntimeError(f"{tag}: the run wrote no results; flwr run said:\n{log[-3000:]}")
        [folder] = folders
        metrics: dict[str, object] = json.loads((folder / "metrics.json").read_text())
        metrics["flwr_run_seconds"] = wall
        if metrics.get("secure_aggregation") is not True or metrics.get("dp") is not True:
            raise RuntimeError(f"{tag}: the run was not secure + DP: {folder}")
        return metrics


def simulated_rounds(rounds: int, deployment: Deployment) -> list[float]:
    """The same sites, model, DP and secure aggregation, in process (no transport)."""
    from clinfed.config import load_simulation_config
    from clinfed.simulation import run_inprocess_federation

    config = load_simulation_config(
        REPO / "conf" / "run.yaml",
        [
            f"rounds={rounds}",
            "min_sites=3",
            f"output_dir={deployment.root / 'results' / 'in-process'}",
            "federation.sites=[" + ",".join(str(p) for p in deployment.site_configs.values()) + "]",
        ],
    )
    result = run_inprocess_federation(config)
    return list(result.round_seconds)


# Profile buckets: a task's cumulative time in these functions (the slowest call of each).
# pull_task_input includes the message pull, so the message pull is not a row of its own.
BUCKETS = (
    ("pull the task: FAB bytes + the message (Flower runtime)", ("pull_task_input",)),
    ("approval check + FAB install", ("install_if_approved",)),
    ("clinfed handler (governance, data, training, masking)", ("egress_guard_mod",)),
    ("push the reply (Flower runtime)", ("push_message",)),
)


def profile_breakdown(folder: Path) -> tuple[int, dict[str, float], float]:
    """(tasks, mean seconds per bucket per task, mean task seconds) from the tasks' profiles."""
    files = sorted(folder.glob("task-*.prof"))
    if not files:
        return 0, {}, 0.0
    sums = {name: 0.0 for name, _ in BUCKETS}
    total = 0.0
    for path in files:
        stats = pstats.Stats(str(path))
        raw = stats.stats  # type: ignore[attr-defined]
        total += max(v[3] for v in raw.values())
        for name, functions in BUCKETS:
            best = 0.0
            for (_, _, fn), (_, _, _, cumulative, _) in raw.items():
                if fn in functions:
                    best = max(best, cumulative)
            sums[name] += best
    n = len(files)
    return n, {k: v / n for k, v in sums.items()}, total / n


def render(
    env: dict[str, str],
    rounds: int,
    results: dict[str, dict[str, object]],
    simulated: list[float],
    breakdown: tuple[int, dict[str, float], float],
    seconds: float,
) -> str:
    sim = median(simulated[1:] or simulated)
    rows = []
    per_round: dict[str, float] = {}
    for name, metrics in results.items():
        rs = [float(x) for x in metrics["round_seconds"]]  # type: ignore[union-attr]
        per_round[name] = median(rs[1:] or rs)
        rows.append(
            [
                name,
                f"{float(metrics['setup_seconds']):.1f}",  # type: ignore[arg-type]
                " / ".join(f"{x:.1f}" for x in rs),
                f"**{per_round[name]:.2f}**",
                f"{per_round[name] / sim:.0f}x",
            ]
        )
    rows.append(
        [
            "in process (no transport)",
            "-",
            " / ".join(f"{x:.2f}" for x in simulated),
            f"**{sim:.2f}**",
            "1x",
        ]
    )
    lines = [
        "## Deployed round vs simulated round (3 sites, loopback, TLS, secure aggregation + DP)",
        "",
        format_environment(env),
        f"- wall time: {seconds / 60:.1f} min",
        "",
        "A SuperLink with TLS and site authentication and three SuperNodes (Paris, Nantes, "
        "Berlin: own data, policy, ledger, audit log; app approved by hash) on this machine; "
        f"`flwr run` of {rounds} rounds of the demo run config (logreg, DP ε = 1, secure "
        "aggregation on), one variant after another. A round = the train exchange (masked "
        "updates) + the evaluate exchange, timed by the ServerApp. The median leaves out round "
        "1 (first-use costs: ledger and audit files, FAB install).",
        "",
        markdown_table(["variant", "setup s", "rounds s", "median round s", "÷ in process"], rows),
        "",
    ]
    if "clinfed" in per_round and "cold tasks" in per_round:
        lines.append(
            f"- fresh process per task (torch, Opacus, Flower imports), 2 per round: "
            f"{per_round['cold tasks'] - per_round['clinfed']:+.2f} s per round"
        )
    flower = per_round.get("Flower's defaults")
    if "cold tasks" in per_round and flower is not None:
        lines.append(
            f"- Flower's polling (SuperNode 3 s, SuperExec 1 s, ServerApp 3 s) instead of "
            f"clinfed's (0.1 s / 0.1 s / 0.05 s): "
            f"{flower - per_round['cold tasks']:+.2f} s per round"
        )
    n, buckets, task = breakdown
    if n:
        lines += [
            "",
            f"Inside one clinfed task (cProfile of {n} task processes, mean per task; "
            "profiling inflates Python-heavy steps):",
            "",
            markdown_table(
                ["step", "s per task"],
                [[k, f"{v:.3f}"] for k, v in buckets.items()]
                + [["whole task (fork to exit)", f"{task:.3f}"]],
            ),
        ]
    if "clinfed" in per_round:
        verdict = "met" if per_round["clinfed"] <= 5.0 else "MISSED"
        lines += [
            "",
            f"Target ≤ 5 s per secure round: **{verdict}** ({per_round['clinfed']:.2f} s; "
            "Flower's own deployment: 12.7-16.8 s per plain round, 37-47 s per SecAgg+ round).",
        ]
    lines += ["", "Reproduce: `python -m benchmarks.deployed_round` (`--rounds N`).", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--no-write", action="store_true", help="do not update RESULTS.md")
    parser.add_argument(
        "--keep", type=Path, default=None, help="copy the deployment folder (logs, profiles) here"
    )
    args = parser.parse_args(argv)
    env = environment()
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="clinfed-deployed-") as tmp:
        root = Path(tmp)
        deployment = Deployment.create(root)
        profile_dir = root / "profiles"
        profile_dir.mkdir()
        results = {}
        try:
            _run_variants(args, deployment, profile_dir, results)
        finally:
            if args.keep is not None:
                shutil.copytree(root, args.keep, dirs_exist_ok=True, symlinks=True)
        print(f"[{time.strftime('%H:%M:%S')}] in process ...", flush=True)
        simulated = simulated_rounds(args.rounds, deployment)
        breakdown = profile_breakdown(profile_dir)
    text = render(env, args.rounds, results, simulated, breakdown, time.monotonic() - started)
    print(text)
    if not args.no_write:
        write_section(text)
    return 0


def _run_variants(
    args: argparse.Namespace,
    deployment: Deployment,
    profile_dir: Path,
    results: dict[str, dict[str, object]],
) -> None:
    for name in args.variants:
        print(f"[{time.strftime('%H:%M:%S')}] {name} ...", flush=True)
        profiled = profile_dir if name == "clinfed" else None
        with deployment.running(VARIANTS[name], profiled):
            results[name] = deployment.federate(
                args.rounds, name.replace("'", "").replace(" ", "-")
            )
        rs = results[name]["round_seconds"]
        print(f"    rounds: {rs}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
