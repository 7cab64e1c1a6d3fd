"""Attacks that already failed before issue 12, kept in the security tier so they stay failed:
request smuggling, Host spoofing, identity-header spoofing and path traversal, each sent raw to
the real nginx (the auth matrix over every path family is tests/test_auth_matrix.py)."""

from __future__ import annotations

import base64
import socket
import ssl

import pytest

from ..support import RunningStack, fresh_source_ip

pytestmark = pytest.mark.security


def _raw(stack: RunningStack, request: bytes, server_name: str = "localhost") -> bytes:
    context = ssl.create_default_context(cafile=str(stack.ca))
    context.check_hostname = False
    raw = socket.create_connection(("127.0.0.1", stack.settings.https_port), timeout=20,
                                   source_address=(fresh_source_ip(), 0))
    with context.wrap_socket(raw, server_hostname=server_name) as conn:
        conn.sendall(request)
        chunks = []
        try:
            while chunk := conn.recv(65536):
                chunks.append(chunk)
        except (TimeoutError, ssl.SSLError, ConnectionResetError):
            pass
    return b"".join(chunks)


def _auth(stack: RunningStack) -> str:
    return base64.b64encode(f"admin:{stack.admin_password}".encode()).decode()


def test_conflicting_length_headers_are_refused_not_smuggled(stack: RunningStack) -> None:
    smuggled = (b"GET /api/2.0/mlflow/experiments/search HTTP/1.1\r\nHost: localhost\r\n\r\n")
    body = b"0\r\n\r\n" + smuggled
    answer = _raw(stack, (
        f"POST /health HTTP/1.1\r\nHost: localhost:{stack.settings.https_port}\r\n"
        f"Content-Length: {len(body)}\r\nTransfer-Encoding: chunked\r\n"
        "Connection: close\r\n\r\n").encode() + body)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:200]
    assert answer.count(b"HTTP/1.1 ") == 1  # no second, smuggled answer


@pytest.mark.parametrize("host", ["evil.example", "localhost.evil.example", "127.0.0.1"])
def test_an_unknown_host_gets_no_answer(stack: RunningStack, host: str) -> None:
    answer = _raw(stack, (f"GET /api/2.0/mlflow/experiments/search HTTP/1.1\r\nHost: {host}\r\n"
                          f"Authorization: Basic {_auth(stack)}\r\nConnection: close\r\n\r\n"
                          ).encode(), server_name=host if "." in host else "localhost")
    assert answer == b""  # 444: the connection closes without a byte


@pytest.mark.parametrize("header", ["X-Trackgate-User", "X-Remote-User", "Remote-User",
                                    "X-Forwarded-User"])
def test_identity_headers_from_the_client_do_not_log_in(stack: RunningStack,
                                                        header: str) -> None:
    answer = stack.get("/api/2.0/mlflow/experiments/search?max_results=1",
                       headers={header: "admin"})
    assert answer.status_code == 401


@pytest.mark.parametrize("path", [
    "/api/2.0/mlflow-artifacts/artifacts/../../../../etc/passwd",
    "/api/2.0/mlflow-artifacts/artifacts/%2e%2e/%2e%2e/%2e%2e/etc/passwd",
    "/api/2.0/mlflow-artifacts/artifacts/..%2f..%2f..%2fetc%2fpasswd",
    "/api/2.0/mlflow-artifacts/artifacts/%2Fetc%2Fpasswd",
    "/get-artifact?path=../../../../etc/passwd&run_uuid=0",
    "/static-files/../../../../etc/passwd",
])
def test_traversal_reads_nothing_outside_the_artifact_store(stack: RunningStack,
                                                            path: str) -> None:
    answer = _raw(stack, (f"GET {path} HTTP/1.1\r\nHost: localhost:{stack.settings.https_port}\r\n"
                          f"Authorization: Basic {_auth(stack)}\r\nConnection: close\r\n\r\n"
                          ).encode())
    assert b"root:x:0:0" not in answer
