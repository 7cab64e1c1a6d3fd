"""The auth gateway nginx consults with `auth_request` before proxying anything to MLflow.

nginx's own `auth_basic` runs bcrypt on its event loop for every request, with no cache. Here a
credential is checked with bcrypt once and then answered from memory; bcrypt work is capped and
queued; repeated failures are throttled. Answers (nginx maps them):

- 204 + ``X-Trackgate-User``: let the request through, as this user;
- 401 + ``WWW-Authenticate: Basic``: ask for credentials (browsers show their login prompt);
- 403 + ``Retry-After``: throttled or overloaded; nginx turns it into 429 for the client.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import json
import logging
import logging.handlers
import os
import secrets
import threading
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import quote

from ..audit import AuditLog, audit_path
from ..groups import GroupsWatcher, groups_path
from ..roles import RolesWatcher, roles_path
from ..settings import Settings
from ..users import UserError, decode, enabled_users, hash_password, normalize_username, verify_hash
from .credentials import CredentialCache
from .metrics import GatewayMetrics, wsgi_metrics
from .throttle import LoginThrottle

USER_HEADER = "X-Trackgate-User"
ROLE_HEADER = "X-Trackgate-Role"  # viewer, editor or admin (roles.py); nginx passes it on
# The user's groups (groups.py), each percent-encoded, comma-separated; nginx passes it on, so the
# tracking server needs no users file of its own.
GROUPS_HEADER = "X-Trackgate-Groups"
THROTTLED_HEADER = "X-Trackgate-Throttled"  # why a 403 (429 for the client), for its body
REALM = "trackgate"
_log = logging.getLogger("trackgate.gateway")

StartResponse = Callable[[str, list[tuple[str, str]]], Any]


class HtpasswdWatcher:
    """The users of an htpasswd file, reloaded whenever the file is replaced or changed.

    One stat() per request is cheap, and it makes `users passwd`/`remove` take effect on the
    very next request in every gateway process, with no signal or restart.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._users: dict[str, str] = {}
        self._lock = threading.Lock()
        self.problem: str | None = None  # why no user is accepted (for /healthz)

    def hash_for(self, username: str) -> str | None:
        try:
            st = os.stat(self.path)
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            with self._lock:
                try:
                    data = self.path.read_bytes() if stamp else b""
                    # Only bcrypt lines: `!`, `*` and legacy hashes are disabled accounts.
                    self._users = enabled_users(decode(data, self.path))
                    self.problem = None
                except FileNotFoundError:
                    self._users = {}
                    self.problem = None
                except (UserError, OSError) as exc:  # fail closed until it is fixed
                    _log.error("no users accepted: %s", exc)
                    self._users = {}
                    self.problem = f"no users accepted: {exc}"
                self._stamp = stamp
        return self._users.get(username)


def parse_basic(header: str | None) -> tuple[str, str] | None:
    """(username, password) from an `Authorization: Basic ...` header, or None."""
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() != "basic" or not token:
        return None
    try:
        decoded = base64.b64decode(token.strip(), validate=True).decode("utf-8")
    except (binascii.Error, UnicodeDecodeError):
        return None
    username, sep, password = decoded.partition(":")
    if not sep or not username:
        return None
    return username, password


