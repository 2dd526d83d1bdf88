"""Preflight for hospital IT: is this site ready to join? Checks everything, sends nothing.

Each check prints PASS or FAIL with, for a failure, what to do about it. Connectivity is tested
with a TLS handshake against the federation CA only — no data, no registration, no request.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key

from clinfed.config import SiteConfig, load_site_config
from clinfed.errors import ClinfedError

__all__ = ["CheckResult", "format_report", "run_preflight"]


@dataclass(frozen=True)
class CheckResult:
    """One preflight check: its name, whether it passed, what was found, and the fix."""

    name: str
    passed: bool
    detail: str
    fix: str = ""


def _check(name: str, fix: str, probe: Callable[[], str]) -> CheckResult:
    try:
        return CheckResult(name, True, probe())
    except (ClinfedError, OSError, ValueError, ssl.SSLError) as error:
        text = str(error).splitlines()[0] if str(error) else type(error).__name__
        return CheckResult(name, False, text, fix)


def _certificate(path: str) -> str:
    if not path:
        raise ValueError("connection.root_certificates is not set")
    cert = x509.load_pem_x509_certificate(Path(path).read_bytes())
    now = dt.datetime.now(dt.UTC)
    if not cert.not_valid_before_utc <= now <= cert.not_valid_after_utc:
        raise ValueError(
            f"{path} is not valid now (valid {cert.not_valid_before_utc:%Y-%m-%d} to "
            f"{cert.not_valid_after_utc:%Y-%m-%d})"
        )
    return (
        f"{path}: {cert.subject.rfc4514_string()}, valid until {cert.not_valid_after_utc:%Y-%m-%d}"
    )


def _auth_key(path: str) -> str:
    if not path:
        raise ValueError("connection.auth_private_key is not set")
    file = Path(path)
    key = load_ssh_private_key(file.read_bytes(), None)
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"{path} is not an EC private key")
    mode = file.stat().st_mode & 0o077
    if mode:
        raise ValueError(
            f"{path} is readable by other users (mode {oct(file.stat().st_mode & 0o777)})"
        )
    return f"{path}: EC {key.curve.name} private key, readable by its owner only"


def _connect(site: SiteConfig) -> str:
    address = site.connection.superlink
    if not address or ":" not in address:
        raise ValueError(f"connection.superlink {address!r} is not host:port")
    host, port_text = address.rsplit(":", 1)
    host = host.strip("[]")
    context = ssl.create_default_context(cafile=site.connection.root_certificates or None)
    with socket.create_connection((host, int(port_text)), timeout=5) as raw:
        if site.connection.insecure:
            return f"{address}: TCP connection OK (insecure mode: no TLS check)"
        with context.wrap_socket(raw, server_hostname=host) as tls:
            return (
                f"{address}: TLS OK ({tls.version()}), the server's certificate for {host} "
                "verified against the federation CA"
            )


def _writable(path: str, what: str) -> str:
    if not path:
        raise ValueError(f"governance.{what} is not set")
    folder = Path(path).parent
    if not folder.is_dir():
        raise ValueError(f"folder {folder} of the {what} does not exist")
    if not os.access(folder, os.W_OK):
        raise ValueError(f"folder {folder} of the {what} is not writable")
    return f"{path} (folder writable)"


def run_preflight(config_path: Path) -> list[CheckResult]:
    """Run every check on the site config at ``config_path``."""
    try:
        site = load_site_config(config_path)
    except ClinfedError as error:
        return [
            CheckResult(
                "site config", False, str(error), "fix the key named above in the site config"
            )
        ]
    results = [CheckResult("site config", True, f"{config_path}: site {site.name}")]

    from clinfed.client.site import describe_site  # noqa: PLC0415 - imports torch

    results.append(
        _check(
            "site data",
            "fix the data file or the schema as the message says",
            lambda: describe_site(site),
        )
    )
    g = site.governance

    def policy() -> str:
        from clinfed.client.policy import load_site_policy  # noqa: PLC0415

        if not g.policy:
            raise ValueError("governance.policy is not set: a deployed site must have a policy")
        p = load_site_policy(g.policy)
        return f"{g.policy}: total budget epsilon {p.budget.epsilon:g} at delta {p.budget.delta:g}"

    results.append(
        _check("site policy", "set governance.policy to the hospital's policy file", policy)
    )

    def ledger() -> str:
        from clinfed.client.policy import load_site_policy  # noqa: PLC0415
        from clinfed.privacy.ledger import PrivacyLedger  # noqa: PLC0415

        detail = _writable(g.ledger, "ledger")
        if Path(g.ledger).exists() and g.policy:
            b = load_site_policy(g.policy).budget
            with PrivacyLedger.open(g.ledger) as led:
                spent = led.spent(delta=b.delta, accountant=b.accountant)
            return f"{detail}; epsilon spent {spent:.4g} of {b.epsilon:g}"
        return f"{detail}; new ledger"

    results.append(
        _check("privacy ledger", "create the folder, writable by the site's user", ledger)
    )

    def audit() -> str:
        from clinfed.client.audit import verify_audit_log  # noqa: PLC0415

        detail = _writable(g.audit_log, "audit log")
        if Path(g.audit_log).exists():
            report = verify_audit_log(g.audit_log)
            if not report.ok:
                raise ValueError(f"audit log damaged at line {report.line}: {report.problem}")
            return f"{detail}; chain of {report.entries} entries verified"
        return f"{detail}; new log"

    results.append(
        _check(
            "audit log",
            "create the folder; keep a damaged log as evidence and start a new one",
            audit,
        )
    )

    def approved() -> str:
        if not site.approved_apps:
            raise ValueError("approved_apps is empty: this site would refuse every app")
        return f"{len(site.approved_apps)} approved app hash(es)"

    results.append(
        _check(
            "approved apps",
            "add the reviewed app's hash (clinfed app-hash) to approved_apps",
            approved,
        )
    )
    if site.connection.insecure:
        results.append(
            CheckResult(
                "TLS",
                False,
                "connection.insecure is true: no TLS, no authentication",
                "local development only; set insecure: false",
            )
        )
    else:
        results.append(
            _check(
                "federation CA",
                "copy the federation's ca.pem from the coordinating lab",
                lambda: _certificate(site.connection.root_certificates),
            )
        )
        results.append(
            _check(
                "site key",
                "create it with `clinfed pki site-key` and `chmod 600` it; send only the .pub to the lab",
                lambda: _auth_key(site.connection.auth_private_key),
            )
        )
    results.append(
        _check(
            "server reachable",
            "check connection.superlink, the firewall (outbound only) and that the CA matches the server",
            lambda: _connect(site),
        )
    )
    return results


def format_report(results: list[CheckResult]) -> str:
    """PASS/FAIL lines, with the fix under each failure and a verdict at the end."""
    lines = []
    for r in results:
        lines.append(f"{'PASS' if r.passed else 'FAIL'}  {r.name}: {r.detail}")
        if not r.passed and r.fix:
            lines.append(f"      fix: {r.fix}")
    failed = sum(not r.passed for r in results)
    lines.append(
        "preflight passed: this site is ready"
        if not failed
        else f"preflight FAILED: {failed} problem(s) above"
    )
    return "\n".join(lines)
