"""The deployment in containers: the server image and three site images on a private network.

Mirrors tests/deploy/test_deployment_e2e.py, but every process runs in the images built from
deploy/containers (offline, from the wheelhouse): a SuperLink container, and Paris, Nantes and
Berlin each in a site container with its data mounted read-only, its own policy, keys and approved
app hash, and its ledger on its own volume. The lab registers the sites and launches a 2-round run
(secure aggregation + DP, the defaults) with `flwr run` *inside* the server container against
127.0.0.1; the per-site results are read back from the server's state volume.

Needs podman able to run containers and a base image (CLINFED_BASE_IMAGE, default
localhost/clinfed-base:bookworm, built by .ci/containers.sh). Run: `tox -e containers`.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

pytestmark = [pytest.mark.containers, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
CONTAINERS = REPO / "deploy" / "containers"
BIN = Path(sys.executable).parent
SITES = {"paris": "cleveland", "nantes": "hungary", "berlin": "va-long-beach"}
BASE_IMAGE = os.environ.get("CLINFED_BASE_IMAGE", "localhost/clinfed-base:bookworm")
TAG = os.environ.get("CLINFED_IMAGE_TAG", "test")
UID = 10001  # the images' `clinfed` user
PORT = 9093


def _podman(
    *args: str, check: bool = True, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(
        ["podman", *args], capture_output=True, text=True, timeout=timeout, check=False
    )
    if check and result.returncode != 0:
        raise AssertionError(
            f"podman {' '.join(args)} failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
        )
    return result


def _skip_unless_podman_works() -> None:
    if shutil.which("podman") is None:
        pytest.skip("podman is not installed (CI: .ci/containers.sh installs and configures it)")
    try:
        info = _podman("info", check=False, timeout=60)
    except (OSError, subprocess.TimeoutExpired) as error:
        pytest.skip(f"podman does not answer: {error}")
    if info.returncode != 0:
        pytest.skip(f"podman cannot run here: {info.stderr.strip()[:300]}")
    if _podman("image", "exists", BASE_IMAGE, check=False).returncode != 0:
        pytest.skip(f"base image {BASE_IMAGE} is missing; build it with .ci/containers.sh")
    probe = _podman("run", "--rm", BASE_IMAGE, "true", check=False, timeout=120)
    if probe.returncode != 0:
        pytest.skip(f"podman cannot run containers here: {probe.stderr.strip()[:300]}")


def _own(path: Path) -> None:
    """Hand a folder to the images' user (mounted read-only; keys must stay mode 600)."""
    if os.geteuid() == 0:
        for p in [path, *path.rglob("*")]:
            os.chown(p, UID, UID)
    else:  # rootless podman: the container's UID lives in the user namespace
        _podman("unshare", "chown", "-R", f"{UID}:{UID}", str(path))


def _volume_files(volume: str) -> dict[str, bytes]:
    """Every regular file of a volume, by path relative to its root (read without a container)."""
    exported = subprocess.run(
        ["podman", "volume", "export", volume], capture_output=True, check=True, timeout=120
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(exported)) as tar:
        return {
            m.name.removeprefix("./"): tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isfile()
        }


@dataclass
class Deployment:
    root: Path
    prefix: str
    app_hash: str
    repo_hash: str
    run: subprocess.CompletedProcess[str]
    timings: dict[str, float] = field(default_factory=dict)

    def name(self, role: str) -> str:
        return f"{self.prefix}-{role}"

    def state(self, role: str) -> dict[str, bytes]:
        return _volume_files(f"{self.prefix}-{role}-state")

    def results(self) -> dict[str, object]:
        files = self.state("server")
        [metrics] = [k for k in files if k.startswith("results/") and k.endswith("/metrics.json")]
        return json.loads(files[metrics])  # type: ignore[no-any-return]

    def logs(self) -> str:
        return "\n".join(
            f"----- {role}\n{_podman('logs', self.name(role), check=False).stdout[-4000:]}"
            f"{_podman('logs', self.name(role), check=False).stderr[-4000:]}"
            for role in ["server", *SITES]
        )


