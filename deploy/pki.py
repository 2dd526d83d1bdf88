"""The federation's PKI, built with the ``cryptography`` package.

* A **federation CA** (ECDSA P-384, self-signed) held by the coordinating lab. It signs the
  server's TLS certificate; sites trust it (``root_certificates``) to know they talk to the real
  server.
* The **server's TLS certificate**, with subject alternative names (DNS names and IP addresses)
  from the command line, so that sites can verify the host they dial.
* One **authentication key pair per site** (ECDSA P-384 in OpenSSH format, as Flower's SuperNode
  authentication expects). A hospital should create its own (``clinfed pki site-key``): the
  private key never leaves the hospital, the lab registers only the public key.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from clinfed.errors import ConfigError

__all__ = ["FederationPKI", "create_federation_pki", "create_site_key"]

_CURVE = ec.SECP384R1()


@dataclass(frozen=True)
class FederationPKI:
    """Where :func:`create_federation_pki` put everything."""

    ca_certificate: Path
    ca_key: Path
    server_certificate: Path
    server_key: Path
    site_keys: dict[str, tuple[Path, Path]]  # name -> (private key, public key)


def _write(path: Path, data: bytes, *, secret: bool) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists():
        raise ConfigError(
            f"{path} already exists; refusing to overwrite key material. Use a new folder."
        )
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL
    fd = os.open(path, flags, 0o600 if secret else 0o644)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "clinfed federation"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(hosts: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for host in hosts:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            if not host or any(c in host for c in " /:"):
                raise ConfigError(
                    f"server host {host!r} is neither an IP address nor a DNS name; "
                    "use e.g. --server-host fl.lab.example.org --server-host 10.0.0.5."
                ) from None
            entries.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(entries)


def create_site_key(folder: Path, *, name: str) -> tuple[Path, Path]:
    """Create a site's authentication key pair: ``auth-key`` (secret) and ``auth-key.pub``."""
    key = ec.generate_private_key(_CURVE)
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    private_path, public_path = folder / "auth-key", folder / "auth-key.pub"
    _write(private_path, private, secret=True)
    _write(public_path, public + f" clinfed-site-{name}\n".encode(), secret=False)
    return private_path, public_path


def create_federation_pki(
    folder: Path, *, server_hosts: list[str], sites: list[str], valid_days: int = 825
) -> FederationPKI:
    """Create the CA, the server certificate for ``server_hosts`` and a key pair per site."""
    if not server_hosts:
        raise ConfigError("give at least one --server-host (the name or IP sites will dial).")
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(_CURVE)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("clinfed federation CA"))
        .issuer_name(_name("clinfed federation CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(_CURVE)
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(server_hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=valid_days))
        .add_extension(_san(server_hosts), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    ca_cert_path, ca_key_path = folder / "ca" / "ca.pem", folder / "ca" / "ca-key.pem"
    server_cert_path, server_key_path = (
        folder / "server" / "server.pem",
        folder / "server" / "server-key.pem",
    )
    key_format = (serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    _write(ca_key_path, ca_key.private_bytes(pem, *key_format), secret=True)
    _write(ca_cert_path, ca_cert.public_bytes(pem), secret=False)
    _write(server_key_path, server_key.private_bytes(pem, *key_format), secret=True)
    _write(server_cert_path, server_cert.public_bytes(pem), secret=False)
    _write(folder / "server" / "ca.pem", ca_cert.public_bytes(pem), secret=False)
    site_keys = {}
    for site in sites:
        site_folder = folder / "sites" / site
        site_keys[site] = create_site_key(site_folder, name=site)
        _write(site_folder / "ca.pem", ca_cert.public_bytes(pem), secret=False)
    return FederationPKI(ca_cert_path, ca_key_path, server_cert_path, server_key_path, site_keys)
