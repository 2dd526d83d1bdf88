"""Start a site (SuperNode) or the server (SuperLink) the way clinfed deploys them.

**A site runs only apps its hospital approved.** Flower's ``--trusted-entities`` needs FAB
signatures that only Flower's hosted platform issues, so clinfed checks on the site instead:
every ClientApp task is launched through ``clinfed-clientapp``, which computes the SHA-256 of the
app bundle (FAB) it was handed *before installing or importing anything from it* and refuses the
task — with an error reply naming the hash — unless the hash is in the site config's
``approved_apps``. The check runs in the site's own installed code, never in the app's, so a
bundle cannot skip it. The lab publishes the hash of the app it will run (``clinfed app-hash``);
the hospital reviews that bundle and adds its hash.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tempfile
from pathlib import Path

from clinfed._prompt import prompt_pulls, prompt_sleeps
from clinfed.client.governance import APP_HASH_ENV, Governance
from clinfed.config import ServerDeployConfig, SiteConfig, load_site_config
from clinfed.deploy.warm import SOCKET_ENV
from clinfed.errors import ConfigError, PrivacyError

__all__ = [
    "APPROVAL_ENV",
    "LAUNCHER_ENV",
    "POLL_ENV",
    "AppNotApprovedError",
    "check_app_approved",
    "run_clientapp_with_approval",
    "run_superexec_with_approval",
    "server_arguments",
    "site_arguments",
    "start_server",
    "start_site",
]

logger = logging.getLogger(__name__)

APPROVAL_ENV = "CLINFED_SITE_CONFIG"
"""Environment variable naming the site config whose ``approved_apps`` every task is checked against."""

CLIENTAPP_COMMAND = "clinfed-clientapp"

_REFUSED_BY_SERVER = 305
"""flower-supernode's exit code when the SuperLink refuses to activate the node."""

POLL_ENV = "CLINFED_POLL_S"
"""Seconds between a site's polls for work (default 0.1; Flower polls every 1–3 s). ``flower``
keeps Flower's own intervals everywhere, the server's included (for measurements)."""

LAUNCHER_ENV = "CLINFED_TASK_LAUNCHER"
"""``warm`` (default): tasks fork from a pre-imported zygote (:mod:`clinfed.deploy.warm`);
``cold``: a fresh process per task, as Flower does (for measurements)."""

_DEFAULT_POLL_S = 0.1


def poll_interval() -> float | None:
    """The polling interval from ``CLINFED_POLL_S``; ``None`` = keep Flower's own."""
    raw = os.environ.get(POLL_ENV, "")
    if raw == "flower":
        return None
    if not raw:
        return _DEFAULT_POLL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not 0.01 <= value <= 10:
        raise ConfigError(
            f"{POLL_ENV} must be a number of seconds in [0.01, 10] or 'flower'; found {raw!r}."
        )
    return value


def _prompt_site(poll_s: float) -> None:
    """The SuperNode in this process polls every ``poll_s`` s and pulls objects promptly."""
    import flwr.supernode.start_client_internal as loop  # noqa: PLC0415

    prompt_sleeps(loop, poll_s)
    prompt_pulls(loop)


def _start_zygote() -> tuple[subprocess.Popen[bytes], Path]:
    """Start the warm task launcher; its socket lives in a directory only this user opens."""
    folder = Path(tempfile.mkdtemp(prefix="clinfed-warm-"))  # mode 0700
    path = folder / "tasks.sock"
    zygote = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clinfed.deploy.warm",
            "--socket",
            str(path),
            "--parent-pid",
            str(os.getpid()),
        ]
    )
    return zygote, path


class AppNotApprovedError(PrivacyError):
    """The server asked this site to run an app bundle its hospital has not approved."""


def check_app_approved(fab_content: bytes, site: SiteConfig) -> str:
    """The bundle's SHA-256 if ``site`` approved it; :class:`AppNotApprovedError` otherwise."""
    digest = hashlib.sha256(fab_content).hexdigest()
    if digest not in site.approved_apps:
        raise AppNotApprovedError(
            f"site {site.name} refuses app {digest}: not in approved_apps of its site config. "
            "Review the app bundle, then add its hash to approved_apps to allow it."
        )
    return digest


