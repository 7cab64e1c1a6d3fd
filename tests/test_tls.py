"""TLS by default (a local CA), or the operator's own certificate; clear errors for bad paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import requests
from cryptography import x509
from trackgate.settings import Settings
from trackgate.tls import ensure_certificates

from .support import clean_env, running_stack


def _san(path: Path) -> list[str]:
    cert = x509.load_pem_x509_certificate(path.read_bytes())
    return cert.extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    ).value.get_values_for_type(x509.DNSName)


def test_the_local_ca_issues_for_every_host_name_and_reissues_when_names_change(
    tmp_path: Path,
) -> None:
    settings = Settings(data_dir=tmp_path, hostname="mlflow.example.com")
    assert ensure_certificates(settings) is True
    assert _san(settings.cert_file) == ["mlflow.example.com"]
    assert ensure_certificates(settings) is False  # nothing to do the second time
    ca_before = settings.ca_cert.read_bytes()
    server_before = settings.cert_file.read_bytes()
    # The CA may only certify its names: a new name needs a new CA, which clients trust again.
    wider = Settings(
        data_dir=tmp_path, hostname="mlflow.example.com", extra_hostnames="ml.internal"
    )
    reasons: list[str] = []
    assert ensure_certificates(wider, on_new_ca=reasons.append) is True
    assert reasons == ["the host names changed beyond what the CA may certify"]
    assert sorted(_san(wider.cert_file)) == ["ml.internal", "mlflow.example.com"]
    assert wider.ca_cert.read_bytes() != ca_before
    # Fewer names stay within the constraints: same CA, new server certificate.
    ca_wide = wider.ca_cert.read_bytes()
    assert ensure_certificates(settings, on_new_ca=reasons.append) is True
    assert settings.ca_cert.read_bytes() == ca_wide and len(reasons) == 1
    assert settings.cert_file.read_bytes() != server_before
    assert oct(wider.key_file.stat().st_mode & 0o777) == "0o600"
    # The CA key is kept apart from what nginx reads.
    assert not (tmp_path / "tls" / "ca.key").exists()
    assert oct((tmp_path / "tls" / "ca-key").stat().st_mode & 0o777) == "0o700"
    assert oct((tmp_path / "tls" / "ca-key" / "ca.key").stat().st_mode & 0o777) == "0o600"


def test_the_operators_own_certificate_is_served(tmp_path: Path) -> None:
    own = tmp_path / "own"
    own.mkdir()
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            "2",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-keyout",
            str(own / "key.pem"),
            "-out",
            str(own / "cert.pem"),
        ],
        check=True,
        capture_output=True,
    )
    with running_stack(
        tmp_path / "data", tls_cert=own / "cert.pem", tls_key=own / "key.pem"
    ) as stack:
        response = requests.get(stack.url + "/health", verify=str(own / "cert.pem"), timeout=30)
        assert response.status_code == 200
        assert not stack.settings.ca_cert.exists()  # no local CA was made


def test_a_missing_certificate_file_is_a_clear_error(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trackgate", "up"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(
            TRACKGATE_DATA_DIR=str(tmp_path),
            TRACKGATE_TLS_CERT=str(tmp_path / "nope.pem"),
            TRACKGATE_TLS_KEY=str(tmp_path / "nope.key"),
            TRACKGATE_HTTPS_PORT="18999",
            TRACKGATE_HTTP_PORT="18998",
        ),
    )
    assert result.returncode == 1
    assert "TLS certificate" in result.stderr and "not found" in result.stderr
    assert "Traceback" not in result.stderr
