"""A lean HTTP/1.1 server for the auth gateway: nginx's `auth_request` subrequests only.

Every request through nginx costs one gateway round trip, so how the gateway is served is on
the hot path. gunicorn's gthread worker spent ~0.7 ms of CPU per subrequest (bench/RESULTS.md,
issue 18): a pure-Python parser, a selector and a thread-pool handoff per request, for a
request of a few header lines and an answer with no body. This server keeps one thread per
nginx keep-alive connection (nginx holds a few dozen, reused for every subrequest), reads the
header block with the C-buffered reader, and calls the same WSGI app (``Gateway``) in that
thread: no handoff, no event loop.

It serves only what nginx and the probes send: no request bodies beyond Content-Length, no
chunked encoding, no pipelining beyond sequential keep-alive requests. At most ``threads``
app calls run at once (like gunicorn's ``threads``); further connections wait in the listen
backlog past ``max_connections``.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import unquote_to_bytes

_log = logging.getLogger("trackgate.gateway")
MAX_HEADER_BYTES = 64 * 1024  # nginx sends a few hundred; refuse anything absurd
MAX_BODY_BYTES = 64 * 1024  # the auth subrequest has none; the probes neither
IDLE_TIMEOUT = 75.0  # longer than nginx's upstream keepalive_timeout (60 s), so nginx closes first
STOP_GRACE = 5.0

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
_REASONS = {400: "Bad Request", 431: "Request Header Fields Too Large"}


class _Stop(Exception):
    pass


def _listen(address: str) -> socket.socket:
    """A listening socket at `unix:/path` or `host:port` (gunicorn's notation)."""
    if address.startswith("unix:"):
        path = address.removeprefix("unix:")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # a stale socket of a previous run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        # As gunicorn leaves it (umask 0): the socket directory decides who may connect.
        os.chmod(path, 0o777)
    else:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, int(port)))
    sock.listen(1024)
    return sock


