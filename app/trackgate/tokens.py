"""API tokens for scripts and CI: `trackgate tokens create/list/revoke`, checked by the gateway.

A token is 256 random bits shown once; the tokens file beside the htpasswd file keeps only its
sha256 (a random 256-bit secret needs no slow hash), with one line per token::

    <sha256 hex>:<user> <name> <role or -> <created epoch> <expires epoch or 0>

written like the roles file (locked, atomic) and re-read by the gateway when it changes, so a
revoke applies on the next request. A token acts as its user, with at most the user's current
role (`--role` can only lower it); it stops working when revoked, expired or its user removed.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

from .roles import ROLES, WatchedFile, validate_role
from .users import HtpasswdStore, UserError, normalize_username, validate_username

PREFIX = "tg_"  # recognisable in a leaked-secrets scan
_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")
_DURATION = re.compile(r"(\d+)\s*([smhdwy])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400, "y": 365 * 86400}


def digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_expires(text: str) -> int:
    """'90d', '12h', '2w', '1y', '30m', '45s' -> seconds; 'never' -> 0."""
    text = text.strip().lower()
    if text == "never":
        return 0
    match = _DURATION.fullmatch(text)
    if not match or int(match.group(1)) == 0:
        raise UserError(f"--expires {text!r}: give a duration such as 90d, 12h, 2w, 1y "
                        "(or 30m, 45s), or never")
    return int(match.group(1)) * _UNITS[match.group(2)]


def validate_name(name: str) -> str:
    if not _NAME.fullmatch(name):
        raise UserError(f"token name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
    return name


@dataclass(frozen=True)
class Token:
    user: str
    name: str
    role: str | None  # None: the user's role
    created: int
    expires: int  # epoch seconds; 0: never

    def expired(self, now: float | None = None) -> bool:
        return self.expires != 0 and (now or time.time()) >= self.expires

    def line(self) -> str:
        return f"{self.user} {self.name} {self.role or '-'} {self.created} {self.expires}"


def parse_line(value: str) -> Token | None:
    parts = value.split(" ")
    if len(parts) != 5:
        return None
    user, name, role, created, expires = parts
    try:
        return Token(user, name, None if role == "-" else role, int(created), int(expires))
    except ValueError:
        return None


class TokenStore:
    """Create, list and revoke tokens (same locked, atomic writes as the htpasswd file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file = HtpasswdStore(path)

    def create(self) -> None:
        """An empty tokens file if there is none (provisioning, like the groups file)."""
        with self._file._editing():
            if not self.path.exists():
                self._file._write({})

    def tokens(self) -> list[Token]:
        found = (parse_line(v) for v in self._file.read().values())
        return sorted((t for t in found if t is not None), key=lambda t: (t.user, t.name))

    def add(self, user: str, name: str, expires_in: int, role: str | None = None) -> str:
        """A new token for USER; returns the token (shown once, never stored)."""
        user = validate_username(normalize_username(user))
        name = validate_name(name)
        if role is not None:
            role = validate_role(role)
        token = PREFIX + secrets.token_urlsafe(32)
        now = int(time.time())
        entry = Token(user, name, role, now, now + expires_in if expires_in else 0)
        with self._file._editing() as lines:
            for value in lines.values():
                old = parse_line(value)
                if old is not None and (old.user, old.name) == (user, name):
                    raise UserError(
                        f"{user} already has a token named {name!r}: revoke it first "
                        f"(`trackgate tokens revoke --user {user} --name {name}`)")
            lines[digest(token)] = entry.line()
        return token

    def revoke(self, user: str, name: str) -> bool:
        user = normalize_username(user)
        with self._file._editing() as lines:
            gone = [k for k, v in lines.items()
                    if (t := parse_line(v)) is not None and (t.user, t.name) == (user, name)]
            for key in gone:
                del lines[key]
        return bool(gone)

    def revoke_user(self, user: str) -> int:
        """Every token of USER (the user is removed)."""
        user = normalize_username(user)
        with self._file._editing() as lines:
            gone = [k for k, v in lines.items()
                    if (t := parse_line(v)) is not None and t.user == user]
            for key in gone:
                del lines[key]
        return len(gone)


class TokenWatcher(WatchedFile):
    """The gateway's view of the tokens file: sha256 -> token, re-read when it changes."""

    _by_digest: dict[str, Token]

    def _loaded(self, lines: dict[str, str] | None) -> None:
        parsed = {k: parse_line(v) for k, v in (lines or {}).items()}
        self._by_digest = {k: t for k, t in parsed.items() if t is not None}

    def find(self, token: str) -> Token | None:
        if not token.startswith(PREFIX) or len(token) > 100:
            return None
        self.lines()
        return getattr(self, "_by_digest", {}).get(digest(token))


def lower_role(a: str, b: str | None) -> str:
    """The lesser of two roles (viewer < editor < admin); None means no limit."""
    if b is None:
        return a
    return min(a, b, key=lambda r: ROLES.index(r) if r in ROLES else 0)
