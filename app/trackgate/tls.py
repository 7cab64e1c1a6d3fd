"""TLS by default: a local CA and a server certificate for the configured host names.

Clients trust the CA certificate (`MLFLOW_TRACKING_SERVER_CERT_PATH`), not a self-signed leaf,
so the server certificate can be renewed without touching clients. The CA may only certify the
configured names, so a host name it does not cover means a new CA (see CA_DAYS below).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
from collections.abc import Callable
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from .settings import Settings

# The local CA is trusted by users' browsers, so it is kept narrow: it may only certify this
# server's own names (x509 NameConstraints, which clients enforce), it lives two years rather
# than ten, and its key stays out of the server's way (tls/ca-key/, 0700/0600, never named in
# nginx's config). A stolen CA key can then mint nothing the server's own key cannot already
# serve. Names outside the constraints (a new host name) need a new CA, which clients must
# trust again; so does a CA near its end.
CA_DAYS = 730
SERVER_DAYS = 397  # the longest lifetime browsers accept for a leaf certificate
RENEW_BEFORE = dt.timedelta(days=30)
CA_RENEW_BEFORE = dt.timedelta(days=60)


class TLSError(RuntimeError):
    """A certificate problem with a message that says what to do."""


def ca_key_file(settings: Settings) -> Path:
    """Where the local CA's key is kept, apart from what nginx reads."""
    return settings.ca_key


def ensure_certificates(settings: Settings, on_new_ca: Callable[[str], None] | None = None) -> bool:
    """Make sure nginx has a certificate and key; return True if anything was (re)issued.

    ON_NEW_CA is told why when a new CA was made (clients must trust the new ca.pem).
    """
    if not settings.uses_local_ca:
        for label, path in (("certificate", settings.tls_cert), ("key", settings.tls_key)):
            if path is None or not Path(path).is_file():
                raise TLSError(
                    f"TLS {label} {path} not found: set TRACKGATE_TLS_CERT and TRACKGATE_TLS_KEY "
                    "to readable PEM files, or unset both to use a generated local CA"
                )
        return False
    settings.tls_dir.mkdir(parents=True, exist_ok=True)
    key_path = ca_key_file(settings)
    key_path.parent.mkdir(mode=0o700, exist_ok=True)
    os.chmod(key_path.parent, 0o700)
    names = settings.server_names
    reason = _needs_new_ca(settings, key_path, names)
    if reason:
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _issue_ca(ca_key, settings.hostname, names)
        _write_key(key_path, ca_key)
        settings.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        # A key from before name constraints could still sign for any name: it goes.
        (settings.tls_dir / "ca.key").unlink(missing_ok=True)
        if on_new_ca is not None:
            on_new_ca(reason)
    _keep_apart(key_path)
    ca_cert = x509.load_pem_x509_certificate(settings.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
    if reason or _needs_server_cert(settings.cert_file, names, ca_cert):
        server_key = ec.generate_private_key(ec.SECP256R1())
        cert = _issue_server(server_key, names, ca_cert, ca_key)  # type: ignore[arg-type]
        _write_key(settings.key_file, server_key)
        chain = cert.public_bytes(serialization.Encoding.PEM) + settings.ca_cert.read_bytes()
        settings.cert_file.write_bytes(chain)
        return True
    return False


def _keep_apart(key_path: Path) -> None:
    """As root, the CA key belongs to root alone: the servers' account (nginx workers included)
    cannot read it; only `trackgate tls`/`up`/`prepare`, run by root, issue certificates."""
    if os.geteuid() != 0:
        return
    for path in (key_path.parent, key_path):
        os.chown(path, 0, 0, follow_symlinks=False)


def _needs_new_ca(settings: Settings, key_path: Path, names: list[str]) -> str | None:
    """Why the local CA must be replaced, or None if it can keep issuing for NAMES."""
    if not settings.ca_cert.is_file():
        return "no local CA yet"
    try:
        cert = x509.load_pem_x509_certificate(settings.ca_cert.read_bytes())
        constraints = cert.extensions.get_extension_for_class(x509.NameConstraints).value
    except (ValueError, x509.ExtensionNotFound):
        return "the CA was not limited to this server's names"
    if not key_path.is_file():
        return "the CA key is missing"
    if cert.not_valid_after_utc - _now() < CA_RENEW_BEFORE:
        return "the CA expires soon"
    permitted = set(constraints.permitted_subtrees or [])
    if not set(_name_constraints(names).permitted_subtrees or []) <= permitted:
        return "the host names changed beyond what the CA may certify"
    return None


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    data = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.chmod(path, 0o600)


def _name_constraints(names: list[str]) -> x509.NameConstraints:
    """Only these names and addresses. A kind of name with nothing permitted is shut off: no IP
    address at all, or DNS names only under the reserved `.invalid`."""
    dns: list[x509.GeneralName] = []
    ips: list[x509.GeneralName] = []
    for name in names:
        try:
            ips.append(x509.IPAddress(ipaddress.ip_network(name)))
        except ValueError:
            dns.append(x509.DNSName(name))
    excluded: list[x509.GeneralName] = []
    if not ips:
        excluded = [
            x509.IPAddress(ipaddress.ip_network("0.0.0.0/0")),
            x509.IPAddress(ipaddress.ip_network("::/0")),
        ]
    if not dns:
        dns = [x509.DNSName("invalid")]
    return x509.NameConstraints(permitted_subtrees=dns + ips, excluded_subtrees=excluded or None)


def _issue_ca(key: ec.EllipticCurvePrivateKey, hostname: str, names: list[str]) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, f"trackgate local CA ({hostname})")])
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_name_constraints(names), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )


def _san(names: list[str]) -> x509.SubjectAlternativeName:
    entries: list[x509.GeneralName] = []
    for name in names:
        try:
            entries.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            entries.append(x509.DNSName(name))
    return x509.SubjectAlternativeName(entries)


def _issue_server(
    key: ec.EllipticCurvePrivateKey,
    names: list[str],
    ca_cert: x509.Certificate,
    ca_key: ec.EllipticCurvePrivateKey,
) -> x509.Certificate:
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, names[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(min(_now() + dt.timedelta(days=SERVER_DAYS), ca_cert.not_valid_after_utc))
        .add_extension(_san(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )


def _needs_server_cert(path: Path, names: list[str], ca_cert: x509.Certificate) -> bool:
    """True if the certificate is missing, expiring, from another CA, or for other names."""
    try:
        cert = x509.load_pem_x509_certificate(path.read_bytes())
    except (FileNotFoundError, ValueError):
        return True
    if cert.issuer != ca_cert.subject or cert.not_valid_after_utc - _now() < RENEW_BEFORE:
        return True
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return True
    return set(san) != set(_san(names))
