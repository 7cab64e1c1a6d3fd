"""A certificate of your own (e.g. from your company CA or Let's Encrypt) instead of the local CA:
two settings in .env and the files mounted by compose.override.yaml, as the README shows."""

from __future__ import annotations

import os
import ssl
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography import x509

from .harness import ComposeStack, start

pytestmark = pytest.mark.compose

APP_UID = 10001  # the images' trackgate user, which must be able to read the key
CA_NAME = "Example Corp test CA"
OVERRIDE = """\
services:
  init:
    volumes: ["{certs}:/etc/trackgate/certs:ro"]
  nginx:
    volumes: ["{certs}:/etc/trackgate/certs:ro"]
"""


def _issue(certs: Path) -> None:
    """A CA ("your company CA") and a server certificate for localhost signed by it, made the
    way an operator would, with openssl."""
    def openssl(*args: str) -> None:
        subprocess.run(["openssl", *args], cwd=certs, check=True, capture_output=True, timeout=60)

    ec = ("-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes")
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", f"/CN={CA_NAME}")
    openssl("req", "-new", *ec, "-keyout", "privkey.pem", "-out", "server.csr",
            "-subj", "/CN=localhost")
    (certs / "san.ext").write_text("subjectAltName=DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.pem", "-CAkey", "ca.key",
            "-CAcreateserial", "-days", "1", "-extfile", "san.ext", "-out", "server.pem")
    (certs / "fullchain.pem").write_bytes((certs / "server.pem").read_bytes()
                                          + (certs / "ca.pem").read_bytes())
    key = certs / "privkey.pem"
    os.chmod(key, 0o600)
    os.chown(key, APP_UID, APP_UID)


@pytest.fixture(scope="module")
def own_cert_stack(compose_images: None,
                   tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    work = tmp_path_factory.mktemp("own-cert")
    certs = work / "certs"
    certs.mkdir()
    certs.chmod(0o755)
    _issue(certs)
    override = work / "compose.override.yaml"
    override.write_text(OVERRIDE.format(certs=certs), encoding="utf-8")
    running = start("sqlite", work, extra_files=(str(override),), ca=certs / "ca.pem",
                    TRACKGATE_TLS_CERT="/etc/trackgate/certs/fullchain.pem",
                    TRACKGATE_TLS_KEY="/etc/trackgate/certs/privkey.pem")
    try:
        yield running
    finally:
        running.project.down(volumes=True)


def test_nginx_serves_your_certificate_and_no_local_ca_is_made(
    own_cert_stack: ComposeStack,
) -> None:
    stack = own_cert_stack
    # Verified against your CA only: the local CA would be a different, random one.
    answer = stack.get("/api/2.0/mlflow/experiments/search?max_results=1",
                       auth=("admin", stack.admin_password))
    assert answer.status_code == 200
    served = ssl.get_server_certificate(("127.0.0.1", stack.settings.https_port))
    issuer = x509.load_pem_x509_certificate(served.encode()).issuer.rfc4514_string()
    assert issuer == f"CN={CA_NAME}"
    made = stack.project.exec("nginx", "ls", "/var/lib/trackgate/tls").stdout.split()
    assert "ca.pem" not in made
