"""First-run provisioning, the same for every deployment: directories, the local CA and server
certificate, the first admin user and the rendered nginx config.

`trackgate up` runs it before starting anything; compose's init service runs it as
`trackgate prepare`. Re-running it changes only what is missing or out of date.
"""

from __future__ import annotations

import os
import secrets

from . import nginx, tls
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
    """Directories, certificates, the admin user and nginx.conf; returns a new admin password."""
    for path in (
        settings.data_dir,
        settings.run_dir,
        settings.run_dir / "nginx-temp",
        settings.serving_dir,
    ):
        path.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.data_dir, 0o700)
    if settings.logs is not None:
        settings.logs.mkdir(parents=True, exist_ok=True)
    tls.ensure_certificates(settings)
    password = ensure_admin(settings)
    nginx.write_if_changed(settings.nginx_conf, nginx.render(settings, standalone=True))
    return password