class Gateway:
    """WSGI app answering nginx's auth subrequests at /auth (/healthz and /stats for operators)."""

    def __init__(self, settings: Settings) -> None:
        self.users = HtpasswdWatcher(settings.htpasswd)
        self.roles = RolesWatcher(roles_path(settings))
        self.groups = GroupsWatcher(groups_path(settings))
        # Logins checked with bcrypt (not the cached ones: those are every request) go here.
        self.audit = AuditLog(audit_path(settings))
        self.cache = CredentialCache(settings.cache_size, settings.cache_ttl)
        self.throttle = LoginThrottle(settings.failure_limit, settings.failure_window)
        # bcrypt runs on its own few threads at the lowest CPU priority: a flood of guesses gets
        # only the CPU that nginx, MLflow and cached answers leave over (bench/: legit throughput
        # under a spread flood 40 % -> 87 % of unflooded on 2 cores).
        self._bcrypt_pool = ThreadPoolExecutor(
            settings.bcrypt_concurrency, "bcrypt", initializer=_lowest_cpu_priority
        )
        # Leave threads free for cached credentials: past this many waiting checks, shed load.
        self._max_waiting = max(1, settings.gateway_threads // 2)
        self._waiting = 0
        self._waiting_lock = threading.Lock()
        # Counters for operators (GET /stats on the loopback port; nginx never exposes it).
        self.stats = {
            "cache_hits": 0,
            "bcrypt_checks": 0,
            "allowed": 0,
            "refused": 0,
            "throttled": 0,
            "shed": 0,
        }
        self._stats_lock = threading.Lock()
        # Prometheus (metrics.py): the same counts, served at /metrics to the metrics listener.
        self.metrics = GatewayMetrics(settings) if settings.metrics else None
        # Unknown users are checked against this, so they cost the same time as known ones.
        self._decoy_hash = hash_password(secrets.token_urlsafe(16), settings.bcrypt_rounds)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        path = environ.get("PATH_INFO", "")
        if path == "/healthz":  # unhealthy while the htpasswd file cannot be read
            self.users.hash_for("")
            if self.users.problem:
                body = self.users.problem.encode()
                return _answer(start_response, "503 Service Unavailable", body=body)
            return _answer(start_response, "200 OK", body=b"OK")
        if path == "/stats":
            body = json.dumps({**self.stats, "cached_credentials": len(self.cache)}).encode()
            return _answer(start_response, "200 OK", [("Content-Type", "application/json")], body)
        if path == "/metrics" and self.metrics is not None:
            return wsgi_metrics(self.metrics.exposition(), start_response)
        if path != "/auth":
            return _answer(start_response, "404 Not Found")
        credentials = parse_basic(environ.get("HTTP_AUTHORIZATION"))
        if credentials is None:
            return _challenge(start_response)
        username, password = credentials
        username = normalize_username(username)  # the spelling `trackgate users` stores
        current_hash = self.users.hash_for(username)
        if current_hash is not None and self.cache.hit(username, password, current_hash):
            self._count("cache_hits", "allowed")
            return _allow(start_response, username, self.roles.role_for(username),
                          self.groups.groups_of(username))

        client_ip = environ.get("HTTP_X_REAL_IP") or environ.get("REMOTE_ADDR", "")
        refusal = self.throttle.check(client_ip, username)
        if refusal is not None:
            self._count("throttled")
            self._audit_login(environ, username, "login_throttled", 429)
            return _throttled(start_response, refusal.retry_after, refusal.reason)
        verdict = self._check(password, current_hash)
        if verdict is None:
            self._count("shed")
            return _throttled(start_response, 1, "the server is busy checking passwords")
        if verdict and current_hash is not None:
            self.cache.add(username, password, current_hash)
            self.throttle.record_success(client_ip, username)
            self._count("allowed")
            role = self.roles.role_for(username)
            self._audit_login(environ, username, "login", 204, role)
            return _allow(start_response, username, role, self.groups.groups_of(username))
        self.throttle.record_failure(client_ip, username)
        self._count("refused")
        self._audit_login(environ, username, "login_failed", 401)
        return _challenge(start_response)

    def _audit_login(
        self, environ: dict[str, Any], username: str, action: str, status: int,
        role: str | None = None,
    ) -> None:
        self.audit.write({
            "event": "login",
            "user": username,
            "role": role,
            "client_ip": environ.get("HTTP_X_REAL_IP") or environ.get("REMOTE_ADDR", ""),
            "method": environ.get("HTTP_X_ORIGINAL_METHOD"),
            "path": environ.get("HTTP_X_ORIGINAL_URI"),
            "status": status,
            "action": action,
            "request_id": environ.get("HTTP_X_REQUEST_ID"),
        })

    def _count(self, *names: str) -> None:
        with self._stats_lock:
            for name in names:
                self.stats[name] += 1
        if self.metrics is not None:
            self.metrics.count(*names)

    def _check(self, password: str, current_hash: str | None) -> bool | None:
        """bcrypt under the concurrency cap; None when too many checks are already waiting."""
        with self._waiting_lock:
            if self._waiting >= self._max_waiting:
                return None
            self._waiting += 1
        try:
            self._count("bcrypt_checks")
            check = verify_hash if self.metrics is None else self.metrics.timed(verify_hash)
            ok = self._bcrypt_pool.submit(
                check, password, current_hash or self._decoy_hash
            ).result()
        finally:
            with self._waiting_lock:
                self._waiting -= 1
        return ok and current_hash is not None


def _lowest_cpu_priority() -> None:
    """nice 19 for the calling thread only (Linux keeps a nice value per thread); lowering
    one's own priority needs no privilege."""
    with contextlib.suppress(OSError):  # elsewhere bcrypt still runs, at normal priority
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)


