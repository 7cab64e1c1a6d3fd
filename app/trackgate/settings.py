"""The one settings object: every port, path and knob of a trackgate stack.

Precedence: an explicit argument (a CLI flag) beats the ``TRACKGATE_<FIELD>`` environment
variable, which beats the settings file in the data dir (``DATA_DIR/trackgate.env``), which beats
``/etc/trackgate/trackgate.env``, which beats the default.

Never a ``.env`` in the working directory: `trackgate up` run by root in someone else's directory
must not take its nginx binary from them. (Client settings do read ./.env: see client/.)
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ENV_PREFIX = "TRACKGATE_"
SYSTEM_SETTINGS_FILE = Path("/etc/trackgate/trackgate.env")
SETTINGS_FILE_NAME = "trackgate.env"  # in the data dir
_ROLES = ("viewer", "editor", "admin")  # roles.ROLES (roles.py imports this module)


def _default_data_dir() -> Path:
    if os.geteuid() == 0:  # the service account must reach it: never under /root
        return Path("/var/lib/trackgate")
    xdg = os.environ.get("XDG_DATA_HOME")
    return (Path(xdg) if xdg else Path.home() / ".local" / "share") / "trackgate"


class Settings(BaseSettings):
    """Configuration of one trackgate stack (nginx + auth gateway + MLflow tracking server)."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX, env_file=None, extra="ignore", validate_default=True
    )

    data_dir: Path = Field(
        default_factory=_default_data_dir,
        description="Where the database, artifacts, users, certificates and logs live.",
    )
    hostname: str = Field(
        default="localhost",
        description="Host name clients use; nginx refuses any other Host header.",
    )
    extra_hostnames: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="More accepted host names, comma-separated (also put in the certificate).",
    )
    listen_address: str = Field(
        default="0.0.0.0", description="Address nginx listens on (the only public listener)."
    )
    listen_ipv6: bool = Field(default=False, description="Also listen on [::] (IPv6).")
    http_port: int = Field(default=8080, description="Plain-HTTP port: only redirects to HTTPS.")
    https_port: int = Field(default=8443, description="HTTPS port clients and browsers use.")
    tracking_port: int = Field(
        default=5000, description="TCP port of the MLflow tracking server (internal_transport=tcp)."
    )
    gateway_port: int = Field(
        default=5001, description="TCP port of the auth gateway (internal_transport=tcp)."
    )
    internal_transport: Literal["unix", "tcp"] = Field(
        default="unix",
        description=(
            "How nginx reaches the tracking server and gateway: 'unix' sockets in socket_dir "
            "(only nginx and the service account can connect), or 'tcp' on internal_host "
            "(containers, several hosts)."
        ),
    )
    serving_locations_dir: Path | None = Field(
        default=None,
        description=(
            "Where `serve-model` writes its nginx locations; default data_dir/serving. Where a "
            "root nginx master reads them (Ansible hosts), a root-owned dir such as "
            "/etc/trackgate/serving."
        ),
    )
    socket_dir: Path | None = Field(
        default=None, description="Where the Unix sockets live; default data_dir/run/sockets."
    )
    internal_host: str = Field(
        default="127.0.0.1",
        description=(
            "Address the tracking server and gateway bind to with internal_transport=tcp."
        ),
    )
    tracking_upstream: str | None = Field(
        default=None,
        description="host[:port] nginx proxies to (port default tracking_port); default: the "
        "tracking server's own address.",
    )
    gateway_upstream: str | None = Field(
        default=None,
        description="host[:port] nginx asks about credentials (port default gateway_port); "
        "default: the gateway's own address.",
    )
    backend_store_uri: str | None = Field(
        default=None, description="MLflow backend store; default sqlite in the data dir."
    )
    artifacts_destination: str | None = Field(
        default=None,
        description=(
            "Where the server stores artifacts (clients upload through the proxy); "
            "default data_dir/artifacts."
        ),
    )
    htpasswd_path: Path | None = Field(
        default=None, description="The htpasswd file (bcrypt); default data_dir/htpasswd."
    )
    bcrypt_rounds: int = Field(default=12, ge=4, le=31, description="bcrypt cost for new hashes.")
    tls_cert: Path | None = Field(
        default=None,
        description=(
            "Your certificate (PEM, full chain); default: one issued by a generated local CA."
        ),
    )
    tls_key: Path | None = Field(default=None, description="The key for tls_cert (PEM).")
    workers: int = Field(default=2, ge=1, description="gunicorn workers of the tracking server.")
    threads: int = Field(default=4, ge=1, description="Threads per tracking-server worker.")
    gateway_threads: int = Field(default=32, ge=2, description="Threads of the auth gateway.")
    bcrypt_concurrency: int = Field(
        # One core stays free for nginx, MLflow and cached logins during a flood of guesses
        # (bench/: legit throughput under a spread flood 64 % -> 79 % of unflooded on 2 cores).
        default_factory=lambda: max(1, (os.cpu_count() or 1) - 1),
        ge=1,
        description="bcrypt checks run at once; the rest queue (default: CPU count - 1, min 1).",
    )
    cache_ttl: int = Field(
        default=900, ge=0, description="Seconds a verified credential is answered from memory."
    )
    cache_size: int = Field(default=10_000, ge=0, description="Most credentials kept in memory.")
    failure_limit: int = Field(
        default=10, ge=1, description="Failed logins per client IP, and per user, before 429."
    )
    failure_window: int = Field(
        default=60, ge=1, description="Seconds over which failed logins are counted."
    )
    max_upload: str = Field(
        default="0",
        description="nginx client_max_body_size (0 = no limit, for multi-GB artifacts).",
    )
    max_api_body: str = Field(
        default="64m",
        description=(
            "nginx client_max_body_size of the JSON API (artifact transfers use max_upload): a "
            "huge log-batch body cannot grow a tracking worker without bound."
        ),
    )
    trusted_proxies: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description=(
            "Addresses/CIDRs of load balancers in front of nginx, comma-separated: only their "
            "X-Forwarded-For names the real client (for throttles and logs)."
        ),
    )
    proxy_timeout: int = Field(
        default=900, ge=1, description="Seconds nginx waits on a slow upload or download."
    )
    nginx_binary: str = Field(
        default="nginx", description="nginx executable (PATH, then /usr/sbin)."
    )
    service_user: str = Field(
        default="trackgate",
        description=(
            "Unprivileged account the servers and nginx workers run as when `trackgate up` is "
            "started by root (created if missing); it owns the data dir."
        ),
    )
    model_user: str = Field(
        default="nobody",
        description=(
            "Account a model runs as under `trackgate serve-model` started by root: models "
            "are code, so they get no access to the data dir or the caller's secrets."
        ),
    )
    nginx_run_dir: Path | None = Field(
        default=None,
        description="Where nginx writes its pid and temp files; default data_dir/run "
        "(containers: a writable dir, as the rendered config is mounted read-only).",
    )
    log_dir: Path | None = Field(
        default=None, description="Where logs go; default data_dir/logs ('-' for stderr)."
    )
    log_max_bytes: int = Field(
        default=50_000_000,
        ge=0,
        description=(
            "`trackgate up` rotates its logs when one grows past this size (0: only on "
            "`trackgate logs rotate`)."
        ),
    )
    log_keep: int = Field(
        default=5, ge=1, description="Rotated copies kept of each log (name.1 is the newest)."
    )

    session_idle_timeout: int = Field(
        default=8 * 3600, ge=60,
        description="Seconds a browser session (login page) lives without a request.",
    )
    session_max_age: int = Field(
        default=7 * 86400, ge=60,
        description="Seconds a browser session lives at most, however active (then log in again).",
    )
    sessions_path: Path | None = Field(
        default=None,
        description="The browser sessions database (sqlite, written by the gateway); default "
        "sessions.db beside the htpasswd file.",
    )

    oidc_issuer: str | None = Field(
        default=None,
        description="Single sign-on: the OpenID Connect provider's issuer URL (its "
        "/.well-known/openid-configuration is read); unset: no single sign-on.",
    )
    oidc_client_id: str | None = Field(
        default=None, description="Single sign-on: this server's client id at the provider."
    )
    oidc_client_secret: str | None = Field(
        default=None,
        description="Single sign-on: the client secret (or give oidc_client_secret_file).",
    )
    oidc_client_secret_file: Path | None = Field(
        default=None, description="Single sign-on: a file holding the client secret."
    )
    oidc_scopes: str = Field(
        default="openid profile email groups",
        description="Single sign-on: scopes asked for (space-separated; openid is required).",
    )
    oidc_provider_name: str = Field(
        default="single sign-on", description="Shown on the login page: 'Sign in with ...'."
    )
    oidc_username_claim: str = Field(
        default="preferred_username",
        description="Single sign-on: the ID token claim that gives the trackgate user name.",
    )
    oidc_groups_claim: str = Field(
        default="groups",
        description="Single sign-on: the claim listing the user's groups (for oidc_roles).",
    )
    oidc_roles: str = Field(
        default="",
        description="Single sign-on: group=role pairs, comma-separated (e.g. "
        "'ml-admins=admin,ml-team=editor'); the highest role of a user's groups applies.",
    )
    oidc_default_role: str = Field(
        default="",
        description="Single sign-on: role of a user in none of those groups (viewer, editor, "
        "admin; empty: such users are refused).",
    )
    local_users: bool = Field(
        default=True,
        description="Accept the htpasswd users' passwords (login page, Basic). Off: only single "
        "sign-on (and API tokens) log in.",
    )

    @field_validator("extra_hostnames", "trusted_proxies", mode="before")
    @classmethod
    def _split_commas(cls, value: Any) -> Any:
        if isinstance(value, str):
            return [part.strip() for part in value.split(",") if part.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _valid_networks(cls, value: list[str]) -> list[str]:
        for item in value:
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise ValueError(f"{item!r} is not an IP address or CIDR range") from None
        return value

    @field_validator("oidc_roles")
    @classmethod
    def _valid_role_map(cls, value: str) -> str:
        for part in filter(None, (p.strip() for p in value.split(","))):
            group, sep, role = part.rpartition("=")
            if not sep or not group.strip() or role.strip().lower() not in _ROLES:
                raise ValueError(f"{part!r} is not group=role (role: {', '.join(_ROLES)})")
        return value

    @field_validator("oidc_default_role")
    @classmethod
    def _valid_default_role(cls, value: str) -> str:
        if value.strip() and value.strip().lower() not in _ROLES:
            raise ValueError(f"{value!r} is not a role ({', '.join(_ROLES)}, or empty)")
        return value.strip().lower()

    @field_validator("hostname")
    @classmethod
    def _valid_hostname(cls, value: str) -> str:
        value = value.strip().lower()
        if not value or (not _is_ip(value) and any(c in value for c in " /:@;{}\"'")):
            raise ValueError(
                f"{value!r} is not a host name (give just the name, no scheme or port)"
            )
        return value

    @field_validator("http_port", "https_port", "tracking_port", "gateway_port")
    @classmethod
    def _valid_port(cls, value: int) -> int:
        if not 1 <= value <= 65535:
            raise ValueError(f"{value} is not a TCP port (1-65535)")
        return value

    # Derived values: one place computes every path and URL.
    @property
    def public_origins(self) -> list[str]:
        """The browser origins of this server: writes from any other page are refused."""
        port = "" if self.https_port == 443 else f":{self.https_port}"
        return [f"https://{f'[{n}]' if ':' in n else n}{port}" for n in self.server_names]

    @property
    def server_names(self) -> list[str]:
        names = [self.hostname, *self.extra_hostnames]
        return list(dict.fromkeys(n.lower() for n in names))

    @property
    def database_uri(self) -> str:
        return self.backend_store_uri or f"sqlite:///{self.data_dir / 'mlflow.db'}"

    @property
    def artifacts_uri(self) -> str:
        return self.artifacts_destination or str(self.data_dir / "artifacts")

    @property
    def htpasswd(self) -> Path:
        return self.htpasswd_path or self.data_dir / "htpasswd"

    @property
    def tls_dir(self) -> Path:
        return self.data_dir / "tls"

    @property
    def ca_key(self) -> Path:
        """The local CA's key, apart from what nginx reads (root's alone when root runs it)."""
        return self.tls_dir / "ca-key" / "ca.key"

    @property
    def kek_passphrase_file(self) -> Path:
        """MLflow's secret-store passphrase, one per install (0600, backed up with the rest)."""
        return self.data_dir / "secrets" / "mlflow-kek-passphrase"

    @property
    def roles_file(self) -> Path:
        """Each user's role, beside the htpasswd file."""
        return self.htpasswd.with_name("roles")

    @property
    def groups_file(self) -> Path:
        """Group members (grants may name a group), beside the roles file."""
        return self.htpasswd.with_name("groups")

    @property
    def sessions_db(self) -> Path:
        """Browser sessions (only hashes of their ids), written by the gateway."""
        return self.sessions_path or self.htpasswd.with_name("sessions.db")

    @property
    def tokens_file(self) -> Path:
        """API tokens (only their sha256), beside the roles file."""
        return self.htpasswd.with_name("tokens")

    @property
    def audit_log(self) -> Path | None:
        """One JSON line per write and login (None: logs go to stderr, as in containers)."""
        return None if self.logs is None else self.logs / "audit.log"

    @property
    def ca_cert(self) -> Path:
        """The local CA certificate clients trust (MLFLOW_TRACKING_SERVER_CERT_PATH)."""
        return self.tls_dir / "ca.pem"

    @property
    def cert_file(self) -> Path:
        return self.tls_cert or self.tls_dir / "server.pem"

    @property
    def key_file(self) -> Path:
        return self.tls_key or self.tls_dir / "server.key"

    @property
    def served_cert_files(self) -> tuple[Path, Path]:
        """The certificate and key the standalone nginx reads. Started by root, nginx runs as the
        service account, which may not read an operator's root-only key (Let's Encrypt's is): it
        reads copies in the data dir that provisioning refreshes (see provision.py)."""
        if self.uses_local_ca or os.geteuid() != 0:
            return self.cert_file, self.key_file
        return self.tls_dir / "operator" / "fullchain.pem", self.tls_dir / "operator" / "key.pem"

    @property
    def uses_local_ca(self) -> bool:
        return self.tls_cert is None

    @property
    def run_dir(self) -> Path:
        """Runtime state of `trackgate up`: pid files, the rendered nginx.conf."""
        return self.data_dir / "run"

    @property
    def nginx_conf(self) -> Path:
        """The standalone nginx.conf (`trackgate up`, the compose nginx container)."""
        return self.run_dir / "nginx.conf"

    @property
    def serving_dir(self) -> Path:
        """Where `trackgate serve-model` drops one nginx location file per published model."""
        return self.serving_locations_dir or self.data_dir / "serving"

    @property
    def backups_dir(self) -> Path:
        """Where `trackgate db backup` writes by default (and upgrades back up to)."""
        return self.data_dir / "backups"

    @property
    def sqlite_path(self) -> Path | None:
        """The sqlite database file, when the backend store is sqlite."""
        uri = self.database_uri
        if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
            return Path(uri.removeprefix("sqlite:///"))
        return None

    @property
    def nginx_runtime_dir(self) -> Path:
        return self.nginx_run_dir or self.run_dir

    @property
    def logs(self) -> Path | None:
        """Log directory, or None when logs go to stderr (containers)."""
        if self.log_dir is not None and str(self.log_dir) == "-":
            return None
        return self.log_dir or self.data_dir / "logs"

    @property
    def sockets(self) -> Path:
        return self.socket_dir or self.run_dir / "sockets"

    def bind_address(self, server: str) -> str:
        """Where a server ('tracking' or 'gateway') listens: `unix:/path` or `host:port`."""
        if self.internal_transport == "unix":
            return f"unix:{self.sockets / f'{server}.sock'}"
        port = self.tracking_port if server == "tracking" else self.gateway_port
        host = f"[{self.internal_host}]" if ":" in self.internal_host else self.internal_host
        return f"{host}:{port}"

    @property
    def tracking_address(self) -> str:
        """What nginx proxies to (nginx's notation: `unix:/path` or `host:port`); an upstream
        given without a port (compose: `tracking`) gets tracking_port."""
        if self.tracking_upstream:
            return _with_port(self.tracking_upstream, self.tracking_port)
        return self.bind_address("tracking")

    @property
    def gateway_address(self) -> str:
        if self.gateway_upstream:
            return _with_port(self.gateway_upstream, self.gateway_port)
        return self.bind_address("gateway")

    @property
    def public_url(self) -> str:
        port = "" if self.https_port == 443 else f":{self.https_port}"
        host = f"[{self.hostname}]" if ":" in self.hostname else self.hostname
        return f"https://{host}{port}"

    def layout(self) -> dict[str, Any]:
        """Every derived path, port and URL: what `trackgate config --json` prints, so that
        Ansible, compose and tests read them instead of deriving them again."""
        paths = {
            "data_dir": self.data_dir,
            "htpasswd": self.htpasswd,
            "tls_dir": self.tls_dir,
            "ca_cert": self.ca_cert if self.uses_local_ca else None,
            "ca_key": self.ca_key if self.uses_local_ca else None,
            "roles_file": self.roles_file,
            "groups_file": self.groups_file,
            "sessions_db": self.sessions_db,
            "tokens_file": self.tokens_file,
            "audit_log": self.audit_log,
            "kek_passphrase_file": self.kek_passphrase_file,
            "cert_file": self.cert_file,
            "key_file": self.key_file,
            "run_dir": self.run_dir,
            "socket_dir": self.sockets if self.internal_transport == "unix" else None,
            "nginx_conf": self.nginx_conf,
            "nginx_runtime_dir": self.nginx_runtime_dir,
            "serving_dir": self.serving_dir,
            "backups_dir": self.backups_dir,
            "log_dir": self.logs,
            "sqlite_path": self.sqlite_path,
        }
        return {
            "public_url": self.public_url,
            "server_names": self.server_names,
            "ports": {
                "http": self.http_port,
                "https": self.https_port,
                "tracking": self.tracking_port,
                "gateway": self.gateway_port,
            },
            "tracking_address": self.tracking_address,
            "gateway_address": self.gateway_address,
            # nginx's notation for sockets: http://unix:/path/tracking.sock:/health
            "health_urls": {
                "tracking": f"http://{self.tracking_address}{':' if self._unix('tracking') else ''}"
                "/health",
                "gateway": f"http://{self.gateway_address}{':' if self._unix('gateway') else ''}"
                "/healthz",
                "public": f"{self.public_url}/health",
            },
            "database_uri": _redact(self.database_uri),
            "artifacts_uri": self.artifacts_uri,
            "uses_local_ca": self.uses_local_ca,
            "paths": {k: (str(v) if v is not None else None) for k, v in paths.items()},
            "settings": {
                k: v for k, v in self.to_env().items()
                if k not in (ENV_PREFIX + "BACKEND_STORE_URI", ENV_PREFIX + "OIDC_CLIENT_SECRET")
            },
        }

    def _unix(self, server: str) -> bool:
        address = self.tracking_address if server == "tracking" else self.gateway_address
        return address.startswith("unix:")

    def to_env(self) -> dict[str, str]:
        """The settings as TRACKGATE_* variables, to hand to a child process unchanged."""
        env: dict[str, str] = {}
        for name, value in self.model_dump(exclude_none=True).items():
            if isinstance(value, list):
                value = ",".join(value)
            env[ENV_PREFIX + name.upper()] = str(value)
        return env


def _with_port(upstream: str, port: int) -> str:
    if upstream.startswith("unix:") or (":" in upstream and not upstream.endswith("]")):
        return upstream  # a socket, or host:port / [v6]:port already
    return f"{upstream}:{port}"


def _redact(uri: str) -> str:
    """A database URI without its password, for printing."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _is_ip(value: str) -> bool:
    try:
        ipaddress.ip_address(value)
    except ValueError:
        return False
    return True


class SettingsFileError(ValueError):
    """A settings file others could have written; the message says what to fix."""


def settings_files(data_dir: Path) -> list[Path]:
    """The settings files that exist, lowest precedence first; each must be safe to trust."""
    files = [f for f in (SYSTEM_SETTINGS_FILE, data_dir / SETTINGS_FILE_NAME) if f.is_file()]
    for path in files:
        st = path.stat()
        if st.st_uid not in (0, os.geteuid()) or st.st_mode & 0o022:
            raise SettingsFileError(
                f"{path} can be changed by other accounts (owner uid {st.st_uid}, mode "
                f"{st.st_mode & 0o777:o}): make it owned by you or root and not group/world "
                f"writable (chmod go-w {path})")
    return files


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment and the settings files, with explicit (non-None) overrides
    on top. The data dir is found first (flag, variable, /etc file, default), then its file."""
    explicit = {k: v for k, v in overrides.items() if v is not None}
    system = [SYSTEM_SETTINGS_FILE] if SYSTEM_SETTINGS_FILE.is_file() else None
    data_dir = Settings(_env_file=system, **explicit).data_dir  # type: ignore[call-arg]
    return Settings(_env_file=settings_files(data_dir) or None, **explicit)  # type: ignore[call-arg]
