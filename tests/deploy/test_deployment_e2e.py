"""A real deployment on loopback: SuperLink with TLS and site authentication, three SuperNodes.

Paris, Nantes and Berlin each have their own data folder, policy, ledger and audit log, approve
the app by its hash, and join a run launched with `flwr run` (secure aggregation and DP on).
The same federation shows that an unregistered site and a plaintext connection are rejected, and
that a site refuses an app its hospital has not approved.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

pytestmark = [pytest.mark.e2e, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
SITES = {"paris": "cleveland", "nantes": "hungary", "berlin": "va-long-beach"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_port(port: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.3)
    raise TimeoutError(f"nothing listens on port {port}")


@dataclass
class Federation:
    root: Path
    env: dict[str, str]
    port: int
    app_hash: str
    run: subprocess.CompletedProcess[str]
    processes: dict[str, subprocess.Popen[str]]

    def results(self) -> dict[str, object]:
        [folder] = list((self.root / "results").glob("clinical-risk-*"))
        return json.loads((folder / "metrics.json").read_text())  # type: ignore[no-any-return]

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text()


def _start(name: str, args: list[str], root: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    log = (root / f"{name}.log").open("w")
    return subprocess.Popen(
        args,
        cwd=root,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _site_config(
    root: Path, name: str, cohort: str, port: int, runtime_port: int, approved: str
) -> Path:
    home = root / "sites" / name
    (home / "data").mkdir(parents=True)
    (home / "state").mkdir()
    shutil.copy(
        REPO / "data" / "heart-disease" / "sites" / f"{cohort}.csv", home / "data" / "site.csv"
    )
    shutil.copy(
        REPO / "data" / "heart-disease" / "schema-binary.yaml", home / "data" / "schema.yaml"
    )
    shutil.copy(REPO / "conf" / "policies" / "demo-policy.yaml", home / "policy.yaml")
    (home / "data" / "site.csv").chmod(0o444)
    path = home / "site.yaml"
    path.write_text(
        f"""name: {name}
data:
  path: data/site.csv
  schema: data/schema.yaml
privacy:
  epsilon: 1.0
  delta: 1.0e-5
connection:
  superlink: 127.0.0.1:{port}
  root_certificates: {root}/pki/sites/{name}/ca.pem
  auth_private_key: {root}/pki/sites/{name}/auth-key
  runtime_port: {runtime_port}
approved_apps: ['{approved}']
governance:
  policy: policy.yaml
  ledger: state/ledger.jsonl
  audit_log: state/audit.jsonl
"""
    )
    return path


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Federation]:
    root = tmp_path_factory.mktemp("deployment")
    env = {
        **os.environ,
        "FLWR_HOME": str(root / "flwr-home"),
        "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "FLWR_TELEMETRY_ENABLED": "0",
    }
    clinfed = [str(BIN / "clinfed")]
    subprocess.run(
        [
            *clinfed,
            "pki",
            "init",
            "--dir",
            str(root / "pki"),
            "--server-host",
            "127.0.0.1",
            *[a for s in [*SITES, "zurich", "intruder"] for a in ("--site", s)],
        ],
        check=True,
        env=env,
        capture_output=True,
        text=True,
    )
    port = _free_port()
    (root / "server.yaml").write_text(
        f"""host: 127.0.0.1
port: {port}
certificate: pki/server/server.pem
private_key: pki/server/server-key.pem
ca_certificate: pki/server/ca.pem
database: state/superlink.db
"""
    )
    processes = {
        "server": _start("server", [*clinfed, "server", "start", "server.yaml"], root, env)
    }
    try:
        _wait_for_port(port)
        (root / "flwr-home").mkdir(exist_ok=True)
        (root / "flwr-home" / "config.toml").write_text(
            f'[superlink.e2e]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{root}/pki/ca/ca.pem"\n'
        )
        for name in [*SITES, "zurich"]:
            subprocess.run(
                [
                    str(BIN / "flwr"),
                    "supernode",
                    "register",
                    str(root / "pki" / "sites" / name / "auth-key.pub"),
                    "e2e",
                    "--name",
                    name,
                ],
                check=True,
                env=env,
                cwd=root,
                capture_output=True,
                text=True,
                timeout=60,
            )
        app_hash = subprocess.run(
            [*clinfed, "app-hash", str(REPO)], check=True, env=env, capture_output=True, text=True
        ).stdout.strip()
        cohorts = {**SITES, "zurich": "switzerland"}
        for i, (name, cohort) in enumerate(cohorts.items()):
            # Zurich's hospital has approved some other app, not this one.
            approved = app_hash if name != "zurich" else "0" * 64
            config = _site_config(root, name, cohort, port, _free_port() + i, approved)
            processes[name] = _start(name, [*clinfed, "site", "start", str(config)], root, env)
        time.sleep(8)  # SuperNodes connect and register their presence
        run = subprocess.run(
            [
                str(BIN / "flwr"),
                "run",
                str(REPO),
                "e2e",
                "--stream",
                "--run-config",
                f'overrides="rounds=2 min_sites=3 round_timeout_s=240 output_dir={root}/results"',
            ],
            env=env,
            cwd=root,
            capture_output=True,
            text=True,
            timeout=1200,
            check=False,
        )
        yield Federation(root, env, port, app_hash, run, processes)
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes.values():
            try:
                process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)


def test_a_full_secure_dp_run_gives_per_site_results(federation: Federation) -> None:
    results = federation.results()

    assert results["secure_aggregation"] is True and results["dp"] is True
    final = results["final"]
    assert isinstance(final, dict) and sorted(final) == ["berlin", "nantes", "paris"]
    for metrics in final.values():
        assert 0.5 < metrics["accuracy"] <= 1 and 0.5 < metrics["roc_auc"] <= 1
    for name in SITES:
        ledger = (
            (federation.root / "sites" / name / "state" / "ledger.jsonl").read_text().splitlines()
        )
        assert sum(json.loads(x).get("kind") == "dp-sgd" for x in ledger) == 2
        # every task forked from the site's warm launcher, none started cold
        log = federation.log(name)
        assert "clinfed warm launcher ready" in log and "starting this task cold" not in log


def test_a_site_refuses_an_app_its_hospital_has_not_approved(federation: Federation) -> None:
    events = federation.results()["events"]

    refused = [e for e in events if e["kind"] == "discovery-refused"]  # type: ignore[index]
    assert len(refused) == 1
    assert f"site zurich refuses app {federation.app_hash}" in refused[0]["detail"]


def _supernode_exit(federation: Federation, name: str, extra: list[str]) -> tuple[int | None, str]:
    process = _start(
        name,
        [
            str(BIN / "flower-supernode"),
            "--superlink",
            f"127.0.0.1:{federation.port}",
            "--max-retries",
            "2",
            "--max-wait-time",
            "20",
            "--port",
            str(_free_port()),
            *extra,
        ],
        federation.root,
        federation.env,
    )
    try:
        code = process.wait(timeout=90)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        code = None
    return code, federation.log(name)


def test_an_unregistered_site_is_rejected(federation: Federation) -> None:
    pki = federation.root / "pki"
    code, log = _supernode_exit(
        federation,
        "intruder",
        [
            "--root-certificates",
            str(pki / "ca" / "ca.pem"),
            "--auth-supernode-private-key",
            str(pki / "sites" / "intruder" / "auth-key"),
        ],
    )

    assert code not in (0, None), log


def test_a_plaintext_connection_is_rejected(federation: Federation) -> None:
    code, log = _supernode_exit(federation, "plaintext", ["--insecure"])

    assert code not in (0, None), log