def _answer(
    start_response: StartResponse,
    status: str,
    headers: list[tuple[str, str]] | None = None,
    body: bytes = b"",
) -> list[bytes]:
    start_response(status, [("Content-Length", str(len(body))), *(headers or [])])
    return [body]


def _allow(start_response: StartResponse, username: str, role: str,
           groups: frozenset[str] = frozenset()) -> list[bytes]:
    # Latin-1 is all an HTTP header can carry; other names are percent-encoded.
    headers = [(USER_HEADER, quote(username, safe="")), (ROLE_HEADER, role),
               (GROUPS_HEADER, ",".join(quote(g, safe="") for g in sorted(groups)))]
    return _answer(start_response, "204 No Content", headers)


def _challenge(start_response: StartResponse) -> list[bytes]:
    header = ("WWW-Authenticate", f'Basic realm="{REALM}", charset="UTF-8"')
    return _answer(start_response, "401 Unauthorized", [header])


def _throttled(start_response: StartResponse, seconds: int, reason: str) -> list[bytes]:
    # nginx puts the reason (plain ASCII, names percent-encoded) in its 429 body.
    headers = [("Retry-After", str(seconds)), (THROTTLED_HEADER, reason)]
    return _answer(start_response, "403 Forbidden", headers)


def create_app(settings: Settings | None = None) -> Gateway:
    """App factory for gunicorn (`trackgate.server.gateway:create_app()`) and for tests."""
    return Gateway(settings or Settings())


def run(settings: Settings) -> None:
    """`trackgate serve gateway`: the gateway in the foreground, served by the lean server
    (lean.py) or gunicorn (settings.gateway_server); the request logic is the same."""
    from . import metrics

    if settings.logs is not None:
        settings.logs.mkdir(parents=True, exist_ok=True)
    if settings.metrics:  # before prometheus-client is imported
        metrics.prepare_multiprocess_dir("gateway")

    def load() -> Gateway:
        app = create_app(settings)
        if app.metrics is not None:  # nginx's request lines, in the process that counts them
            app.metrics.listen_for_nginx()
        return app

    try:
        if settings.gateway_server == "gunicorn":
            from .gunicorn import GunicornApp, gateway_options

            GunicornApp(load, gateway_options(settings)).run()
            return
        from .lean import LeanServer

        # A renamed log (`trackgate logs rotate`) is reopened by the handler on its next line.
        handler: logging.Handler = (
            logging.StreamHandler() if settings.logs is None
            else logging.handlers.WatchedFileHandler(settings.logs / "gateway.log"))
        handler.setFormatter(
            logging.Formatter("%(asctime)s [%(process)d] [%(levelname)s] %(message)s"))
        logging.basicConfig(level=logging.INFO, handlers=[handler])
        LeanServer(load(), settings.bind_address("gateway"),
                   threads=settings.gateway_threads).serve_forever()
    finally:
        metrics.remove_multiprocess_dir()
