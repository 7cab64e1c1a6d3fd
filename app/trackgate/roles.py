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


class WatchedFile:
    """A `name:value` file beside the htpasswd file (roles, groups), re-read whenever it is
    replaced or changed: one stat() per lookup. An unreadable file reads as None, and each
    user of this class says what that means (fail closed)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._stamp: tuple[int, int, int] | None = None
        self._lines: dict[str, str] | None = {}
        self._lock = threading.Lock()

    def lines(self) -> dict[str, str] | None:
        try:
            st = os.stat(self.path)
            stamp: tuple[int, int, int] | None = (st.st_ino, st.st_mtime_ns, st.st_size)
        except FileNotFoundError:
            stamp = None
        if stamp != self._stamp:
            with self._lock:
                try:
                    lines: dict[str, str] | None = (
                        parse(decode(self.path.read_bytes(), self.path)) if stamp else {})
                except FileNotFoundError:
                    lines = {}
                except (UserError, OSError) as exc:
                    _log.error("%s unreadable: %s", self.path, exc)
                    lines = None
                self._loaded(lines)
                self._lines, self._stamp = lines, stamp
        return self._lines

    def _loaded(self, lines: dict[str, str] | None) -> None:
        """Called (under the lock) with each new reading: derive what lookups need."""


class RolesWatcher(WatchedFile):
    """The roles file; while it is unreadable everyone is a viewer."""

    def role_for(self, username: str) -> str:
        roles = self.lines()
        if roles is None:
            return VIEWER
        return _effective(roles.get(username))
