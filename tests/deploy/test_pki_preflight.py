"""PKI and preflight, without a server: fast checks of the key material and the report."""

from __future__ import annotations

import socket
import ssl
import threading
from pathlib import Path

import pytest
from cryptography import x509

from clinfed.deploy.pki import create_federation_pki
from clinfed.deploy.preflight import format_report, run_preflight
from clinfed.errors import ConfigError

REPO = Path(__file__).resolve().parents[2]


def test_pki_creates_a_ca_signed_server_certificate_with_the_names_given(tmp_path: Path) -> None:
    pki = create_federation_pki(
        tmp_path, server_hosts=["fl.lab.example", "127.0.0.1"], sites=["paris"]
    )

    ca = x509.load_pem_x509_certificate(pki.ca_certificate.read_bytes())
    server = x509.load_pem_x509_certificate(pki.server_certificate.read_bytes())
    server.verify_directly_issued_by(ca)
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["fl.lab.example"]
    assert [str(ip) for ip in san.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    private, public = pki.site_keys["paris"]
    assert private.stat().st_mode & 0o077 == 0 and public.read_text().startswith(
        "ecdsa-sha2-nistp384 "
    )


def test_pki_never_overwrites_key_material(tmp_path: Path) -> None:
    create_federation_pki(tmp_path, server_hosts=["localhost"], sites=[])

    with pytest.raises(ConfigError, match="refusing to overwrite"):
        create_federation_pki(tmp_path, server_hosts=["localhost"], sites=[])


def _tls_server(pki_dir: Path) -> tuple[int, threading.Event]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(
        pki_dir / "server" / "server.pem", pki_dir / "server" / "server-key.pem"
    )
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    stop = threading.Event()

    def serve() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            try:
                with context.wrap_socket(conn, server_side=True):
                    pass
            except (ssl.SSLError, OSError):
                pass
        listener.close()

    threading.Thread(target=serve, daemon=True).start()
    return listener.getsockname()[1], stop


def _site_yaml(tmp_path: Path, pki_dir: Path, port: int, **extra: str) -> Path:
    state = tmp_path / "state"
    state.mkdir(exist_ok=True)
    lines = {
        "name": "paris",
        "approved_apps": "['" + "a" * 64 + "']",
        **extra,
    }
    text = "\n".join(f"{k}: {v}" for k, v in lines.items())
    text += f"""
data:
  path: {REPO}/data/heart-disease/sites/cleveland.csv
  schema: {REPO}/data/heart-disease/schema-binary.yaml
connection:
  superlink: 127.0.0.1:{port}
  root_certificates: {pki_dir}/sites/paris/ca.pem
  auth_private_key: {pki_dir}/sites/paris/auth-key
governance:
  policy: {REPO}/conf/policies/demo-policy.yaml
  ledger: {state}/ledger.jsonl
  audit_log: {state}/audit.jsonl
"""
    path = tmp_path / "site.yaml"
    path.write_text(text)
    return path


def test_preflight_passes_a_ready_site(tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    create_federation_pki(pki_dir, server_hosts=["127.0.0.1"], sites=["paris"])
    port, stop = _tls_server(pki_dir)
    try:
        results = run_preflight(_site_yaml(tmp_path, pki_dir, port))
    finally:
        stop.set()

    assert all(r.passed for r in results), format_report(results)
    assert format_report(results).endswith("preflight passed: this site is ready")


def test_preflight_names_each_problem_and_its_fix(tmp_path: Path) -> None:
    pki_dir = tmp_path / "pki"
    create_federation_pki(pki_dir, server_hosts=["127.0.0.1"], sites=["paris"])
    other = tmp_path / "other"
    create_federation_pki(
        other, server_hosts=["127.0.0.1"], sites=[]
    )  # a CA the server does not use
    port, stop = _tls_server(pki_dir)
    site = _site_yaml(tmp_path, pki_dir, port, approved_apps="[]")
    site.write_text(site.read_text().replace(f"{pki_dir}/sites/paris/ca.pem", f"{other}/ca/ca.pem"))
    (pki_dir / "sites" / "paris" / "auth-key").chmod(0o644)
    try:
        results = run_preflight(site)
    finally:
        stop.set()

    failed = {r.name: r for r in results if not r.passed}
    assert set(failed) == {"approved apps", "site key", "server reachable"}, format_report(results)
    assert "readable by other users" in failed["site key"].detail
    assert "CERTIFICATE_VERIFY_FAILED" in failed["server reachable"].detail
    assert all(r.fix for r in failed.values())
    assert "preflight FAILED: 3 problem(s)" in format_report(results)