def _insecure_warning(what: str) -> None:
    banner = "!" * 78
    logger.warning(
        "%s\n%s runs WITHOUT TLS and WITHOUT authentication: anyone on the network can read and "
        "alter its traffic. Local development only.\n%s",
        banner,
        what,
        banner,
    )


def site_arguments(site: SiteConfig, config_path: Path) -> list[str]:
    """``flower-supernode`` arguments for ``site`` (TLS and authentication unless insecure)."""
    c = site.connection
    if not c.superlink:
        raise ConfigError(
            f"site {site.name}: connection.superlink is not set; give the server's host:port."
        )
    args = [
        "--superlink",
        c.superlink,
        "--node-config",
        f'site-config="{config_path.resolve()}"',
        "--isolation",
        "subprocess",
        "--host",
        "127.0.0.1",
        "--port",
        str(c.runtime_port),
    ]
    # Reconnection after a lost connection: Flower retries with exponential backoff; these
    # bound how long a site keeps trying (0 = forever, e.g. across server maintenance).
    if c.reconnect_max_retries:
        args += ["--max-retries", str(c.reconnect_max_retries)]
    if c.reconnect_max_wait_s:
        args += ["--max-wait-time", f"{c.reconnect_max_wait_s:g}"]
    if c.insecure:
        _insecure_warning(f"site {site.name}")
        return [*args, "--insecure"]
    for key, value in (
        ("root_certificates", c.root_certificates),
        ("auth_private_key", c.auth_private_key),
    ):
        if not value or not Path(value).is_file():
            raise ConfigError(
                f"site {site.name}: connection.{key} ({value or 'not set'}) is not a readable file; "
                "see `clinfed preflight` for what each file is and how to get it."
            )
    return [
        *args,
        "--root-certificates",
        c.root_certificates,
        "--auth-supernode-private-key",
        c.auth_private_key,
    ]


def server_arguments(server: ServerDeployConfig) -> list[str]:
    """``flower-superlink`` arguments: TLS, site authentication, no runtime installs."""
    args = [
        "--host",
        server.host,
        "--port",
        str(server.port),
        "--database",
        server.database,
        "--disable-runtime-dependency-installation",
    ]
    if server.insecure:
        _insecure_warning("the server")
        return [*args, "--insecure"]
    return [
        *args,
        "--ssl-certfile",
        server.certificate,
        "--ssl-keyfile",
        server.private_key,
        "--ssl-ca-certfile",
        server.ca_certificate,
        "--enable-supernode-auth",
    ]


def start_site(config_path: Path) -> None:
    """Run the site (blocks): the SuperNode here, and its task launcher in a child process.

    Flower's default launcher would run each ClientApp task with ``flwr-clientapp``; the site
    instead runs the SuperNode with ``--isolation process`` and starts the launcher itself
    (:func:`run_superexec_with_approval`), so that every task goes through the approval check.
    """
    site = load_site_config(config_path)
    if not site.governance.policy:
        raise ConfigError(
            f"site {site.name}: a deployed site needs governance.policy, governance.ledger and "
            "governance.audit_log (see README, 'Run a site')."
        )
    Governance(site)  # a bad policy file stops the site here, at start-up, in one line
    if not site.approved_apps:
        logger.warning(
            "site %s approves no app yet: every request will be refused until approved_apps "
            "lists an app hash",
            site.name,
        )
    arguments = site_arguments(site, config_path)
    from flwr.supernode.cli.flower_supernode import flower_supernode  # noqa: PLC0415

    os.environ[APPROVAL_ENV] = str(config_path.resolve())
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    poll_s = poll_interval()
    if poll_s is not None:
        os.environ["FLWR_SUPEREXEC_TASK_POLL_INTERVAL"] = str(poll_s)
        _prompt_site(poll_s)
    mode = os.environ.get(LAUNCHER_ENV, "warm")
    if mode not in ("warm", "cold"):
        raise ConfigError(f"{LAUNCHER_ENV} must be 'warm' or 'cold'; found {mode!r}.")
    zygote = None
    if mode == "warm":
        zygote, socket_path = _start_zygote()
        os.environ[SOCKET_ENV] = str(socket_path)
    else:
        os.environ.pop(SOCKET_ENV, None)
    runtime = f"127.0.0.1:{site.connection.runtime_port}"
    launcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "clinfed.deploy.launch",
            "--runtime-api-address",
            runtime,
            "--parent-pid",
            str(os.getpid()),
        ]
    )
    try:
        arguments[arguments.index("subprocess")] = "process"
        sys.argv = ["flower-supernode", *arguments]
        try:
            flower_supernode()
        except SystemExit as stop:
            if stop.code == _REFUSED_BY_SERVER:
                logger.error(
                    "site %s: the server refused this site's connection. Either its key is not "
                    "registered (the lab runs `flwr supernode register` with this site's public "
                    "key), or the server still lists this site as online after an unclean stop "
                    "(wait about a minute, then start the site again).",
                    site.name,
                )
            raise
    finally:
        launcher.terminate()
        if zygote is not None:
            zygote.terminate()


