"""Roles: who may read, write or administer, kept beside the htpasswd file.

The roles file has one ``name:role`` line per user (``viewer``, ``editor`` or ``admin``) and is
written exactly like the htpasswd file: under an exclusive lock, to a temporary file that is
fsynced and renamed over the original, so the gateway never reads half a file. The gateway
re-reads it when it changes (one stat() per request), so `trackgate users set-role` applies on
the next request, with no restart.

A user with no line is an ``editor`` (what `users add` gives by default, and what every user
could do before roles existed); a line with an unknown role is a ``viewer`` (fail closed).
"""

from __future__ import annotations

import logging
import os
import threading
from pathlib import Path

from .settings import Settings
from .users import HtpasswdStore, UserError, decode, normalize_username, parse

VIEWER, EDITOR, ADMIN = "viewer", "editor", "admin"
ROLES = (VIEWER, EDITOR, ADMIN)
DEFAULT_ROLE = EDITOR
_log = logging.getLogger("trackgate.roles")


def roles_path(settings: Settings) -> Path:
    """The roles file: `roles` in the htpasswd file's directory."""
    return settings.roles_file


def validate_role(role: str) -> str:
    role = role.strip().lower()
    if role not in ROLES:
        raise UserError(f"unknown role {role!r}: choose one of {', '.join(ROLES)}")
    return role


def _effective(value: str | None) -> str:
    if value is None:
        return DEFAULT_ROLE
    return value if value in ROLES else VIEWER


class RolesStore:
    """Read and change the roles file (same atomic, locked writes as the htpasswd store)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        # The htpasswd store's editor writes `name:value` lines under a lock, atomically: the
        # roles file has the same shape, so it shares that code rather than copying it.
        self._file = HtpasswdStore(self.path)

    def read(self) -> dict[str, str]:
        """name -> role as written (unknown roles included)."""
        return self._file.read()

    def role_of(self, name: str) -> str:
        return _effective(self.read().get(normalize_username(name)))

    def set(self, name: str, role: str) -> None:
        name = normalize_username(name)
        role = validate_role(role)
        with self._file._editing() as roles:
            roles[name] = role

    def ensure_default(self, name: str, role: str) -> None:
        """Give NAME a role line if it has none (provisioning)."""
        name = normalize_username(name)
        role = validate_role(role)
        with self._file._editing() as roles:
            roles.setdefault(name, role)

    def remove(self, name: str) -> None:
        name = normalize_username(name)
        with self._file._editing() as roles:
            roles.pop(name, None)


class RolesWatcher:
    """The roles file, reloaded whenever it is replaced or changed (as the htpasswd watcher)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._roles: dict[str, str] = {}
        self._broken = False
        self._lock = threading.Lock()

    def role_for(self, username: str) -> str:
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            with self._lock:
                self._broken = False
                try:
                    self._roles = parse(decode(self.path.read_bytes(), self.path)) if stamp else {}
                except FileNotFoundError:
                    self._roles = {}
                except (UserError, OSError) as exc:  # fail closed: everyone only reads
                    _log.error("roles file unreadable, everyone is a viewer: %s", exc)
                    self._roles, self._broken = {}, True
                self._stamp = stamp
        if self._broken:
            return VIEWER
        return _effective(self._roles.get(username))
