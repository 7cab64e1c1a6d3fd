"""nginx is the Host guard: only configured names get an answer, with or without a port."""

from __future__ import annotations

import socket
import ssl
import subprocess

import pytest

from .support import RunningStack


def _curl(stack: RunningStack, url: str, host: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "curl",
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--cacert",
            str(stack.ca),
            "-H",
            f"Host: {host}",
            "-u",
            f"admin:{stack.admin_password}",
            *args,
            url,
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )


@pytest.mark.parametrize("host_form", ["{name}", "{name}:{port}"])
def test_configured_host_is_served_with_and_without_port(
    stack: RunningStack, host_form: str
) -> None:
    host = host_form.format(name="localhost", port=stack.settings.https_port)
    result = _curl(stack, stack.url + "/api/2.0/mlflow/experiments/search?max_results=1", host)
    assert result.stdout == "200", result.stderr


@pytest.mark.parametrize("host", ["evil.example", "evil.example:443", "127.0.0.1"])
def test_spoofed_host_gets_no_answer_over_https(stack: RunningStack, host: str) -> None:
    result = _curl(stack, stack.url + "/", host)
    # 444: nginx closes the connection without a response.
    assert result.stdout == "000"
    assert "Empty reply" in result.stderr or "closed" in result.stderr.lower() or result.returncode


def test_spoofed_host_gets_no_answer_over_http(stack: RunningStack) -> None:
    url = f"http://localhost:{stack.settings.http_port}/"
    result = subprocess.run(
        ["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "-H", "Host: evil.example", url],
        capture_output=True,
        text=True,
    )
    assert result.stdout == "000"
    assert result.returncode == 52  # curl: empty reply from server


def test_sni_for_unknown_name_still_reaches_only_the_guard(stack: RunningStack) -> None:
    context = ssl.create_default_context(cafile=str(stack.ca))
    context.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", stack.settings.https_port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="evil.example") as tls,
    ):
        tls.sendall(b"GET /health HTTP/1.1\r\nHost: evil.example\r\nConnection: close\r\n\r\n")
        assert tls.recv(100) == b""
