"""Health probes: an HTTPS probe that connects to one address while naming another host (SNI +
Host), so `trackgate up` can wait for the stack through nginx before the host name resolves; and
`health()`, the check of one internal server that `trackgate probe` and container healthchecks use.
"""

from __future__ import annotations

import base64
import http.client
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from ..settings import Settings


@dataclass
class Answer:
    status: int
    headers: dict[str, str]
    body: bytes


class _PinnedHTTPS(http.client.HTTPSConnection):
    def __init__(self, host: str, port: int, address: str, **kwargs: object) -> None:
        super().__init__(host, port, **kwargs)  # type: ignore[arg-type]
        self._address = address

    def connect(self) -> None:
        sock = socket.create_connection((self._address, self.port), self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)  # type: ignore[attr-defined]


def https_get(
    hostname: str,
    port: int,
    path: str = "/",
    *,
    address: str = "127.0.0.1",
    ca_file: Path | None = None,
    verify: bool = True,
    auth: tuple[str, str] | None = None,
    timeout: float = 10.0,
) -> Answer:
    context = ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
    if not verify:  # a liveness probe of our own loopback listener, not a trust decision
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    conn = _PinnedHTTPS(hostname, port, address, context=context, timeout=timeout)
    headers = {}
    if auth:
        token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    try:
        conn.request("GET", path, headers=headers)
        response = conn.getresponse()
        return Answer(response.status, dict(response.getheaders()), response.read())
    finally:
        conn.close()


class _UnixHTTPConnection(http.client.HTTPConnection):
    """HTTP over a Unix socket (the internal servers' default transport)."""

    def __init__(self, path: str, timeout: float) -> None:
        super().__init__("localhost", timeout=timeout)
        self._path = path

    def connect(self) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.settimeout(self.timeout)
        self.sock.connect(self._path)


def internal_connection(address: str, timeout: float) -> http.client.HTTPConnection:
    """A connection to an internal server at nginx-style `unix:/path` or `host:port`."""
    if address.startswith("unix:"):
        return _UnixHTTPConnection(address.removeprefix("unix:"), timeout)
    host, _, port = address.rpartition(":")
    return http.client.HTTPConnection(host.strip("[]"), int(port), timeout=timeout)


def _own(address: str) -> str:
    """A listening address as something to connect to (0.0.0.0/[::] mean this host)."""
    for wildcard, local in (("0.0.0.0:", "127.0.0.1:"), ("[::]:", "[::1]:")):
        if address.startswith(wildcard):
            return local + address.removeprefix(wildcard)
    return address


def health(settings: Settings, component: str, *, timeout: float = 4.0) -> str | None:
    """None if the component's health endpoint answers 200, else what went wrong."""
    # The tracking server checked is this host's own (its bind address): the upstream may list
    # several servers, or name compose replicas that resolve to any of them.
    address = _own(settings.bind_address("tracking")) if component == "tracking" \
        else settings.gateway_address
    path = "/health" if component == "tracking" else "/healthz"
    conn = internal_connection(address, timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        status, body = response.status, response.read(300)
    except OSError as exc:
        return f"no answer from {address}{path}: {exc}"
    finally:
        conn.close()
    if status == 200:
        return None
    said = body.decode(errors="replace").strip()  # e.g. the gateway: why no user is accepted
    return f"{address}{path} answered {status}" + (f": {said}" if said else "")
