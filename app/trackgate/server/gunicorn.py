"""gunicorn for trackgate's two Python servers: options derived from the settings, and the app
class that runs a WSGI callable with them."""

from __future__ import annotations

from typing import Any

from gunicorn.app.base import BaseApplication

from ..settings import Settings


class GunicornApp(BaseApplication):  # type: ignore[misc]
    """gunicorn's documented "custom application": options from a dict, app from a callable."""

    def __init__(self, load: Any, options: dict[str, Any]) -> None:
        self._load = load
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self._load()


def tracking_options(settings: Settings) -> dict[str, Any]:
    """MLflow's Flask app. Threads keep the worker heartbeat alive during multi-GB uploads,
    which a sync worker would be killed for after `timeout` seconds."""
    options: dict[str, Any] = {
        "bind": [settings.bind_address("tracking")],
        "workers": settings.workers,
        "worker_class": "gthread",
        "threads": settings.threads,
        "timeout": 120,
        "graceful_timeout": 30,
        "keepalive": 75,  # longer than nginx's upstream keepalive, so nginx closes first
        "proc_name": "trackgate-tracking",
        # Attribution: who did what, as verified by the gateway (nginx overwrites any client copy).
        "accesslog": _access_log(settings, "tracking"),
        "access_log_format": '%(h)s user=%({x-trackgate-user}i)s "%(r)s" %(s)s %(b)s %(M)sms',
        # gunicorn >= 25 opens a control socket in $HOME by default: two servers would share it,
        # and a hardened unit cannot write there. Nothing of ours uses it.
        "control_socket_disable": True,
        "errorlog": _error_log(settings, "tracking"),
    }
    if settings.metrics:  # MLflow's exporter: a dead worker's files stop counting as live
        from .metrics import mark_tracking_worker_dead

        options["child_exit"] = mark_tracking_worker_dead
    return options


def gateway_options(settings: Settings) -> dict[str, Any]:
    """One process, many threads: bcrypt releases the GIL, and one process means one
    credential cache and one failure counter that every request sees."""
    return {
        "bind": [settings.bind_address("gateway")],
        "workers": 1,
        "worker_class": "gthread",
        "threads": settings.gateway_threads,
        "timeout": 60,
        "keepalive": 75,
        "proc_name": "trackgate-gateway",
        "control_socket_disable": True,
        "errorlog": _error_log(settings, "gateway"),
    }


def _error_log(settings: Settings, name: str) -> str:
    return "-" if settings.logs is None else str(settings.logs / f"{name}.log")


def _access_log(settings: Settings, name: str) -> str:
    return "-" if settings.logs is None else str(settings.logs / f"{name}-access.log")


class _HeadWithBody:
    """A response's socket that holds the header block until the first body bytes, so both
    leave in one send.

    gunicorn writes the headers and the body with two sendall() calls; between them another
    thread may hold the GIL for milliseconds. A tracking server killed in that gap leaves nginx
    with a header and no body: too late to retry on another server (nginx has answered the
    client), so the client sees a cut response. Sent together, a kill either loses the whole
    answer (nginx retries it elsewhere) or none of it (issue 16, a server killed under load).
    """

    def __init__(self, sock: Any) -> None:
        self._sock = sock
        self._head: bytes | None = None
        self._held = False

    def sendall(self, data: bytes) -> None:
        if not self._held:  # the first write is gunicorn's header block
            self._held, self._head = True, bytes(data)
            return
        if self._head is not None:
            data, self._head = self._head + data, None
        self._sock.sendall(data)

    def flush(self) -> None:
        if self._head is not None:
            head, self._head = self._head, None
            self._sock.sendall(head)

    def __getattr__(self, name: str) -> Any:
        # Anything else (sendfile() for static files, fileno()...) may write past us: the
        # header goes first.
        self.flush()
        return getattr(self._sock, name)


def send_head_with_body() -> None:
    """Make every gunicorn response of this process send its header block with its first body
    bytes (see _HeadWithBody). Called before the workers fork."""
    from gunicorn.http import wsgi

    if getattr(wsgi.Response, "_trackgate_head_with_body", False):
        return
    send_headers, close = wsgi.Response.send_headers, wsgi.Response.close

    def held_send_headers(self: Any) -> None:
        if not self.headers_sent and not isinstance(self.sock, _HeadWithBody):
            self.sock = _HeadWithBody(self.sock)
        send_headers(self)

    def flushing_close(self: Any) -> None:
        close(self)
        if isinstance(self.sock, _HeadWithBody):
            self.sock.flush()  # a response with no body (204, 304, HEAD)

    wsgi.Response.send_headers = held_send_headers
    wsgi.Response.close = flushing_close
    wsgi.Response._trackgate_head_with_body = True
