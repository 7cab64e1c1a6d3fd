"""The lean server that serves the auth gateway (server/lean.py), on a Unix socket of its own:
keep-alive for nginx, the WSGI environ the gateway reads, and hostile header spellings dropped."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from trackgate.local.probe import internal_connection
from trackgate.server.lean import LeanServer

Seen = list[dict[str, Any]]


def _echo(seen: Seen) -> Any:
    def app(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(environ)
        body = environ["PATH_INFO"].encode("latin-1")
        start_response("204 No Content" if environ["PATH_INFO"] == "/auth" else "200 OK",
                       [("X-Seen-Ip", environ.get("HTTP_X_REAL_IP", "-"))])
        return [b"" if environ["PATH_INFO"] == "/auth" else body]
    return app


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[str, Seen]]:
    seen: Seen = []
    address = f"unix:{tmp_path / 'gateway.sock'}"
    server = LeanServer(_echo(seen), address, threads=4)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    for _ in range(200):
        if (tmp_path / "gateway.sock").exists():
            break
        threading.Event().wait(0.01)
    yield address, seen
    server.stop()
    thread.join(10)
    assert not thread.is_alive()


def test_one_connection_carries_many_requests_with_the_headers_the_gateway_reads(
        served: tuple[str, Seen]) -> None:
    address, seen = served
    conn = internal_connection(address, timeout=5)
    for i in range(3):
        conn.request("GET", f"/auth?n={i}", headers={"Authorization": "Basic eA==",
                                                      "X-Real-IP": "192.0.2.7"})
        answer = conn.getresponse()
        assert (answer.status, answer.read()) == (204, b"")
        assert answer.getheader("X-Seen-Ip") == "192.0.2.7"
    conn.close()
    assert [e["QUERY_STRING"] for e in seen] == ["n=0", "n=1", "n=2"]
    assert seen[0]["HTTP_AUTHORIZATION"] == "Basic eA=="
    assert seen[0]["REQUEST_METHOD"] == "GET" and seen[0]["PATH_INFO"] == "/auth"


def test_an_underscore_spelling_cannot_pose_as_a_header_nginx_sets(
        served: tuple[str, Seen]) -> None:
    # nginx sets X-Real-IP; a client's "X_Real_IP" would map to the same WSGI key.
    address, seen = served
    path = address.removeprefix("unix:")
    with socket.socket(socket.AF_UNIX) as sock:
        sock.connect(path)
        sock.sendall(b"GET /auth HTTP/1.1\r\nHost: g\r\nX_Real_IP: 6.6.6.6\r\n"
                     b"Connection: close\r\n\r\n")
        reply = sock.makefile("rb").read()
    assert reply.startswith(b"HTTP/1.1 204 ")
    assert b"X-Seen-Ip: -" in reply
    assert "HTTP_X_REAL_IP" not in seen[0]


def test_garbage_and_oversized_headers_get_an_error_not_a_hang(
        served: tuple[str, Seen]) -> None:
    address, seen = served
    path = address.removeprefix("unix:")
    for request in (b"NONSENSE\r\n\r\n",
                    b"GET /auth HTTP/1.1\r\nX-Big: " + b"a" * 70_000 + b"\r\n\r\n",
                    b"GET /auth HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n"):
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(5)
            sock.connect(path)
            sock.sendall(request)
            reply = sock.makefile("rb").read()
        assert reply.split(b" ", 2)[1] in (b"400", b"431"), reply[:80]
    assert seen == []
