"""The local CA is narrow (attack 10 of issue 12): name-constrained to the configured names,
two years, its key apart; a stolen CA key mints nothing a client accepts for other names."""

from __future__ import annotations

import datetime as dt
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError
from trackgate import tls
from trackgate.settings import Settings


def _load(settings: Settings) -> tuple[x509.Certificate, x509.Certificate, object]:
    ca = x509.load_pem_x509_certificate(settings.ca_cert.read_bytes())
    leaf = x509.load_pem_x509_certificate(settings.cert_file.read_bytes())
    key = serialization.load_pem_private_key(tls.ca_key_file(settings).read_bytes(), None)
    return ca, leaf, key


def _forge(ca: x509.Certificate, ca_key: object, name: str) -> x509.Certificate:
    """What an attacker holding the CA key would issue."""
    key = ec.generate_private_key(ec.SECP256R1())
    try:
        general: x509.GeneralName = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        general = x509.DNSName(name)
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .add_extension(x509.SubjectAlternativeName([general]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]
    )


def _verify(ca: x509.Certificate, leaf: x509.Certificate, name: str) -> None:
    try:
        subject: x509.verification.Subject = x509.IPAddress(ipaddress.ip_address(name))
    except ValueError:
        subject = x509.DNSName(name)
    verifier = PolicyBuilder().store(Store([ca])).build_server_verifier(subject)
    verifier.verify(leaf, [])


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    s = Settings(data_dir=tmp_path, hostname="mlflow.example.com", extra_hostnames="10.1.2.3")
    tls.ensure_certificates(s)
    return s


def test_the_server_certificate_verifies_for_every_configured_name(settings: Settings) -> None:
    ca, leaf, _ = _load(settings)
    for name in ("mlflow.example.com", "10.1.2.3"):
        _verify(ca, leaf, name)


@pytest.mark.parametrize(
    "name", ["bank.example.com", "example.com", "login.microsoftonline.com", "10.1.2.4", "::1"]
)
def test_a_stolen_ca_key_mints_nothing_clients_accept_for_other_names(
    settings: Settings, name: str
) -> None:
    ca, _, ca_key = _load(settings)
    with pytest.raises(VerificationError):
        _verify(ca, _forge(ca, ca_key, name), name)


def test_without_an_ip_name_the_ca_may_certify_no_ip_address(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, hostname="localhost")
    tls.ensure_certificates(s)
    ca, leaf, ca_key = _load(s)
    _verify(ca, leaf, "localhost")
    for ip in ("127.0.0.1", "192.0.2.1"):
        with pytest.raises(VerificationError):
            _verify(ca, _forge(ca, ca_key, ip), ip)


def test_with_only_ip_names_the_ca_may_certify_no_dns_name(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, hostname="192.0.2.10")
    tls.ensure_certificates(s)
    ca, leaf, ca_key = _load(s)
    _verify(ca, leaf, "192.0.2.10")
    with pytest.raises(VerificationError):
        _verify(ca, _forge(ca, ca_key, "example.com"), "example.com")


def test_lifetimes_are_short_and_the_leaf_never_outlives_the_ca(settings: Settings) -> None:
    ca, leaf, _ = _load(settings)
    assert ca.not_valid_after_utc - ca.not_valid_before_utc <= dt.timedelta(days=731)
    assert leaf.not_valid_after_utc - leaf.not_valid_before_utc <= dt.timedelta(days=398)
    assert leaf.not_valid_after_utc <= ca.not_valid_after_utc
    constraints = ca.extensions.get_extension_for_class(x509.NameConstraints)
    assert constraints.critical


def test_an_old_unconstrained_ca_is_replaced_and_its_key_deleted(tmp_path: Path) -> None:
    s = Settings(data_dir=tmp_path, hostname="localhost")
    # What an install from before name constraints holds: tls/ca.key and a broad CA.
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "old trackgate CA")])
    now = dt.datetime.now(dt.UTC)
    old = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .sign(key, hashes.SHA256())
    )
    s.tls_dir.mkdir(parents=True)
    s.ca_cert.write_bytes(old.public_bytes(serialization.Encoding.PEM))
    old_key = s.tls_dir / "ca.key"
    old_key.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    reasons: list[str] = []
    assert tls.ensure_certificates(s, on_new_ca=reasons.append) is True
    assert reasons == ["the CA was not limited to this server's names"]
    assert not old_key.exists()
    ca, leaf, _ = _load(s)
    assert ca.subject != old.subject or ca.serial_number != old.serial_number
    _verify(ca, leaf, "localhost")


def test_a_ca_near_its_end_is_replaced(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> None:
    later = dt.datetime.now(dt.UTC) + dt.timedelta(days=700)
    monkeypatch.setattr(tls, "_now", lambda: later)
    reasons: list[str] = []
    assert tls.ensure_certificates(settings, on_new_ca=reasons.append) is True
    assert reasons == ["the CA expires soon"]
