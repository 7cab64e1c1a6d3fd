"""The proxy authenticates itself to the tracking servers with a shared secret.

Across hosts (internal_transport=tcp) nginx reaches the tracking servers over the network, and so
can anything else on it: another host, or a local account on a tracking host. Whoever connects
could send its own X-Trackgate-User and be taken for that user. With `proxy_secret_file` set,
nginx adds the secret to every request to a tracking server (never to a model server), and the
tracking server refuses, before MLflow or the policy layer see it, any request that lacks it.
Only GET /health stays open (it says "OK" and nothing else), for probes and load balancers.

Why a header and not mutual TLS: one string comparison per request (bench: no measurable cost)
and no second PKI to run; the price is that the link itself is not encrypted, so the tracking
port belongs on a private network (README "Several hosts").
"""

from __future__ import annotations

import hmac
import json
import os
import re
import secrets
from collections.abc import Iterable
from pathlib import Path
from typing import Any

HEADER = "X-Trackgate-Proxy-Secret"
ENVIRON_KEY = "HTTP_X_TRACKGATE_PROXY_SECRET"
_VALID = re.compile(r"[A-Za-z0-9_-]{32,256}")


class ProxySecretError(RuntimeError):
    """The secret file is missing, unsafe or malformed; the message says what to do."""


def read_secret(path: Path) -> str:
    try:
        st = path.stat()
        text = path.read_text().strip()
    except FileNotFoundError:
        raise ProxySecretError(
            f"the proxy secret file {path} does not exist: copy it from the proxy host (the "
            "same file on every host), or run `trackgate prepare` there to create it") from None
    except PermissionError:
        raise ProxySecretError(f"cannot read the proxy secret file {path}: permission denied") \
            from None
    if st.st_mode & 0o077:
        raise ProxySecretError(f"the proxy secret file {path} is readable by other accounts "
                               f"(mode {st.st_mode & 0o777:o}): chmod 600 {path}")
    if not _VALID.fullmatch(text):
        raise ProxySecretError(f"the proxy secret in {path} must be 32-256 letters, digits, "
                               "'-' or '_' (e.g. `openssl rand -hex 32`)")
    return text


def ensure_secret(path: Path) -> str:
    """The secret, generated (mode 0600) when the file does not exist yet."""
    if not path.exists():
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(secrets.token_hex(32) + "\n")
    return read_secret(path)


class RequireProxy:
    """WSGI: only requests that carry the proxy's secret reach the app."""

    def __init__(self, app: Any, secret: str) -> None:
        self.app = app
        self.url_map = getattr(app, "url_map", None)
        self._secret = secret.encode()

    def __call__(self, environ: dict[str, Any], start_response: Any) -> Iterable[bytes]:
        given = environ.get(ENVIRON_KEY, "").encode("latin-1", "replace")
        if hmac.compare_digest(given, self._secret) or (
                environ.get("PATH_INFO") == "/health"
                and environ.get("REQUEST_METHOD") in ("GET", "HEAD")):
            environ.pop(ENVIRON_KEY, None)  # MLflow and its logs never see it
            return self.app(environ, start_response)
        body = json.dumps({"error_code": "PERMISSION_DENIED",
                           "message": "only trackgate's proxy may call this server"}).encode()
        start_response("403 Forbidden", [("Content-Type", "application/json"),
                                          ("Content-Length", str(len(body)))])
        return [body]
