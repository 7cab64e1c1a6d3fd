"""Render the nginx/ templates from the settings: the one source of nginx config.

`trackgate up` and the compose image render the standalone main file (nginx.conf.j2); an
Ansible-managed host renders only the site (trackgate.conf.j2) into Debian's conf.d.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import jinja2

from .settings import Settings

SITE_TEMPLATE = "trackgate.conf.j2"
MAIN_TEMPLATE = "nginx.conf.j2"
SERVING_TEMPLATE = "serving-location.conf.j2"


def template_dir() -> Path:
    """Templates ship inside the wheel as app/nginx; a source checkout has them at nginx/."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "nginx", here.parent / "nginx"):
        if (candidate / SITE_TEMPLATE).is_file():
            return candidate
    raise FileNotFoundError(f"nginx templates not found next to {here}")


@dataclass
class NginxContext:
    """Everything the templates see, as `tg.<name>`."""

    server_names: list[str]
    listen_address: str
    ipv6: bool
    http_port: int
    https_port: int
    tracking_upstream: str
    gateway_upstream: str
    cert_file: str
    key_file: str
    max_upload: str
    proxy_timeout: int
    extra_includes: list[str] = field(default_factory=list)
    # Standalone main file only.
    user: str | None = None
    pid_file: str = ""
    error_log: str = "/dev/stderr"
    access_log: str = "/dev/stdout"
    temp_dir: str = ""
    mime_types: str = "/etc/nginx/mime.types"

    @property
    def https_port_suffix(self) -> str:
        return "" if self.https_port == 443 else f":{self.https_port}"

    def listen(self, port: int) -> str:
        if self.listen_address in ("", "0.0.0.0", "*"):
            return str(port)
        host = f"[{self.listen_address}]" if ":" in self.listen_address else self.listen_address
        return f"{host}:{port}"


def serving_dir(settings: Settings) -> Path:
    """Where `trackgate serve-model` drops one location file per published model."""
    return settings.data_dir / "serving"


def context(settings: Settings, *, standalone: bool) -> NginxContext:
    ctx = NginxContext(
        server_names=settings.server_names,
        listen_address=settings.listen_address,
        ipv6=settings.listen_ipv6,
        http_port=settings.http_port,
        https_port=settings.https_port,
        tracking_upstream=settings.tracking_address,
        gateway_upstream=settings.gateway_address,
        cert_file=str(settings.cert_file),
        key_file=str(settings.key_file),
        max_upload=settings.max_upload,
        proxy_timeout=settings.proxy_timeout,
        extra_includes=[f"{serving_dir(settings)}/*.conf"],
    )
    if standalone:
        logs = settings.logs
        ctx.pid_file = str(settings.nginx_runtime_dir / "nginx.pid")
        ctx.temp_dir = str(settings.nginx_runtime_dir / "nginx-temp")
        if logs is not None:
            ctx.error_log = str(logs / "nginx-error.log")
            ctx.access_log = str(logs / "nginx-access.log")
        if os.geteuid() == 0:
            ctx.user = settings.nginx_user or "www-data"
    return ctx


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
    upstream: str


def render_serving_location(name: str, upstream: str) -> str:
    """The location publishing one model of `trackgate serve-model` at /serving/NAME/."""
    template = _environment().get_template(SERVING_TEMPLATE)
    return template.render(tg=ServingContext(name, upstream))


def write_if_changed(path: Path, text: str, *, check: bool = False) -> bool:
    """Write atomically when the content differs; True if it differed. `check`: only compare."""
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except FileNotFoundError:
        pass
    if not check:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    return True
