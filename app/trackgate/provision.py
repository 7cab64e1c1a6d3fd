"""First-run provisioning, the same for every deployment: directories, the local CA and server
certificate, the first admin user and the rendered nginx config.

`trackgate up` runs it before starting anything; compose's init service runs it as
`trackgate prepare`. Re-running it changes only what is missing or out of date.
"""

from __future__ import annotations

import os
import secrets

from . import accounts, nginx, tls
from .settings import Settings
from .users import HtpasswdStore

ADMIN = "admin"


def ensure_admin(settings: Settings) -> str | None:
    """Create the admin user with a generated password if there are no users yet; return it."""
    store = HtpasswdStore(settings.htpasswd, settings.bcrypt_rounds)
    if store.list():
        return None
    password = secrets.token_urlsafe(18)
    store.add(ADMIN, password)
    return password


def prepare(settings: Settings) -> str | None:
    """Directories, certificates, the admin user and nginx.conf; returns a new admin password.

    As root, the data dir then belongs to the service account the servers run as.
    """
    account = None
    if accounts.running_as_root():
        account = accounts.ensure_system_account(settings.service_user)
        settings.data_dir.mkdir(parents=True, exist_ok=True)
        accounts.check_reachable(settings.data_dir, account)
    for path in (settings.data_dir, settings.run_dir, settings.run_dir / "nginx-temp",
                 settings.serving_dir):
        path.mkdir(parents=True, exist_ok=True)
    if settings.internal_transport == "unix":
        _prepare_socket_dir(settings)
    os.chmod(settings.data_dir, 0o700)
    if settings.logs is not None:
        settings.logs.mkdir(parents=True, exist_ok=True)
    tls.ensure_certificates(settings)
    password = ensure_admin(settings)
    nginx.write_if_changed(settings.nginx_conf, nginx.render(settings, standalone=True))
    if account is not None:
        accounts.give_to(account, settings.data_dir, skip=(settings.data_dir / "artifacts",))
        for outside in (settings.logs, settings.sockets):
            if outside is not None and not outside.is_relative_to(settings.data_dir):
                accounts.give_to(account, outside)
    return password


# sun_path in struct sockaddr_un holds 108 bytes, the terminating NUL included.
_MAX_SOCKET_PATH = 107


def _prepare_socket_dir(settings: Settings) -> None:
    """The sockets' directory is the access control: 0700, only the service account (and the
    nginx workers running as it) may connect."""
    longest = max(settings.bind_address(s) for s in ("tracking", "gateway")).removeprefix("unix:")
    if len(longest.encode()) > _MAX_SOCKET_PATH:
        raise accounts.AccountError(
            f"the socket path {longest} is longer than the {_MAX_SOCKET_PATH} bytes Unix sockets "
            "allow: set TRACKGATE_SOCKET_DIR to a shorter directory")
    settings.sockets.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.sockets, 0o700)
