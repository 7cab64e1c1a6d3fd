"""Names and addresses of served models, shared by `serve-model`, the settings and nginx.

A model's scoring server listens on a Unix socket (`unix:/path`: only whoever may enter its
directory connects) or on a TCP address (`host:port`, for a scoring server in another container
or on another host than nginx). It is reachable without the login, so it must never listen on a
public address: a global IP is refused here, and a name or a private/loopback address is the
operator's promise (a compose network of its own, a private network between hosts).
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_HOST_PORT = re.compile(
    r"^(?:\[(?P<v6>[0-9A-Fa-f:.]+)\]|(?P<host>[A-Za-z0-9_.-]+)):(?P<port>\d{1,5})$")


class AddressError(ValueError):
    """A serving name or address is malformed or public; the message says what to write."""


def check_name(name: str) -> str:
    """Names become part of a URL and of nginx config: letters, digits, '.', '_', '-' only."""
    if not NAME_PATTERN.match(name) or ".." in name:
        raise AddressError(
            f"{name!r} is not a serving name: use letters, digits, '.', '_' or '-' "
            "(at most 64, starting with a letter or digit)"
        )
    return name


@dataclass(frozen=True)
class Address:
    """Where a scoring server listens: a socket path, or a host and a port."""

    socket: str | None = None
    host: str = ""
    port: int = 0

    @property
    def upstream(self) -> str:
        """nginx's notation for proxy_pass: `unix:/path:` or `host:port`."""
        if self.socket:
            return f"unix:{self.socket}:"
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def is_name(self) -> bool:
        """A host name (not an IP): nginx must resolve it, per request (see the location)."""
        if self.socket:
            return False
        try:
            ipaddress.ip_address(self.host)
        except ValueError:
            return True
        return False

    def __str__(self) -> str:
        return f"unix:{self.socket}" if self.socket else self.upstream


def parse_address(text: str) -> Address:
    """`unix:/absolute/path` or `host:port` (`[v6]:port`); refuses a public IP."""
    text = text.strip()
    if text.startswith("unix:"):
        path = text.removeprefix("unix:")
        if not path.startswith("/") or any(c in path for c in " ;{}'\"\n") or ".." in path:
            raise AddressError(f"{text!r}: a socket address is unix:/absolute/path")
        return Address(socket=path)
    match = _HOST_PORT.match(text)
    if not match or not 0 < int(match["port"]) < 65536:
        raise AddressError(f"{text!r} is not an address: write unix:/absolute/path or host:port")
    host = match["v6"] or match["host"]
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        ip = None
    if ip is not None and ip.is_unspecified:
        raise AddressError(
            f"{text!r} listens on every interface, public ones included: name the private "
            "address (in compose, the service's own name)")
    if ip is not None and ip.is_global:
        raise AddressError(
            f"{text!r} is a public address: a scoring server answers without the login, so it "
            "listens on loopback, a private network or a Unix socket, never a public IP")
    return Address(host=host, port=int(match["port"]))


def parse_entry(entry: str) -> tuple[str, Address]:
    """One TRACKGATE_SERVED_MODELS entry: NAME=ADDRESS."""
    name, sep, address = entry.partition("=")
    if not sep:
        raise AddressError(f"{entry!r}: a served model is NAME=ADDRESS, e.g. "
                           "diabetes=unix:/run/trackgate-models/diabetes/model.sock")
    return check_name(name.strip()), parse_address(address)