class LeanServer:
    """Serve one WSGI app at one address; ``serve_forever`` until SIGTERM/SIGINT."""

    def __init__(self, app: WsgiApp, address: str, threads: int = 32,
                 max_connections: int = 1024) -> None:
        self.app = app
        self.address = address
        self._calls = threading.BoundedSemaphore(threads)  # app calls at once
        self._connections = threading.BoundedSemaphore(max_connections)
        self._active = 0
        self._active_lock = threading.Lock()
        self._idle = threading.Event()
        self._idle.set()
        self._stopping = False
        self._tcp = not address.startswith("unix:")
        self._sock: socket.socket | None = None

    def serve_forever(self) -> None:
        self._sock = _listen(self.address)
        threading.stack_size(512 * 1024)  # many mostly idle connection threads
        main = threading.current_thread() is threading.main_thread()
        previous = {sig: signal.signal(sig, self._on_signal)
                    for sig in (signal.SIGTERM, signal.SIGINT)} if main else {}
        if main:
            # `trackgate logs rotate` sends USR1 to reopen logs (gunicorn's meaning); the log
            # handler (WatchedFileHandler) reopens a renamed file by itself. Never die of it.
            previous[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, lambda *_: None)
        _log.info("gateway listening at %s", self.address)
        try:
            while True:
                self._connections.acquire()
                try:
                    conn, peer = self._sock.accept()
                except BaseException as exc:
                    self._connections.release()
                    if self._stopping and isinstance(exc, OSError):
                        break  # stop() from another thread
                    raise
                threading.Thread(target=self._connection, args=(conn, peer), daemon=True).start()
        except _Stop:
            pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            self._sock.close()
            if not self._tcp:
                with contextlib.suppress(OSError):
                    os.unlink(self.address.removeprefix("unix:"))
            self._stopping = True
            self._idle.wait(STOP_GRACE)  # let answers in flight reach nginx
            _log.info("gateway stopped")

    def stop(self) -> None:
        """Stop serving (from another thread; signals do it in the main one)."""
        self._stopping = True
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()

    def _on_signal(self, signum: int, frame: Any) -> None:
        raise _Stop

    def _connection(self, conn: socket.socket, peer: Any) -> None:
        remote = peer[0] if self._tcp and isinstance(peer, tuple) else ""
        try:
            conn.settimeout(IDLE_TIMEOUT)
            if self._tcp:
                conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            reader = conn.makefile("rb", buffering=16 * 1024)
            while not self._stopping and self._one_request(conn, reader, remote):
                pass
        except (OSError, ValueError):
            pass  # the peer went away or idled out
        finally:
            with contextlib.suppress(OSError):
                conn.close()
            self._connections.release()

    def _one_request(self, conn: socket.socket, reader: io.BufferedReader, remote: str) -> bool:
        """Read, answer; True to keep the connection for the next request."""
        line = reader.readline(MAX_HEADER_BYTES + 1)
        if not line:
            return False
        try:
            method, target, version = line.decode("latin-1").split()
        except ValueError:
            return self._plain_error(conn, 400)
        environ: dict[str, Any] = {}
        size = len(line)
        while True:
            header = reader.readline(MAX_HEADER_BYTES + 1)
            size += len(header)
            if size > MAX_HEADER_BYTES or not header:
                return self._plain_error(conn, 431 if header else 400)
            if header in (b"\r\n", b"\n"):
                break
            name, sep, value = header.decode("latin-1").partition(":")
            name = name.strip()
            if not sep or not name or "_" in name:
                # Underscores: a client's X_Real_IP must not become HTTP_X_REAL_IP (as gunicorn).
                continue
            key = name.upper().replace("-", "_")
            if key not in ("CONTENT_TYPE", "CONTENT_LENGTH"):
                key = "HTTP_" + key
            value = value.strip()
            environ[key] = f"{environ[key]},{value}" if key in environ else value
        if "HTTP_TRANSFER_ENCODING" in environ:
            return self._plain_error(conn, 400)  # nginx sends no chunked subrequest bodies
        try:
            length = int(environ.get("CONTENT_LENGTH") or 0)
        except ValueError:
            return self._plain_error(conn, 400)
        if not 0 <= length <= MAX_BODY_BYTES:
            return self._plain_error(conn, 400)
        body = reader.read(length) if length else b""
        path, _, query = target.partition("?")
        environ.update({
            "REQUEST_METHOD": method,
            "SCRIPT_NAME": "",
            "PATH_INFO": unquote_to_bytes(path).decode("latin-1"),
            "QUERY_STRING": query,
            "RAW_URI": target,
            "SERVER_PROTOCOL": version,
            "SERVER_NAME": "trackgate-gateway",
            "SERVER_PORT": "0",
            "REMOTE_ADDR": remote,
            "wsgi.version": (1, 0),
            "wsgi.url_scheme": "http",
            "wsgi.input": io.BytesIO(body),
            "wsgi.errors": sys.stderr,
            "wsgi.multithread": True,
            "wsgi.multiprocess": False,
            "wsgi.run_once": False,
        })
        connection = environ.get("HTTP_CONNECTION", "").lower()
        keep = connection != "close" if version == "HTTP/1.1" else connection == "keep-alive"
        with self._calls:
            with self._active_lock:
                self._active += 1
                self._idle.clear()
            try:
                data = self._call(environ, keep)
            finally:
                with self._active_lock:
                    self._active -= 1
                    if self._active == 0:
                        self._idle.set()
        conn.sendall(data)
        return keep

    def _call(self, environ: dict[str, Any], keep: bool) -> bytes:
        answer: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]],
                           exc_info: Any = None) -> Callable[[bytes], None]:
            answer[:] = [status, headers]
            return lambda data: None  # write(): unused by the gateway

        try:
            result = self.app(environ, start_response)
            try:
                body = b"".join(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
            status, headers = answer
        except Exception:
            _log.exception("gateway error on %s", environ.get("PATH_INFO"))
            status, headers, body = "500 Internal Server Error", [], b""
        lines = [f"HTTP/1.1 {status}"]
        lines += (f"{k}: {v}" for k, v in headers if k.lower() not in ("content-length",
                                                                         "connection"))
        lines.append(f"Content-Length: {len(body)}")
        if not keep:
            lines.append("Connection: close")
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def _plain_error(self, conn: socket.socket, code: int) -> bool:
        with contextlib.suppress(OSError):
            conn.sendall(f"HTTP/1.1 {code} {_REASONS[code]}\r\nContent-Length: 0\r\n"
                         "Connection: close\r\n\r\n".encode())
        return False
