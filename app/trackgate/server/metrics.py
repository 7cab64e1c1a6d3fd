"""Prometheus metrics of the gateway, of nginx's requests, and of the data dir and backups.

- Auth decisions and bcrypt latency: counted by the gateway (`Gateway._count` calls `count`).
- nginx's requests (status, path family, upstream time, artifact bytes): nginx sends one syslog
  line per request (`log_format trackgate_metrics`) to a datagram socket this process reads; a
  line nginx could not send (full socket buffer under overload) is not counted, never blocks it.
- Disk free in the data dir, the last backup's time and size, the certificate's expiry: read when
  Prometheus scrapes.

prometheus-client runs in multiprocess mode when ``PROMETHEUS_MULTIPROC_DIR`` is set before it is
imported (`prepare_multiprocess_dir`, called by `trackgate serve` before anything imports it), so
the gateway may be served by several processes and one scrape still sees them all.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import sqlite3
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, TypeVar

from ..settings import Settings
from ..tokens import TokenStore
from ..users import UserError
from .sessions import SessionStore

_log = logging.getLogger("trackgate.metrics")
MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
# MLflow reads the lower-case name (and makes its exporter multiprocess with it).
MLFLOW_MULTIPROC_ENV = "prometheus_multiproc_dir"
LOG_TAG = "trackgate_metrics"  # nginx's syslog tag of the metrics lines
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
T = TypeVar("T")


def prepare_multiprocess_dir(server: str) -> Path:
    """A fresh, empty directory for this server's metric files, named in the environment before
    prometheus-client is imported. Fresh on every start: files of a previous run would count
    again (a wiped dir is what prometheus-client asks for)."""
    path = Path(tempfile.mkdtemp(prefix=f"trackgate-{server}-metrics-"))
    os.environ[MULTIPROC_ENV] = str(path)
    os.environ[MLFLOW_MULTIPROC_ENV] = str(path)
    return path


def remove_multiprocess_dir() -> None:
    path = os.environ.get(MULTIPROC_ENV)
    if path and Path(path).name.startswith("trackgate-"):
        shutil.rmtree(path, ignore_errors=True)


# Gateway._count names -> (metric, label value); `bcrypt_checks` is the histogram's count.
_DECISIONS = {
    "allowed": ("success", None),
    "refused": ("failure", None),
    "throttled": ("throttled", "failures"),
    "shed": ("throttled", "busy"),
    "cache_hits": ("cache_hits", None),
}


class _Series:
    """The metric objects: one set per process (a registry refuses a name twice)."""

    def __init__(self) -> None:
        from prometheus_client import Counter, Histogram

        self.success = Counter("trackgate_auth_success", "Requests the gateway let through.")
        self.failure = Counter("trackgate_auth_failure",
                               "Logins refused: wrong or unknown user or password.")
        self.throttled = Counter(
            "trackgate_auth_throttled",
            "Requests answered 429: too many failures, or too many bcrypt checks waiting.",
            ["reason"],
        )
        self.cache_hits = Counter("trackgate_auth_cache_hits",
                                  "Credentials answered from memory, without bcrypt.")
        self.bcrypt = Histogram(
            "trackgate_auth_bcrypt_seconds", "Duration of bcrypt checks (queueing not included).",
            buckets=(0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10),
        )
        self.requests = Counter(
            "trackgate_http_requests", "Requests nginx answered on the public listener.",
            ["status", "family"],
        )
        self.upstream = Histogram(
            "trackgate_http_upstream_seconds",
            "Time the tracking server took to answer nginx (nginx's $upstream_response_time).",
            ["family"],
            buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120),
        )
        self.artifact_bytes = Counter(
            "trackgate_artifact_bytes",
            "Bytes of artifact transfers through nginx (in: uploads, out: downloads).",
            ["direction"],
        )
        # Label values created up front, so a rate() has a series before the first event.
        for reason in ("failures", "busy"):
            self.throttled.labels(reason)
        for direction in ("in", "out"):
            self.artifact_bytes.labels(direction)


_series: _Series | None = None
_series_lock = threading.Lock()


class GatewayMetrics:
    """The gateway's counters, and what a scrape of its /metrics answers."""

    def __init__(self, settings: Settings) -> None:
        global _series
        self.settings = settings
        with _series_lock:
            if _series is None:
                _series = _Series()
        self.series = _series
        self._metrics: dict[str, Any] = {
            "success": _series.success, "failure": _series.failure,
            "throttled": _series.throttled, "cache_hits": _series.cache_hits,
        }

    def count(self, *names: str) -> None:
        for name in names:
            target = _DECISIONS.get(name)
            if target is None:
                continue
            metric, label = target
            (self._metrics[metric].labels(label) if label else self._metrics[metric]).inc()

    def timed(self, check: Callable[..., T]) -> Callable[..., T]:
        """`check` (bcrypt) with its duration observed."""
        def run(*args: Any) -> T:
            started = time.perf_counter()
            try:
                return check(*args)
            finally:
                self.series.bcrypt.observe(time.perf_counter() - started)
        return run

    # --- nginx's request lines --------------------------------------------------------------

    def record_request_line(self, line: str) -> None:
        """One line of log_format trackgate_metrics:
        `STATUS FAMILY REQUEST_LENGTH BODY_BYTES_SENT UPSTREAM_TIME`."""
        parts = line.split()
        if len(parts) != 5 or not parts[0].isdigit() or len(parts[0]) != 3:
            return
        status, family, length, sent, upstream = parts
        if family not in FAMILIES:
            return
        self.series.requests.labels(status, family).inc()
        seconds = _last_time(upstream)
        if seconds is not None:
            self.series.upstream.labels(family).observe(seconds)
        if family == "artifacts" and status[0] == "2":
            with contextlib.suppress(ValueError):
                self.series.artifact_bytes.labels("in").inc(int(length))
                self.series.artifact_bytes.labels("out").inc(int(sent))

    def listen_for_nginx(self) -> threading.Thread | None:
        """Read nginx's metrics lines on a daemon thread (settings.metrics_log_address)."""
        address = self.settings.metrics_log_address
        try:
            sock = _bind_datagram(address)
        except OSError as exc:  # metrics only: the gateway serves logins without them
            _log.error("nginx request metrics off: cannot listen on %s: %s", address, exc)
            return None
        thread = threading.Thread(target=self._receive, args=(sock,), name="nginx-metrics",
                                  daemon=True)
        thread.start()
        return thread

    def _receive(self, sock: socket.socket) -> None:
        while True:
            try:
                data = sock.recv(4096)
            except OSError:
                return
            # <PRI>TIMESTAMP TAG: MESSAGE (nginx, nohostname)
            text = data.decode("ascii", "replace")
            _, sep, message = text.partition(f"{LOG_TAG}: ")
            if sep:
                try:
                    self.record_request_line(message)
                except Exception:  # a bad line must not end the thread
                    _log.exception("bad nginx metrics line %r", message[:200])

    # --- the scrape ---------------------------------------------------------------------------

    def exposition(self) -> bytes:
        from prometheus_client import REGISTRY, CollectorRegistry, generate_latest

        if os.environ.get(MULTIPROC_ENV):
            from prometheus_client import multiprocess

            registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(registry)
        else:
            registry = REGISTRY
        text = generate_latest(registry)
        own = CollectorRegistry()
        own.register(HostCollector(self.settings))
        return text + generate_latest(own)