def run_superexec_with_approval(argv: list[str]) -> None:
    """Flower's ``flower-superexec`` that launches ClientApp tasks with ``clinfed-clientapp``."""
    from flwr.supercore.cli.flower_superexec import flower_superexec  # noqa: PLC0415
    from flwr.supercore.constant import TASK_TYPE_TO_COMMAND, TaskType  # noqa: PLC0415

    # Flower starts each task as the command this table names; make it the approval-checking
    # launcher from this same installation (same arguments, same protocol).
    installed = Path(sys.executable).parent / CLIENTAPP_COMMAND
    TASK_TYPE_TO_COMMAND[TaskType.CLIENT_APP] = (
        str(installed) if installed.exists() else CLIENTAPP_COMMAND
    )
    sys.argv = ["flower-superexec", "--insecure", *argv]
    flower_superexec()


def start_server(server: ServerDeployConfig) -> None:
    """Run the SuperLink in this process (blocks)."""
    from flwr.superlink.cli import flower_superlink  # noqa: PLC0415

    Path(server.database).parent.mkdir(parents=True, exist_ok=True)
    os.environ["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] = "1"
    sys.argv = ["flower-superlink", *server_arguments(server)]
    flower_superlink()


def run_clientapp_with_approval() -> None:
    """Entry point ``clinfed-clientapp``: Flower's ``flwr-clientapp`` plus the approval check.

    The check wraps the first thing Flower does with a pulled bundle (installing it), so a refused
    bundle is never unpacked or imported, and the refusal travels back as the task's error reply.
    """
    import flwr.supernode.runtime.run_clientapp as runtime  # noqa: PLC0415
    from flwr.supernode.cli.flwr_clientapp import flwr_clientapp  # noqa: PLC0415

    config_path = os.environ.get(APPROVAL_ENV, "")
    install = runtime.install_from_fab  # type: ignore[attr-defined]

    def install_if_approved(fab_content: bytes, *args: object, **kwargs: object) -> object:
        if not config_path:
            raise AppNotApprovedError(
                f"{APPROVAL_ENV} is not set: this site cannot check which apps are approved, so it runs none."
            )
        digest = check_app_approved(fab_content, load_site_config(config_path))
        os.environ[APP_HASH_ENV] = digest  # the audit log names the app by its verified hash
        return install(fab_content, *args, **kwargs)  # type: ignore[arg-type]

    runtime.install_from_fab = install_if_approved  # type: ignore[attr-defined,assignment]
    if poll_interval() is not None:  # the task's message pull: 20 ms retries, not 1 s
        prompt_pulls(runtime)
    sys.argv[0] = "flwr-clientapp"
    flwr_clientapp()


if __name__ == "__main__":  # the site's task launcher, started by start_site
    run_superexec_with_approval(sys.argv[1:])
