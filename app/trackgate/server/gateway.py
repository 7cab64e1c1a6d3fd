"""The auth gateway nginx consults with `auth_request` before proxying anything to MLflow.

nginx's own `auth_basic` runs bcrypt on its event loop for every request, with no cache. Here a
credential is checked with bcrypt once and then answered from memory; bcrypt work is capped and
queued; repeated failures are throttled. Answers (nginx maps them):

- 204 + ``X-Trackgate-User``: let the request through, as this user;
- 401 + ``WWW-Authenticate: Basic``: ask scripts for credentials; browsers (they send
  Sec-Fetch-Mode) get no challenge, so no native prompt, and their page navigations are sent to
  the login page (``X-Trackgate-Login``);
- 403 + ``Retry-After``: throttled or overloaded; nginx turns it into 429 for the client.

Credentials: Basic (htpasswd), Bearer API tokens (tokens.py) or the login page's session cookie
(sessions.py). The gateway also serves the login page, logout and the current user.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode

from ..audit import AuditLog, audit_path
from ..groups import GroupsWatcher, groups_path
from ..roles import RolesWatcher, roles_path
from ..settings import Settings
from ..tokens import TokenWatcher, lower_role
from ..users import UserError, decode, enabled_users, hash_password, normalize_username, verify_hash
from . import login, oidc
from .credentials import CredentialCache
from .metrics import GatewayMetrics, wsgi_metrics
from .sessions import (
    Session,
    SessionStore,
    clear_cookie,
    clear_sign_on_cookie,
    cookie_value,
    fingerprint,
    set_cookie,
    sign_on_cookie,
    sign_on_state,
)
from .throttle import LoginThrottle, Refusal

USER_HEADER = "X-Trackgate-User"
ROLE_HEADER = "X-Trackgate-Role"  # viewer, editor or admin (roles.py); nginx passes it on
# The user's groups (groups.py), each percent-encoded, comma-separated; nginx passes it on, so the
# tracking server needs no users file of its own.
GROUPS_HEADER = "X-Trackgate-Groups"
THROTTLED_HEADER = "X-Trackgate-Throttled"  # why a 403 (429 for the client), for its body
# How the request was authenticated: basic, session or token:NAME (the audit log shows it).
VIA_HEADER = "X-Trackgate-Via"
# Where nginx sends a browser navigation that has no valid credentials (the login page).
LOGIN_HEADER = "X-Trackgate-Login"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_FORM = 16 * 1024  # a login form is a few hundred bytes
MLFLOW_LOGOUT_USER = "mlflow-logged-out-"  # what the MLflow UI's Logout sends (see below)
CURRENT_USER_URI = "/ajax-api/2.0/mlflow/users/current"  # its account menu asks who is in
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
    """WSGI app answering nginx's auth subrequests at /auth, and serving the login page, logout,
    single sign-on and the current user (/healthz and /stats for operators)."""

    def __init__(self, settings: Settings) -> None:
        self.users = HtpasswdWatcher(settings.htpasswd)
        self.roles = RolesWatcher(roles_path(settings))
        self.groups = GroupsWatcher(groups_path(settings))
        self.tokens = TokenWatcher(settings.tokens_file)
        self.sessions = SessionStore(settings.sessions_db, settings.session_idle_timeout,
                                     settings.session_max_age)
        self.session_max_age = settings.session_max_age
        self.origins = frozenset(settings.public_origins)
        self.local_users = settings.local_users
        self.base = settings.base_path  # browsers see every path under it (TRACKGATE_BASE_PATH)
        self.provider = (oidc.Provider(settings)
                         if settings.oidc_issuer and settings.oidc_client_id else None)
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
        if path == "/auth":
            return self.authorize(environ, start_response)
        if path == "/login":
            return self.login(environ, start_response)
        if path == oidc.START_PATH:
            return self.sign_on_start(environ, start_response)
        if path == oidc.CALLBACK_PATH:
            return self.sign_on_callback(environ, start_response)
        if path == "/logout":
            return self.logout(environ, start_response)
        if path == "/current-user":
            return self.current_user(environ, start_response)
        if path == "/login.js":
            return _answer(start_response, "200 OK", [
                ("Content-Type", "text/javascript; charset=utf-8"),
                ("Cache-Control", "max-age=3600")], login.SCRIPT)
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
        return _answer(start_response, "404 Not Found")

    # --- /auth: nginx's subrequest for every request ------------------------------------------

    def authorize(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        """Basic (scripts, the MLflow client), Bearer (API tokens) or the session cookie (the
        browser after the login page), in that order; nothing valid: 401."""
        header = environ.get("HTTP_AUTHORIZATION")
        if header:
            scheme = header.strip().partition(" ")[0].lower()
            if scheme == "bearer":
                return self.authorize_token(environ, start_response, header)
            credentials = parse_basic(header)
            if credentials is not None:
                if _is_mlflow_logout(environ, credentials[0]):
                    return self.mlflow_ui_logout(environ, start_response)
                if not self.local_users:  # single sign-on only: no password is accepted
                    return self.unauthorized(environ, start_response)
                return self.authorize_basic(environ, start_response, *credentials)
        session_id = cookie_value(environ.get("HTTP_COOKIE"))
        if session_id is not None:
            return self.authorize_session(environ, start_response, session_id)
        return self.unauthorized(environ, start_response)

    def authorize_basic(self, environ: dict[str, Any], start_response: StartResponse,
                        username: str, password: str) -> list[bytes]:
        result = self.check_password(environ, username, password)
        if result.refusal is not None:
            return _throttled(start_response, result.refusal.retry_after, result.refusal.reason)
        if result.role is None:
            return self.unauthorized(environ, start_response)
        return _allow(start_response, result.username, result.role,
                      self.groups.groups_of(result.username), "basic")

    def check_password(self, environ: dict[str, Any], username: str,
                       password: str) -> PasswordCheck:
        """A username and password: cached, else throttled, else bcrypt on the capped pool.
        The one place passwords are checked, for Basic and the login form alike."""
        username = normalize_username(username)  # the spelling `trackgate users` stores
        current_hash = self.users.hash_for(username)
        if current_hash is not None and self.cache.hit(username, password, current_hash):
            self._count("cache_hits", "allowed")
            return PasswordCheck(username, self.roles.role_for(username), current_hash)

        client_ip = _client_ip(environ)
        refusal = self.throttle.check(client_ip, username)
        if refusal is not None:
            self._count("throttled")
            self._audit_login(environ, username, "login_throttled", 429)
            return PasswordCheck(username, refusal=refusal)
        verdict = self._check(password, current_hash)
        if verdict is None:
            self._count("shed")
            return PasswordCheck(username, refusal=Refusal(
                "the server is busy checking passwords", 1))
        if verdict and current_hash is not None:
            self.cache.add(username, password, current_hash)
            self.throttle.record_success(client_ip, username)
            self._count("allowed")
            role = self.roles.role_for(username)
            self._audit_login(environ, username, "login", 204, role)
            return PasswordCheck(username, role, current_hash)
        self.throttle.record_failure(client_ip, username)
        self._count("refused")
        self._audit_login(environ, username, "login_failed", 401)
        return PasswordCheck(username)

    def authorize_token(self, environ: dict[str, Any], start_response: StartResponse,
                        header: str) -> list[bytes]:
        """An API token (MLFLOW_TRACKING_TOKEN): one sha256 and a dict lookup. Its user must
        still exist; its role is at most the user's current one."""
        token = self.tokens.find(header.strip().partition(" ")[2].strip())
        if token is None or token.expired() or self.users.hash_for(token.user) is None:
            self._count("refused")
            return self.unauthorized(environ, start_response)
        self._count("allowed")
        role = lower_role(self.roles.role_for(token.user), token.role)
        return _allow(start_response, token.user, role, self.groups.groups_of(token.user),
                      f"token:{token.name}")

    def authorize_session(self, environ: dict[str, Any], start_response: StartResponse,
                          session_id: str) -> list[bytes]:
        """The login page's cookie. Valid only while the user's password hash and role are
        what they were at login, and writes must come from this server's own pages."""
        if _is_mlflow_logout_request(environ):
            return self.mlflow_ui_logout(environ, start_response)
        session = self.sessions.get(session_id)
        if session is None:
            return self.unauthorized(environ, start_response)
        if session.role is not None:  # single sign-on: the provider's word at login
            return self.allow_sign_on_session(environ, start_response, session)
        current_hash = self.users.hash_for(session.username)
        role = self.roles.role_for(session.username)
        if (not self.local_users or current_hash is None
                or session.fingerprint != fingerprint(current_hash, role)):
            self.sessions.end(session_id)  # password, role changed or user removed: over
            self._audit_login(environ, session.username, "session_ended", 401)
            return self.unauthorized(environ, start_response)
        if not self.same_origin(environ, environ.get("HTTP_X_ORIGINAL_METHOD") or "GET"):
            # A cookie rides along on requests other pages make: a write needs proof that this
            # server's own page made it (browsers always send Sec-Fetch-Site or Origin).
            return self.unauthorized(environ, start_response)
        self._count("allowed")
        return _allow(start_response, session.username, role,
                      self.groups.groups_of(session.username), "session")

    def allow_sign_on_session(self, environ: dict[str, Any], start_response: StartResponse,
                              session: Session) -> list[bytes]:
        assert session.role is not None
        if self.provider is None or session.fingerprint != self.provider.fingerprint:
            # Single sign-on switched off or reconfigured (other provider, client or role map):
            # what it vouched for no longer holds.
            self.sessions.end(cookie_value(environ.get("HTTP_COOKIE")) or "")
            return self.unauthorized(environ, start_response)
        if self.users.hash_for(session.username) is not None:
            # A local account of this name was created after the sign-on: the name (and what
            # owner checks give it) is the local account's now, never the provider user's.
            self.sessions.end(cookie_value(environ.get("HTTP_COOKIE")) or "")
            self._audit_login(environ, session.username, "session_ended", 401)
            return self.unauthorized(environ, start_response)
        if not self.same_origin(environ, environ.get("HTTP_X_ORIGINAL_METHOD") or "GET"):
            return self.unauthorized(environ, start_response)
        self._count("allowed")
        groups = frozenset(session.groups) | self.groups.groups_of(session.username)
        return _allow(start_response, session.username, session.role, groups, "sso")

    def same_origin(self, environ: dict[str, Any], method: str) -> bool:
        """True for reads, and for writes a browser says come from this server's own origin."""
        if method.upper() in SAFE_METHODS:
            return True
        site = environ.get("HTTP_SEC_FETCH_SITE")
        if site is not None:
            return site == "same-origin"
        return environ.get("HTTP_ORIGIN") in self.origins

    def unauthorized(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        """401. Browsers (they send Sec-Fetch-Mode) get no Basic challenge, so no native
        prompt; a page navigation is sent to the login page (nginx reads X-Trackgate-Login);
        scripts get the Basic challenge as before."""
        mode = environ.get("HTTP_SEC_FETCH_MODE")
        if mode is None:
            return _challenge(start_response)
        headers = []
        method = environ.get("HTTP_X_ORIGINAL_METHOD") or "GET"
        if mode == "navigate" and method in ("GET", "HEAD"):
            target = login.safe_next(environ.get("HTTP_X_ORIGINAL_URI"), self.base)
            headers.append((LOGIN_HEADER, f"{self.base}/login?" + urlencode({"next": target})))
        return _answer(start_response, "401 Unauthorized", headers)

    # --- the login page, logout and who is logged in ------------------------------------------

    def login(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        """GET: the form. POST: check the password like Basic does (cache, throttle, bcrypt
        pool), then a server-side session in a __Host- cookie and back to the page asked for."""
        method = environ.get("REQUEST_METHOD", "GET")
        query = login.form_fields(environ.get("QUERY_STRING", "").encode())
        if method in ("GET", "HEAD"):
            note = "You are logged out." if "logged_out" in query else None
            return self._login_page(start_response, "200 OK",
                                    next_path=login.safe_next(query.get("next"), self.base),
                                    note=note)
        if method != "POST":
            return _answer(start_response, "405 Method Not Allowed", [("Allow", "GET, POST")])
        fields = login.form_fields(_read_body(environ, MAX_FORM))
        next_path = login.safe_next(fields.get("next"), self.base)
        if not self.local_users:
            return self._login_page(start_response, "403 Forbidden", next_path=next_path,
                                    error="Passwords are switched off here: use single sign-on.")
        username, password = fields.get("username", "").strip(), fields.get("password", "")
        if not self.same_origin(environ, "POST"):  # login CSRF: another site logs you in
            return self._login_page(start_response, "403 Forbidden", next_path=next_path,
                                    error="This form must be sent from this server's page.")
        if not username or not password:
            return self._login_page(start_response, "400 Bad Request", next_path=next_path,
                                    username=username, error="Enter your username and password.")
        result = self.check_password(environ, username, password)
        if result.refusal is not None:
            error = (f"Too many attempts: {result.refusal.reason}. "
                     f"Try again in {result.refusal.retry_after} s.")
            return self._login_page(start_response, "429 Too Many Requests",
                                    next_path=next_path, username=username, error=error,
                                    headers=[("Retry-After", str(result.refusal.retry_after))])
        if result.role is None or result.password_hash is None:
            return self._login_page(start_response, "401 Unauthorized", next_path=next_path,
                                    username=username, error="Wrong username or password.")
        session_id = self.sessions.create(result.username,
                                          fingerprint(result.password_hash, result.role))
        self._audit_login(environ, result.username, "session_started", 303, result.role)
        return _answer(start_response, "303 See Other", [
            ("Location", next_path),
            ("Set-Cookie", set_cookie(session_id, self.session_max_age)),
            ("Cache-Control", "no-store"),
        ])

    def _login_page(self, start_response: StartResponse, status: str, *,
                    headers: list[tuple[str, str]] | None = None, **values: Any) -> list[bytes]:
        provider = self.provider.name if self.provider is not None else None
        body = login.page(provider=provider, passwords=self.local_users, base=self.base, **values)
        return _page(start_response, status, body, headers)

    def sign_on_start(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        """GET /login/oidc: to the provider, with state, nonce and a PKCE challenge; the state
        is also set in a __Host- cookie so only this browser can finish this sign-on."""
        if self.provider is None:
            return _answer(start_response, "404 Not Found")
        next_path = login.safe_next(login.form_fields(
            environ.get("QUERY_STRING", "").encode()).get("next"), self.base)
        try:
            url, state, nonce, verifier = self.provider.start()
        except oidc.OIDCError as exc:
            return self._login_page(start_response, "502 Bad Gateway", next_path=next_path,
                                    error=str(exc))
        self.sessions.begin_sign_on(state, nonce, verifier, next_path)
        return _answer(start_response, "303 See Other", [
            ("Location", url), ("Set-Cookie", sign_on_cookie(state)),
            ("Cache-Control", "no-store")])

    def sign_on_callback(self, environ: dict[str, Any],
                         start_response: StartResponse) -> list[bytes]:
        """GET /login/oidc/callback?code&state from the provider: the state must be the one
        this browser started (cookie) and still pending (single use); then the code is
        exchanged, the ID token verified and a session started with the mapped role."""
        if self.provider is None:
            return _answer(start_response, "404 Not Found")
        query = login.form_fields(environ.get("QUERY_STRING", "").encode())
        state = query.get("state", "")
        mine = sign_on_state(environ.get("HTTP_COOKIE"))
        pending = (self.sessions.take_sign_on(state)
                   if state and mine and secrets.compare_digest(state, mine) else None)
        if pending is None:
            return self._login_page(start_response, "400 Bad Request",
                                    error="That sign-on was not started here or took too long: "
                                    "try again.")
        if "error" in query or not query.get("code"):
            return self._login_page(start_response, "401 Unauthorized", next_path=pending.next,
                                    error=f"The provider did not sign you in: "
                                    f"{query.get('error_description') or query.get('error')}")
        try:
            identity = self.provider.finish(query["code"], pending.nonce, pending.verifier)
        except oidc.OIDCError as exc:
            self._audit_login(environ, "", "sso_failed", 401)
            return self._login_page(start_response, "401 Unauthorized", next_path=pending.next,
                                    error=str(exc))
        if self.users.hash_for(identity.username) is not None:
            # A provider's user may pick a name: it must never become a local account (admin).
            self._audit_login(environ, identity.username, "sso_refused_local_name", 403)
            return self._login_page(start_response, "403 Forbidden", next_path=pending.next,
                                    error=f"{identity.username!r} is a local account here; the "
                                    "single sign-on user of that name cannot take it over (an "
                                    "admin can remove the local account).")
        session_id = self.sessions.create(identity.username, self.provider.fingerprint,
                                          identity.role, identity.groups)
        self._audit_login(environ, identity.username, "sso_session_started", 303, identity.role)
        return _answer(start_response, "303 See Other", [
            ("Location", pending.next),
            ("Set-Cookie", set_cookie(session_id, self.session_max_age)),
            ("Set-Cookie", clear_sign_on_cookie()),
            ("Cache-Control", "no-store"),
        ])

    def logout(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        """POST /logout from this server's own page: the session is deleted on the server (a
        copied cookie is worthless from now on) and the cookie cleared."""
        if environ.get("REQUEST_METHOD") != "POST":
            return _answer(start_response, "405 Method Not Allowed", [("Allow", "POST")])
        if not self.same_origin(environ, "POST"):
            return _answer(start_response, "403 Forbidden", body=b"403: logout must come from "
                           b"this server's own page.\n")
        self._end_session(environ)
        return _answer(start_response, "303 See Other", [
            ("Location", f"{self.base}/login?logged_out=1"), ("Set-Cookie", clear_cookie()),
            ("Cache-Control", "no-store")])

    def mlflow_ui_logout(self, environ: dict[str, Any],
                         start_response: StartResponse) -> list[bytes]:
        """The MLflow UI's own Logout (account menu): it clears its cookies, requests
        users/current by XMLHttpRequest with made-up credentials `mlflow-logged-out-*` (sent
        only after a challenge, measured in Chromium), then reloads. Here that request ends the
        session (same-origin only), and the reload lands on the login page."""
        if environ.get("HTTP_SEC_FETCH_SITE") == "same-origin":
            self._end_session(environ)
        return _answer(start_response, "401 Unauthorized", [("Set-Cookie", clear_cookie())])

    def _end_session(self, environ: dict[str, Any]) -> None:
        session_id = cookie_value(environ.get("HTTP_COOKIE"))
        if session_id is None:
            return
        session = self.sessions.get(session_id)
        if self.sessions.end(session_id) and session is not None:
            self._audit_login(environ, session.username, "logout", 303)

    def current_user(self, environ: dict[str, Any], start_response: StartResponse) -> list[bytes]:
        """MLflow's `/ajax-api/2.0/mlflow/users/current`, which its account menu shows. nginx
        routes it here after /auth, with the user the gateway vouched for (clients' copies of
        the header are overwritten). `is_basic_auth` is what makes the UI offer Logout; is_admin
        stays false: it would offer MLflow's own user admin pages, which trackgate has not."""
        user = unquote(environ.get("HTTP_X_TRACKGATE_USER") or "")
        if not user:
            return _answer(start_response, "401 Unauthorized")
        body = json.dumps({"user": {"id": 0, "username": user, "is_admin": False,
                                    "role": environ.get("HTTP_X_TRACKGATE_ROLE", "")},
                           "is_basic_auth": True}).encode()
        return _answer(start_response, "200 OK", [("Content-Type", "application/json"),
                                                  ("Cache-Control", "no-store")], body)

    def _audit_login(
        self, environ: dict[str, Any], username: str, action: str, status: int,
        role: str | None = None,
    ) -> None:
        self.audit.write({
            "event": "login",
            "user": username,
            "role": role,
            "client_ip": _client_ip(environ),
            "method": environ.get("HTTP_X_ORIGINAL_METHOD") or environ.get("REQUEST_METHOD"),
            "path": environ.get("HTTP_X_ORIGINAL_URI") or environ.get("PATH_INFO"),
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


@dataclass(frozen=True)
class PasswordCheck:
    """What a password check found: a role (and the hash it matched) when it passed, a refusal
    when it was throttled, neither when the password was wrong."""

    username: str
    role: str | None = None
    password_hash: str | None = None
    refusal: Refusal | None = None


def _client_ip(environ: dict[str, Any]) -> str:
    return str(environ.get("HTTP_X_REAL_IP") or environ.get("REMOTE_ADDR", ""))


def _is_mlflow_logout(environ: dict[str, Any], username: str) -> bool:
    return (username.startswith(MLFLOW_LOGOUT_USER)
            and (environ.get("HTTP_X_ORIGINAL_URI") or "").split("?")[0] == CURRENT_USER_URI)


def _is_mlflow_logout_request(environ: dict[str, Any]) -> bool:
    """The UI's logout XHR as Chromium sends it: a same-origin cors GET of users/current
    without the `Content-Type: application/json` every other UI call to it carries."""
    return (environ.get("HTTP_SEC_FETCH_MODE") == "cors"
            and environ.get("HTTP_SEC_FETCH_SITE") == "same-origin"
            and (environ.get("HTTP_X_ORIGINAL_METHOD") or "GET") == "GET"
            and not environ.get("CONTENT_TYPE")
            and (environ.get("HTTP_X_ORIGINAL_URI") or "").split("?")[0] == CURRENT_USER_URI)


def _read_body(environ: dict[str, Any], limit: int) -> bytes:
    try:
        length = min(int(environ.get("CONTENT_LENGTH") or 0), limit)
    except ValueError:
        return b""
    return environ["wsgi.input"].read(length) if length > 0 else b""


def _page(start_response: StartResponse, status: str, body: bytes,
          headers: list[tuple[str, str]] | None = None) -> list[bytes]:
    return _answer(start_response, status, [
        ("Content-Type", "text/html; charset=utf-8"),
        ("Content-Security-Policy", login.CSP),
        ("Cache-Control", "no-store"),
        *(headers or [])], body)


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
           groups: frozenset[str] = frozenset(), via: str = "basic") -> list[bytes]:
    # Latin-1 is all an HTTP header can carry; other names are percent-encoded.
    headers = [(USER_HEADER, quote(username, safe="")), (ROLE_HEADER, role),
               (GROUPS_HEADER, ",".join(quote(g, safe="") for g in sorted(groups))),
               (VIA_HEADER, via)]
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