def _wait_healthy(container: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    last = ""
    while time.monotonic() < deadline:
        check = _podman("healthcheck", "run", container, check=False, timeout=30)
        if check.returncode == 0:
            return
        state = _podman("inspect", container, "--format", "{{.State.Status}}", check=False)
        if state.stdout.strip() not in ("running", "created"):
            logs = _podman("logs", container, check=False)
            raise AssertionError(f"{container} is {state.stdout.strip()}:\n{logs.stderr[-4000:]}")
        last = check.stdout + check.stderr
        time.sleep(2)
    raise AssertionError(f"{container} not healthy after {timeout} s: {last}")


def _build_images(timings: dict[str, float]) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    for step, script, extra in [
        ("wheelhouse", "build-wheelhouse.sh", {}),
        ("images", "build-images.sh", {"BASE_IMAGE": BASE_IMAGE, "TAG": TAG}),
    ]:
        start = time.monotonic()
        built = subprocess.run(
            [str(CONTAINERS / script)],
            env={**env, **extra},
            capture_output=True,
            text=True,
            timeout=1800,
            check=False,
        )
        assert built.returncode == 0, (
            f"{script} failed:\n{built.stdout[-3000:]}\n{built.stderr[-3000:]}"
        )
        timings[step] = time.monotonic() - start


def _site_folders(
    root: Path, name: str, cohort: str, server: str, app_hash: str
) -> tuple[Path, Path]:
    etc, data = root / "sites" / name / "etc", root / "sites" / name / "data"
    (etc / "keys").mkdir(parents=True)
    data.mkdir()
    shutil.copy(REPO / "data" / "heart-disease" / "sites" / f"{cohort}.csv", data / "site.csv")
    shutil.copy(REPO / "data" / "heart-disease" / "schema-binary.yaml", data / "schema.yaml")
    for f in data.iterdir():
        f.chmod(0o444)
    shutil.copy(REPO / "conf" / "policies" / "demo-policy.yaml", etc / "policy.yaml")
    shutil.copy(root / "pki" / "sites" / name / "ca.pem", etc / "ca.pem")
    shutil.copy(root / "pki" / "sites" / name / "auth-key", etc / "keys" / "auth-key")
    (etc / "site.yaml").write_text(
        f"""name: {name}
data:
  path: /srv/clinfed/data/site.csv
  schema: /srv/clinfed/data/schema.yaml
privacy:
  epsilon: 1.0
  delta: 1.0e-5
connection:
  superlink: {server}:{PORT}
  root_certificates: /etc/clinfed/ca.pem
  auth_private_key: /etc/clinfed/keys/auth-key
approved_apps: ['{app_hash}']
governance:
  policy: /etc/clinfed/policy.yaml
  ledger: /var/lib/clinfed/ledger.jsonl
  audit_log: /var/lib/clinfed/audit.jsonl
"""
    )
    _own(etc)
    return etc, data


def _cleanup(prefix: str) -> None:
    label = f"label=clinfed.test={prefix}"
    ids = _podman("ps", "-aq", "--filter", label, check=False).stdout.split()
    if ids:
        _podman("rm", "-f", "-t", "5", *ids, check=False)
    vols = _podman("volume", "ls", "-q", "--filter", label, check=False).stdout.split()
    if vols:
        _podman("volume", "rm", "-f", *vols, check=False)
    _podman("network", "rm", "-f", f"{prefix}-net", check=False)


@pytest.fixture(scope="module")
def deployment(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Deployment]:
    _skip_unless_podman_works()
    timings: dict[str, float] = {}
    _build_images(timings)
    # the repository's app hash at build time (the working tree may change while the test runs)
    repo_hash = subprocess.run(
        [str(BIN / "clinfed"), "app-hash", str(REPO)], check=True, capture_output=True, text=True
    ).stdout.strip()
    root = tmp_path_factory.mktemp("containers")
    prefix = f"clinfed-ct-{uuid.uuid4().hex[:8]}"
    server = f"{prefix}-server"
    label = ["--label", f"clinfed.test={prefix}"]
    run_args = [
        "run",
        "-d",
        "--init",
        "--read-only",  # root filesystem read-only: writes go to the state volume and tmpfs
        *label,
        "--network",
        f"{prefix}-net",
        "--health-interval",
        "disable",
    ]
    try:
        _podman("network", "create", *label, f"{prefix}-net")
        for role in ["server", *SITES]:
            _podman("volume", "create", *label, f"{prefix}-{role}-state")

        # The lab's PKI: the server certificate names the container (what sites dial) and
        # 127.0.0.1 (what `flwr run` inside the server container dials).
        subprocess.run(
            [str(BIN / "clinfed"), "pki", "init", "--dir", str(root / "pki"),
             "--server-host", server, "--server-host", "127.0.0.1",
             *[a for s in SITES for a in ("--site", s)]],
            check=True, capture_output=True, text=True,
        )  # fmt: skip
        etc = root / "server" / "etc"
        shutil.copytree(root / "pki" / "server", etc / "pki")
        (etc / "sites").mkdir()
        for name in SITES:
            shutil.copy(
                root / "pki" / "sites" / name / "auth-key.pub", etc / "sites" / f"{name}.pub"
            )
        (etc / "server.yaml").write_text(
            f"""host: 0.0.0.0
port: {PORT}
certificate: pki/server.pem
private_key: pki/server-key.pem
ca_certificate: pki/ca.pem
database: /var/lib/clinfed/state/superlink.db
"""
        )
        _own(etc)

        start = time.monotonic()
        _podman(*run_args, "--name", server,
                "-v", f"{etc}:/etc/clinfed:ro", "-v", f"{prefix}-server-state:/var/lib/clinfed",
                f"localhost/clinfed-server:{TAG}")  # fmt: skip
        _wait_healthy(server, 90)
        for name in SITES:
            _podman("exec", server, "flwr", "supernode", "register",
                    f"/etc/clinfed/sites/{name}.pub", "local", "--name", name)  # fmt: skip
        app_hash = _podman("exec", server, "clinfed", "app-hash", "/opt/clinfed/app").stdout.strip()
        for name, cohort in SITES.items():
            site_etc, data = _site_folders(root, name, cohort, server, app_hash)
            _podman(*run_args, "--name", f"{prefix}-{name}",
                    "-v", f"{site_etc}:/etc/clinfed:ro", "-v", f"{data}:/srv/clinfed/data:ro",
                    "-v", f"{prefix}-{name}-state:/var/lib/clinfed",
                    f"localhost/clinfed-site:{TAG}")  # fmt: skip
        for name in SITES:
            _wait_healthy(f"{prefix}-{name}", 90)
        timings["start"] = time.monotonic() - start

        start = time.monotonic()
        run = _podman(
            "exec", server, "flwr", "run", "/opt/clinfed/app", "local", "--stream",
            "--run-config",
            'overrides="rounds=2 min_sites=3 round_timeout_s=240 output_dir=/var/lib/clinfed/results"',
            check=False, timeout=1200,
        )  # fmt: skip
        timings["federation"] = time.monotonic() - start
        deployment = Deployment(root, prefix, app_hash, repo_hash, run, timings)
        print(
            f"\ncontainer deployment timings (s): {json.dumps({k: round(v, 1) for k, v in timings.items()})}"
        )
        yield deployment
    finally:
        _cleanup(prefix)


def test_a_federation_of_containers_gives_per_site_results(deployment: Deployment) -> None:
    try:
        results = deployment.results()
    except (ValueError, KeyError, subprocess.CalledProcessError) as error:
        raise AssertionError(
            f"no results ({error}); flwr run:\n{deployment.run.stdout[-3000:]}\n"
            f"{deployment.run.stderr[-3000:]}\n{deployment.logs()}"
        ) from error

    assert results["secure_aggregation"] is True and results["dp"] is True
    final = results["final"]
    assert isinstance(final, dict) and sorted(final) == sorted(SITES)
    for metrics in final.values():
        assert 0.5 < metrics["accuracy"] <= 1 and 0.5 < metrics["roc_auc"] <= 1
    for name in SITES:
        ledger = deployment.state(name)["ledger.jsonl"].decode().splitlines()
        assert sum(json.loads(x).get("kind") == "dp-sgd" for x in ledger) == 2


def test_the_image_bundles_the_same_app_the_repository_does(deployment: Deployment) -> None:
    assert deployment.app_hash == deployment.repo_hash


def test_sites_run_unprivileged_on_read_only_data(deployment: Deployment) -> None:
    site = deployment.name("paris")

    assert _podman("exec", site, "id", "-u").stdout.strip() == str(UID)
    write = _podman("exec", site, "touch", "/srv/clinfed/data/x", check=False)
    assert write.returncode != 0 and "Read-only file system" in write.stderr
    assert _podman("exec", site, "touch", "/etc/clinfed/x", check=False).returncode != 0
    assert _podman("exec", deployment.name("server"), "id", "-u").stdout.strip() == str(UID)
