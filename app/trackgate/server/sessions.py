"""Browser sessions of the login page, kept server-side so they can be ended at once.

A small sqlite database (WAL, so every gateway process and thread sees the same sessions) holds
one row per session: the sha256 of its random id (the id itself lives only in the browser's
cookie), the user, a fingerprint of the user's password hash and role at login, and two times.
A session stops working when

- it is older than ``max_age`` or unused for ``idle`` seconds,
- the user logs out (the row is deleted),
- the user's password hash or role changed, or the user was removed: the fingerprint no longer
  matches what the htpasswd and roles files say now, checked on every request.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

COOKIE = "__Host-trackgate-session"
SIGN_ON_COOKIE = "__Host-trackgate-sign-on"  # the state of a single sign-on under way
# Writing `seen` on every request would make every request a write: once a minute is enough
# for an idle timeout counted in minutes or hours.
SEEN_RESOLUTION = 60.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sessions (
    id_hash     TEXT PRIMARY KEY,
    username    TEXT NOT NULL,
    fingerprint TEXT NOT NULL,
    created     REAL NOT NULL,
    seen        REAL NOT NULL,
    role        TEXT,  -- single sign-on only: the role and groups the provider gave at login
    groups      TEXT
);
CREATE TABLE IF NOT EXISTS oidc_pending (
    state    TEXT PRIMARY KEY,
    nonce    TEXT NOT NULL,
    verifier TEXT NOT NULL,
    next     TEXT NOT NULL,
    created  REAL NOT NULL
)
"""
PENDING_TTL = 600.0  # seconds a browser has to come back from the sign-on provider


def fingerprint(password_hash: str, role: str) -> str:
    """What a session is bound to: a new password or role gives another value."""
    return hashlib.sha256(f"{password_hash}\0{role}".encode()).hexdigest()


def _id_hash(session_id: str) -> str:
    return hashlib.sha256(session_id.encode()).hexdigest()


@dataclass(frozen=True)
class Session:
    username: str
    fingerprint: str
    role: str | None = None  # set for single sign-on sessions (no htpasswd line to follow)
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class Pending:
    """A single sign-on under way: what the callback must match and where to go after."""

    nonce: str
    verifier: str
    next: str


class SessionStore:
    def __init__(self, path: Path, idle: float, max_age: float) -> None:
        self.path = path
        self.idle = idle
        self.max_age = max_age
        self._local = threading.local()
        self._ready = False

    def _db(self) -> sqlite3.Connection:
        db: sqlite3.Connection | None = getattr(self._local, "db", None)
        if db is None:
            if not self._ready:
                # Created 0600 before sqlite opens it: it lists who is logged in.
                with contextlib.suppress(FileExistsError):
                    os.close(os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
            db = sqlite3.connect(self.path, timeout=10, isolation_level=None,
                                 check_same_thread=False)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")
            if not self._ready:
                db.executescript(_SCHEMA)
                self._ready = True
            self._local.db = db
        return db

    def create(self, username: str, print_: str, role: str | None = None,
               groups: frozenset[str] = frozenset()) -> str:
        """A new session for USERNAME; returns its id (for the cookie, never stored)."""
        session_id = secrets.token_urlsafe(32)
        now = time.time()
        db = self._db()
        db.execute("INSERT INTO sessions VALUES (?, ?, ?, ?, ?, ?, ?)",
                   (_id_hash(session_id), username, print_, now, now, role,
                    "\n".join(sorted(groups))))
        # Housekeeping on login, not per request: drop what has expired anyway.
        db.execute("DELETE FROM sessions WHERE created < ? OR seen < ?",
                   (now - self.max_age, now - self.idle))
        return session_id

    def get(self, session_id: str) -> Session | None:
        """The live session with this id, or None (unknown, expired: then it is deleted)."""
        if not session_id or len(session_id) > 100:
            return None
        key = _id_hash(session_id)
        db = self._db()
        row = db.execute("SELECT username, fingerprint, created, seen, role, groups "
                         "FROM sessions WHERE id_hash = ?", (key,)).fetchone()
        if row is None:
            return None
        username, print_, created, seen, role, groups = row
        now = time.time()
        if now - created >= self.max_age or now - seen >= self.idle:
            db.execute("DELETE FROM sessions WHERE id_hash = ?", (key,))
            return None
        if now - seen >= SEEN_RESOLUTION:
            db.execute("UPDATE sessions SET seen = ? WHERE id_hash = ?", (now, key))
        return Session(username, print_, role, tuple(g for g in (groups or "").split("\n") if g))

    def end(self, session_id: str) -> bool:
        """Delete the session (logout, or it no longer matches its user); True if it existed."""
        cursor = self._db().execute("DELETE FROM sessions WHERE id_hash = ?",
                                    (_id_hash(session_id),))
        return cursor.rowcount > 0

    def begin_sign_on(self, state: str, nonce: str, verifier: str, next_path: str) -> None:
        now = time.time()
        db = self._db()
        db.execute("DELETE FROM oidc_pending WHERE created < ?", (now - PENDING_TTL,))
        db.execute("INSERT INTO oidc_pending VALUES (?, ?, ?, ?, ?)",
                   (_id_hash(state), nonce, verifier, next_path, now))

    def take_sign_on(self, state: str) -> Pending | None:
        """The sign-on STATE started, once (deleted as it is read), if not too old."""
        db = self._db()
        key = _id_hash(state)
        row = db.execute("DELETE FROM oidc_pending WHERE state = ? "
                         "RETURNING nonce, verifier, next, created", (key,)).fetchone()
        if row is None or time.time() - row[3] >= PENDING_TTL:
            return None
        return Pending(row[0], row[1], row[2])

    def count(self) -> int:
        return int(self._db().execute("SELECT count(*) FROM sessions").fetchone()[0])

    def live(self) -> int:
        """Sessions neither idle too long nor too old (expired rows wait for housekeeping)."""
        now = time.time()
        return int(self._db().execute(
            "SELECT count(*) FROM sessions WHERE created >= ? AND seen >= ?",
            (now - self.max_age, now - self.idle)).fetchone()[0])


def cookie_value(cookie_header: str | None, cookie: str = COOKIE) -> str | None:
    """The session id from a Cookie header (the first one named COOKIE), or None."""
    if not cookie_header or cookie not in cookie_header:
        return None
    for part in cookie_header.split(";"):
        name, sep, value = part.strip().partition("=")
        if sep and name == cookie:
            return value.strip()
    return None


def sign_on_state(cookie_header: str | None) -> str | None:
    return cookie_value(cookie_header, SIGN_ON_COOKIE)


def sign_on_cookie(state: str) -> str:
    # Lax: the provider's redirect back is a top-level GET, which carries it.
    return (f"{SIGN_ON_COOKIE}={state}; Path=/; Max-Age={int(PENDING_TTL)}; Secure; HttpOnly; "
            "SameSite=Lax")


def clear_sign_on_cookie() -> str:
    return f"{SIGN_ON_COOKIE}=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Lax"


def set_cookie(session_id: str, max_age: int) -> str:
    """__Host-: Secure, Path=/, no Domain, so no other host or plain-HTTP page can set or read
    it; HttpOnly: no script reads it; Lax: other sites' subrequests and POSTs do not carry it."""
    return f"{COOKIE}={session_id}; Path=/; Max-Age={max_age}; Secure; HttpOnly; SameSite=Lax"


def clear_cookie() -> str:
    return f"{COOKIE}=; Path=/; Max-Age=0; Secure; HttpOnly; SameSite=Lax"
