"""Everything about nginx in one place: render the nginx/ templates from the settings, find the
binary, build its command line, test a config and reload a running nginx.

`trackgate up` and the compose image render the standalone main file (nginx.conf.j2); an
Ansible-managed host renders only the site (trackgate.conf.j2) into Debian's conf.d.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from . import accounts, served
from .settings import Settings
from .shipped import shipped_dir

SITE_TEMPLATE = "trackgate.conf.j2"
MAIN_TEMPLATE = "nginx.conf.j2"
SERVING_TEMPLATE = "serving-location.conf.j2"


class NginxError(RuntimeError):
    """nginx is missing, refused the config or did not reload; the message says what to do."""


def template_dir() -> Path:
    return shipped_dir("nginx", SITE_TEMPLATE)


@dataclass
class NginxContext:
    """Everything the templates see, as `tg.<name>`."""

    server_names: list[str]
    listen_address: str
    ipv6: bool
    http_port: int
    https_port: int
    tracking_upstream: str
    tracking_servers: list[str]
    gateway_upstream: str
    cert_file: str
    key_file: str
    max_upload: str
    max_api_body: str
    proxy_timeout: int
    trusted_proxies: list[str]
    public_origins: list[str]
    extra_includes: list[str] = field(default_factory=list)
    # Locations of TRACKGATE_SERVED_MODELS, rendered from serving-location.conf.j2.
    served_locations: list[str] = field(default_factory=list)
    proxy_secret: str = ""  # sent to the tracking servers only (see server/proxyauth.py)
    artifact_files_dir: str = ""  # nginx sends downloads from here (server/downloads.py)
    upload_files_dir: str = ""  # nginx writes artifact upload bodies here (server/uploads.py)
    # The metrics listener and where nginx sends its per-request metrics lines (issue 17).
    metrics: bool = False
    metrics_listen: str = ""
    metrics_log: str = ""
    # Everything under this path (TRACKGATE_BASE_PATH), "" for the root.
    base_path: str = ""
    # Standalone main file only.
    pid_file: str = ""
    error_log: str = "/dev/stderr"
    access_log: str = "/dev/stdout"
    temp_dir: str = ""
    mime_types: str = "/etc/nginx/mime.types"

    @property
    def tracking_failover(self) -> bool:
        """Over TCP there may be several servers (a list, or a name that resolves to several
        addresses, as compose's replicas do): nginx then skips a dead one and resends."""
        return len(self.tracking_servers) > 1 or not all(
            s.startswith("unix:") for s in self.tracking_servers)

    @property
    def https_port_suffix(self) -> str:
        return "" if self.https_port == 443 else f":{self.https_port}"

    def listen(self, port: int) -> str:
        if self.listen_address in ("", "0.0.0.0", "*"):
            return str(port)
        host = f"[{self.listen_address}]" if ":" in self.listen_address else self.listen_address
        return f"{host}:{port}"


def context(settings: Settings, *, standalone: bool) -> NginxContext:
    ctx = NginxContext(
        server_names=settings.server_names,
        listen_address=settings.listen_address,
        ipv6=settings.listen_ipv6,
        http_port=settings.http_port,
        https_port=settings.https_port,
        tracking_upstream=settings.tracking_address,
        tracking_servers=settings.tracking_addresses,
        gateway_upstream=settings.gateway_address,
        cert_file=str(settings.cert_file),
        key_file=str(settings.key_file),
        max_upload=settings.max_upload,
        max_api_body=settings.max_api_body,
        proxy_timeout=settings.proxy_timeout,
        trusted_proxies=settings.trusted_proxies,
        public_origins=settings.public_origins,
        extra_includes=[f"{settings.serving_dir}/*.conf"],
        artifact_files_dir=settings.nginx_artifact_root or "",
        metrics=settings.metrics,
        metrics_listen=_host_port(settings.metrics_address, settings.metrics_port),
        metrics_log=settings.metrics_log_address,
        base_path=settings.base_path,
        served_locations=[render_serving_location(name, address)
                          for name, address in map(served.parse_entry, settings.served_models)],
    )
    if settings.proxy_secret_file is not None:
        from .server.proxyauth import read_secret

        ctx.proxy_secret = read_secret(settings.proxy_secret_file)
    if standalone:
        cert, key = settings.served_cert_files
        ctx.cert_file, ctx.key_file = str(cert), str(key)
        # Only nginx on the tracking server's machine, as its account: `trackgate up` (an
        # Ansible host's nginx is another account; compose's another container).
        # Absolute, as the tracking server compares it (nginx would read a relative path
        # against its prefix, the tracking server against the shared working directory).
        upload_dir = settings.nginx_upload_dir
        ctx.upload_files_dir = os.path.abspath(upload_dir) if upload_dir is not None else ""
        logs = settings.logs
        ctx.pid_file = str(settings.nginx_runtime_dir / "nginx.pid")
        ctx.temp_dir = str(settings.nginx_runtime_dir / "nginx-temp")
        if logs is not None:
            ctx.error_log = str(logs / "nginx-error.log")
            ctx.access_log = str(logs / "nginx-access.log")
    return ctx


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(template_dir()),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
        autoescape=False,
    )


def render(settings: Settings, *, standalone: bool) -> str:
    template = _environment().get_template(MAIN_TEMPLATE if standalone else SITE_TEMPLATE)
    return template.render(tg=context(settings, standalone=standalone))


