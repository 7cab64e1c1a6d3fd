"""Attacks 10 and 11 of issue 12 against a running stack.

11: MLflow's secret store (AI gateway API keys) used MLflow's public default passphrase. Now
each install generates its own, 0600 beside the other secrets, handed only to the tracking
server. 10: the local CA users trust was unconstrained, ten years long, its key next to the
server. Now it is limited to the configured names (tests/test_local_ca.py forges certificates
with its key) and its key lives apart, root's alone when the stack is started by root."""

from __future__ import annotations

import os
import ssl
import stat
import subprocess
import sys
from collections.abc import Iterator

import pytest
from cryptography import x509
from trackgate.provision import kek_passphrase_file
from trackgate.tls import ca_key_file

from ..support import RunningStack, clean_env, running_stack

pytestmark = pytest.mark.security


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("secrets-stack")) as running:
        yield running


def test_mlflow_secrets_are_not_under_the_public_default_passphrase(stack: RunningStack) -> None:
    user = stack.new_user("anyone")
    response = stack.get("/ajax-api/3.0/mlflow/gateway/secrets/config", auth=user)
    assert response.status_code == 200, response.text
    assert response.json()["using_default_passphrase"] is False


def test_the_passphrase_is_one_per_install_and_private(stack: RunningStack) -> None:
    path = kek_passphrase_file(stack.settings)
    passphrase = path.read_text().strip()
    assert len(passphrase) >= 40
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    # Nowhere a user or another process reads: not in the settings, config or nginx files.
    layout = subprocess.run(
        [sys.executable, "-m", "trackgate", "config", "--json"],
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(**stack.settings.to_env()),
    )
    assert layout.returncode == 0, layout.stderr
    assert passphrase not in layout.stdout
    for public in stack.settings.run_dir.rglob("*"):
        if public.is_file():
            assert passphrase not in public.read_text(errors="replace"), public


def test_the_served_certificate_comes_from_a_name_constrained_short_lived_ca(
    stack: RunningStack,
) -> None:
    pem = ssl.get_server_certificate(("127.0.0.1", stack.settings.https_port))
    leaf = x509.load_pem_x509_certificate(pem.encode())
    ca = x509.load_pem_x509_certificate(stack.settings.ca_cert.read_bytes())
    assert leaf.issuer == ca.subject
    constraints = ca.extensions.get_extension_for_class(x509.NameConstraints).value
    permitted = {n.value for n in constraints.permitted_subtrees or []}
    assert permitted == set(stack.settings.server_names)
    assert (ca.not_valid_after_utc - ca.not_valid_before_utc).days <= 731


def test_the_ca_key_is_kept_apart_from_the_server(stack: RunningStack) -> None:
    key = ca_key_file(stack.settings)
    assert key.is_file() and not (stack.settings.tls_dir / "ca.key").exists()
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    assert stat.S_IMODE(key.parent.stat().st_mode) == 0o700
    assert "ca-key" not in stack.settings.nginx_conf.read_text()
    if os.geteuid() == 0:  # the servers and nginx workers run as the service account
        for path in (key, key.parent):
            assert (path.stat().st_uid, path.stat().st_gid) == (0, 0)
        service_uid, service_gid = stack.settings.data_dir.stat()[4:6]
        assert service_uid != 0
        probe = subprocess.run(
            [
                "setpriv",
                f"--reuid={service_uid}",
                f"--regid={service_gid}",
                "--clear-groups",
                "cat",
                str(key),
            ],
            capture_output=True,
            timeout=30,
        )
        assert probe.returncode != 0 and b"PRIVATE KEY" not in probe.stdout
