"""First-run provisioning, the same for every deployment: directories, the local CA and server
certificate, the first admin user and the rendered nginx config.

`trackgate up` runs it before starting anything; compose's init service runs it as
`trackgate prepare`. Re-running it changes only what is missing or out of date.
"""

from __future__ import annotations

import logging
import os
import secrets
from pathlib import Path

from . import accounts, nginx, tls
from .groups import GroupsStore
from .settings import SETTINGS_FILE_NAME, Settings
from .tokens import TokenStore
from .users import HtpasswdStore

ADMIN = "admin"


def ensure_admin(settings: Settings) -> str | None:
    """Create the admin user with a generated password if there are no users yet; return it."""
    from .roles import ADMIN as ADMIN_ROLE
    from .roles import RolesStore, roles_path

    store = HtpasswdStore(settings.htpasswd, settings.bcrypt_rounds)
    roles = RolesStore(roles_path(settings))
    if store.list():
        # Installs from before roles: their first admin keeps administering.
        if not roles.path.exists() and store.find(ADMIN) is not None:
            roles.ensure_default(ADMIN, ADMIN_ROLE)
        return None
    password = secrets.token_urlsafe(18)
    store.add(ADMIN, password)
    roles.set(ADMIN, ADMIN_ROLE)
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
    _install_operator_certificate(settings)
    ensure_kek_passphrase(settings)
    if settings.proxy_secret_file is not None:
        from .server.proxyauth import ensure_secret

        ensure_secret(settings.proxy_secret_file)
    password = ensure_admin(settings)
    GroupsStore(settings.groups_file).create()
    TokenStore(settings.tokens_file).create()
    nginx.write_if_changed(settings.nginx_conf, nginx.render(settings, standalone=True))
    if account is not None:
        # Not the artifacts (the account wrote them), nor the CA key and the settings file:
        # root's alone (see tls.py; root refuses a settings file the account could change).
        keep = (Path(settings.artifacts_uri), settings.ca_key.parent,
                settings.data_dir / SETTINGS_FILE_NAME)
        accounts.give_to(account, settings.data_dir, skip=keep)
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


# MLflow encrypts what users store in its secret store (AI gateway API keys) under a key derived
# from this passphrase; without it, MLflow uses a default that is printed in its source.
KEK_PASSPHRASE_ENV = "MLFLOW_CRYPTO_KEK_PASSPHRASE"
_log = logging.getLogger("trackgate.provision")


def kek_passphrase_file(settings: Settings) -> Path:
    """One random passphrase per install, mode 0600, beside the other secrets in the data dir
    (backed up with it)."""
    return settings.kek_passphrase_file


def ensure_kek_passphrase(settings: Settings) -> str | None:
    """The install's passphrase for MLflow's secret store, generated on first use.

    None (MLflow's default stays) only when the database already holds secrets encrypted under
    the default: a new passphrase would make them unreadable. Rotate those with
    `mlflow crypto rotate-kek` (README: MLflow's secret store).
    """
    path = kek_passphrase_file(settings)
    try:
        return path.read_text().strip()
    except FileNotFoundError:
        pass
    stored = _stored_mlflow_secrets(settings)
    if stored:
        _log.warning(
            "MLflow's secret store holds %d secrets under its default passphrase; not generating "
            "one (rotate them with `mlflow crypto rotate-kek`, then write the new passphrase to "
            "%s)",
            stored,
            path,
        )
        return None
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    passphrase = secrets.token_urlsafe(32)
    tmp = path.with_name(f".{path.name}.{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(passphrase + "\n")
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # never replaces one another process wrote first
        except FileExistsError:
            return path.read_text().strip()
    finally:
        os.unlink(tmp)
    return passphrase


def _stored_mlflow_secrets(settings: Settings) -> int:
    """How many secrets MLflow's store holds (0 if the database or table does not exist yet)."""
    if settings.sqlite_path is not None and not settings.sqlite_path.exists():
        return 0
    try:
        import sqlalchemy

        engine = sqlalchemy.create_engine(settings.database_uri)
        try:
            with engine.connect() as connection:
                return int(
                    connection.execute(sqlalchemy.text("SELECT count(*) FROM secrets")).scalar_one()
                )
        finally:
            engine.dispose()
    except Exception:  # no table yet, or the database is not up: nothing stored under a key
        return 0


def _install_operator_certificate(settings: Settings) -> None:
    """Copy an operator's certificate and key to where the unprivileged nginx reads them
    (settings.served_cert_files); their own files stay as they are. Re-run on every start, so
    a renewed certificate is picked up by `trackgate up` or `trackgate prepare`."""
    cert, key = settings.served_cert_files
    if cert == settings.cert_file:
        return
    cert.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(cert.parent, 0o700)
    for source, target in ((settings.cert_file, cert), (settings.key_file, key)):
        data = source.read_bytes()
        if target.is_file() and target.read_bytes() == data:
            continue
        tmp = target.with_name(f".{target.name}.tmp")
        tmp.write_bytes(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, target)