@dataclass
class ServingContext:
    """What serving-location.conf.j2 sees, as `tg.<name>`."""

    name: str
    upstream: str  # nginx's notation: unix:/path/model.sock: or host:port
    resolver: str = ""  # set when upstream names a host: nginx resolves it per request


def render_serving_location(name: str, address: str | served.Address) -> str:
    """The location publishing one model at /serving/NAME/: `serve-model`'s own socket, or an
    address another process serves it on (TRACKGATE_SERVED_MODELS)."""
    if isinstance(address, str):
        address = served.parse_address(address)
    served.check_name(name)
    resolver = system_resolver() if address.is_name else ""
    template = _environment().get_template(SERVING_TEMPLATE)
    return template.render(tg=ServingContext(name, address.upstream, resolver))


def system_resolver(resolv_conf: Path = Path("/etc/resolv.conf")) -> str:
    """The first nameserver of this host (in a compose container Docker's, 127.0.0.11), for a
    scoring server named by host: nginx resolves the name at request time, so a container that
    is not running yet (or any more) neither stops nginx from starting nor leaves a stale IP."""
    try:
        lines = resolv_conf.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] == "nameserver":
            return f"[{parts[1]}]" if ":" in parts[1] else parts[1]
    raise NginxError(f"no nameserver in {resolv_conf} to resolve a served model's host name: "
                     "give its address as an IP (host:port) or a Unix socket")


def write_if_changed(path: Path, text: str, *, check: bool = False, mode: int = 0o600) -> bool:
    """Write atomically when the content differs (or its mode does); True if it differed.
    `check`: only compare. The site and nginx.conf hold the proxy secret, so by default only
    their owner reads them: root for the system nginx (Ansible), the service account that runs
    `trackgate up`'s nginx, the uid of compose's nginx; never a file other local accounts read."""
    try:
        if path.read_text(encoding="utf-8") == text and path.stat().st_mode & 0o777 == mode:
            return False
    except FileNotFoundError:
        pass
    if not check:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        # Created with the mode: the secret is never readable by others, not even briefly.
        tmp.unlink(missing_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        os.chmod(tmp, mode)  # past the umask
        os.replace(tmp, path)
    return True


# --- the nginx process ------------------------------------------------------------------------


def find_binary(settings: Settings) -> str:
    found = shutil.which(settings.nginx_binary) or shutil.which(
        settings.nginx_binary, path="/usr/sbin:/usr/local/sbin:/sbin"
    )
    if not found:
        raise NginxError(
            f"nginx not found ({settings.nginx_binary!r} is not on PATH or in /usr/sbin): "
            "install it (Debian/Ubuntu: `sudo apt-get install nginx-light`) "
            "or set TRACKGATE_NGINX_BINARY"
        )
    return found


def argv(settings: Settings, binary: str, *extra: str, pdeathsig: bool = False) -> list[str]:
    """nginx on the standalone config when there is one (`trackgate up`), else the system's
    own (an Ansible host, where Debian's nginx.conf includes our site)."""
    if not settings.nginx_conf.is_file():
        return [binary, *extra]
    return [
        *_unprivileged(settings, pdeathsig=pdeathsig),
        binary,
        "-c",
        str(settings.nginx_conf),
        "-p",
        str(settings.nginx_runtime_dir),
        "-e",
        str(error_log(settings)),
        *extra,
    ]


def _unprivileged(settings: Settings, *, pdeathsig: bool) -> list[str]:
    """Started by root, nginx runs as the service account from the start, master included: no
    root process ever parses a config, log path or pid file that account can write. It keeps
    one capability, binding ports below 1024, and only when a public port needs it."""
    if not accounts.running_as_root():
        return []
    account = accounts.lookup(settings.service_user)
    setpriv = shutil.which("setpriv") or shutil.which("setpriv", path="/usr/bin:/bin")
    if account is None or setpriv is None:
        missing = "setpriv (util-linux)" if account else f"account {settings.service_user!r}"
        raise NginxError(f"cannot start nginx unprivileged: no {missing}")
    prefix = [setpriv, f"--reuid={account.uid}", f"--regid={account.gid}", "--clear-groups"]
    if min(settings.http_port, settings.https_port) < 1024:
        prefix += ["--inh-caps=+net_bind_service", "--ambient-caps=+net_bind_service"]
    if pdeathsig:  # a credential change clears the parent-death signal: setpriv sets it after
        prefix.append("--pdeathsig=TERM")
    return [*prefix, "--"]


def foreground_argv(settings: Settings, binary: str) -> list[str]:
    """What a supervisor runs: nginx in the foreground on the standalone config."""
    return argv(settings, binary, "-g", "daemon off;", pdeathsig=True)


def error_log(settings: Settings) -> Path | str:
    return settings.logs / "nginx-error.log" if settings.logs else "stderr"


def test(settings: Settings, binary: str | None = None) -> None:
    """`nginx -t`: raise NginxError with nginx's own words if the config is refused."""
    binary = binary or find_binary(settings)
    result = subprocess.run(argv(settings, binary, "-t", "-q"), capture_output=True, text=True)
    if result.returncode != 0:
        raise NginxError(f"nginx rejected the config:\n{result.stderr.strip()}")


def reload(settings: Settings) -> None:
    """Test the config, then reload the running nginx (the one `trackgate up` runs, else the
    system's)."""
    binary = find_binary(settings)
    test(settings, binary)
    result = subprocess.run(argv(settings, binary, "-s", "reload"), capture_output=True, text=True)
    if result.returncode != 0:
        raise NginxError(f"nginx did not reload (is the stack running?): {result.stderr.strip()}")