FAMILIES = frozenset({"api", "artifacts", "ui", "health", "serving", "other"})


def _last_time(value: str) -> float | None:
    """nginx's $upstream_response_time: '0.004', '-', or '0.001, 0.004' after a retry."""
    last = value.rsplit(",", 1)[-1].strip().rstrip(",")
    try:
        return float(last)
    except ValueError:
        return None


def _bind_datagram(address: str) -> socket.socket:
    if address.startswith("unix:"):
        path = Path(address.removeprefix("unix:"))
        path.unlink(missing_ok=True)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(path))
        os.chmod(path, 0o660)  # nginx's workers (the service account or its group)
    else:
        host, _, port = address.rpartition(":")
        host = host.strip("[]")
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_DGRAM)
        sock.bind((host, int(port)))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    return sock


class HostCollector:
    """Disk, backup and certificate figures, read at scrape time."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import GaugeMetricFamily

        s = self.settings
        with contextlib.suppress(OSError):
            usage = shutil.disk_usage(s.data_dir)
            yield _gauge(GaugeMetricFamily, "trackgate_data_dir_free_bytes",
                         "Free bytes on the file system of the data dir.", usage.free)
            yield _gauge(GaugeMetricFamily, "trackgate_data_dir_size_bytes",
                         "Size of the file system of the data dir.", usage.total)
        yield _gauge(GaugeMetricFamily, "trackgate_backup_max_age_seconds",
                     "Age after which the last backup counts as too old (backup_max_age).",
                     s.backup_max_age)
        status = _read_json(s.backup_status_file)
        if status:
            yield _gauge(GaugeMetricFamily, "trackgate_backup_last_success_timestamp_seconds",
                         "When the last backup finished (Unix time).", status.get("finished", 0))
            yield _gauge(GaugeMetricFamily, "trackgate_backup_last_size_bytes",
                         "Size of the last backup archive.", status.get("size", 0))
        if s.sessions_db.exists():
            with contextlib.suppress(OSError, sqlite3.Error):
                live = SessionStore(s.sessions_db, s.session_idle_timeout, s.session_max_age).live()
                yield _gauge(GaugeMetricFamily, "trackgate_sessions_active",
                             "Browser sessions alive now (login page, single sign-on).", live)
        with contextlib.suppress(OSError, UserError):
            tokens = [t for t in TokenStore(s.tokens_file).tokens() if not t.expired()]
            yield _gauge(GaugeMetricFamily, "trackgate_api_tokens_active",
                         "API tokens neither expired nor revoked.", len(tokens))
        expiry = _certificate_expiry(s.cert_file)
        if expiry is not None:
            yield _gauge(GaugeMetricFamily, "trackgate_tls_certificate_expiry_timestamp_seconds",
                         "When the served certificate expires (Unix time).", expiry)


def _gauge(cls: Any, name: str, doc: str, value: float) -> Any:
    return cls(name, doc, value=float(value))


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


_cert_cache: dict[tuple[str, int, int], float | None] = {}


def _certificate_expiry(path: Path) -> float | None:
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path), st.st_ino, st.st_mtime_ns)
    if key not in _cert_cache:
        try:
            from cryptography import x509

            cert = x509.load_pem_x509_certificate(path.read_bytes())
            _cert_cache[key] = cert.not_valid_after_utc.timestamp()
        except (OSError, ValueError):
            _cert_cache[key] = None
    return _cert_cache[key]


def write_backup_status(settings: Settings, size: int) -> None:
    """After a successful backup: what the backup-age metric reads (world-readable, no secret)."""
    path = settings.backup_status_file
    tmp = path.with_name(f".{path.name}.tmp")
    with contextlib.suppress(OSError):  # the archive is written; the metric is a nicety
        tmp.write_text(json.dumps({"finished": time.time(), "size": size}))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)


def mark_tracking_worker_dead(_server: Any, worker: Any) -> None:
    """gunicorn's child_exit hook: a dead worker's live gauges leave the tracking metrics."""
    from prometheus_flask_exporter.multiprocess import GunicornInternalPrometheusMetrics

    GunicornInternalPrometheusMetrics.mark_process_dead_on_child_exit(worker.pid)


class HideMetricsFromUsers:
    """The tracking server's /metrics (MLflow's exporter) answers only the metrics listener:
    a request nginx vouched for (a logged-in user of the public listener) gets 404 there, even if
    a path spelling got past nginx's own refusal."""

    def __init__(self, app: Callable[..., Iterable[bytes]]) -> None:
        self.app = app

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Any:
        if environ.get("PATH_INFO", "").rstrip("/") == "/metrics" and environ.get(
            "HTTP_X_TRACKGATE_USER"
        ):
            start_response("404 Not Found", [("Content-Length", "0")])
            return [b""]
        return self.app(environ, start_response)


def wsgi_metrics(body: bytes, start_response: Callable[..., Any]) -> Iterable[bytes]:
    start_response("200 OK", [("Content-Type", CONTENT_TYPE), ("Content-Length", str(len(body)))])
    return [body]
