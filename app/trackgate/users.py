"""The htpasswd user store: bcrypt hashes, validated input, atomic locked writes.

The auth gateway reads this file on every change, so a reader must never see a half-written
file: every change is written to a temporary file, fsynced and renamed over the original while
an exclusive lock keeps concurrent editors from losing each other's changes.
"""

from __future__ import annotations

import contextlib
import fcntl
import getpass
import os
import sys
import tempfile
import unicodedata
from collections.abc import Iterator
from pathlib import Path

from passlib.apache import htpasswd_context
from passlib.hash import bcrypt

BCRYPT_MAX_BYTES = 72
DEFAULT_MODE = 0o640


class UserError(ValueError):
    """Bad input or state, with a message that says what to do; never a traceback."""


def validate_username(name: str) -> str:
    if not name:
        raise UserError("the username is empty")
    if ":" in name:
        raise UserError(f"username {name!r} contains ':', which htpasswd uses as separator")
    if any(c.isspace() or unicodedata.category(c).startswith("C") for c in name):
        raise UserError(f"username {name!r} contains whitespace or control characters")
    if len(name.encode()) > 255:
        raise UserError("the username is longer than 255 bytes")
    return name


def validate_password(password: str) -> str:
    if not password:
        raise UserError("the password is empty")
    if "\n" in password or "\r" in password or "\0" in password:
        raise UserError("the password contains a newline or NUL character")
    size = len(password.encode())
    if size > BCRYPT_MAX_BYTES:
        raise UserError(
            f"the password is {size} bytes; bcrypt only uses the first {BCRYPT_MAX_BYTES}, "
            "so longer passwords are refused (pick a shorter one)"
        )
    return password


def read_password(*, from_stdin: bool, new: bool) -> str:
    """The one way a password is read: one line of stdin (its line ending dropped, CRLF too)
    or a terminal prompt. A `new` password is validated, and typed twice at a terminal."""
    if from_stdin:
        line = sys.stdin.readline()
        password = line.removesuffix("\n").removesuffix("\r")
    else:
        if not sys.stdin.isatty():
            raise UserError("no terminal to ask for a password: pipe it in with --password-stdin")
        password = getpass.getpass("Password: ")
        if new:
            validate_password(password)
            if getpass.getpass("Repeat password: ") != password:
                raise UserError("the passwords do not match")
    return validate_password(password) if new else password


def hash_password(password: str, rounds: int = 12) -> str:
    """A bcrypt hash in the `$2y$` form Apache's htpasswd writes."""
    return bcrypt.using(rounds=rounds, ident="2y").hash(validate_password(password))


def verify_hash(password: str, hashed: str) -> bool:
    """Check a password against any hash an htpasswd file may hold (bcrypt, apr1, sha-crypt)."""
    try:
        return bool(htpasswd_context.verify(password, hashed))
    except (ValueError, TypeError):
        return False


def parse(text: str) -> dict[str, str]:
    """Users and hashes of an htpasswd file's text; blank and comment lines are skipped."""
    users: dict[str, str] = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        name, hashed = line.split(":", 1)
        users[name] = hashed
    return users


class HtpasswdStore:
    """Add, change, remove and check users of one htpasswd file."""

    def __init__(self, path: Path | str, rounds: int = 12) -> None:
        self.path = Path(path)
        self.rounds = rounds

    def read(self) -> dict[str, str]:
        try:
            return parse(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return {}

    def list(self) -> list[str]:
        return sorted(self.read())

    def verify(self, name: str, password: str) -> bool:
        hashed = self.read().get(name)
        return hashed is not None and verify_hash(password, hashed)

    def add(self, name: str, password: str) -> None:
        validate_username(name)
        hashed = hash_password(password, self.rounds)  # hash outside the lock: it is slow
        with self._editing() as users:
            if name in users:
                raise UserError(f"user {name!r} exists; use `trackgate users passwd {name}`")
            users[name] = hashed

    def set_password(self, name: str, password: str) -> None:
        hashed = hash_password(password, self.rounds)
        with self._editing() as users:
            if name not in users:
                raise UserError(f"no user {name!r}; use `trackgate users add {name}`")
            users[name] = hashed

    def ensure(self, name: str, password: str) -> bool:
        """Create NAME or change its password, unless it already verifies; True if changed.

        Idempotent, for Ansible and first-start scripts: an unchanged password leaves the file
        (and so every cached login) untouched.
        """
        validate_username(name)
        validate_password(password)
        current = self.read().get(name)
        if current is not None and verify_hash(password, current):
            return False
        hashed = hash_password(password, self.rounds)
        with self._editing() as users:
            users[name] = hashed
        return True

    def remove(self, name: str) -> None:
        with self._editing() as users:
            if name not in users:
                raise UserError(f"no user {name!r} in {self.path}")
            del users[name]

    @contextlib.contextmanager
    def _editing(self) -> Iterator[dict[str, str]]:
        """Yield the users under an exclusive lock; write them back atomically on success."""
        if not self.path.parent.is_dir():
            raise UserError(f"the directory {self.path.parent} does not exist")
        lock_path = self.path.with_name(self.path.name + ".lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            users = self.read()
            before = dict(users)
            yield users
            if users != before:
                self._write(users)

    def _write(self, users: dict[str, str]) -> None:
        text = "".join(f"{name}:{hashed}\n" for name, hashed in users.items())
        try:
            st = self.path.stat()
            mode, uid, gid = st.st_mode & 0o7777, st.st_uid, st.st_gid
        except FileNotFoundError:
            mode, uid, gid = DEFAULT_MODE, -1, -1
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(text)
                f.flush()
                os.fchmod(f.fileno(), mode)
                if os.geteuid() == 0 and uid >= 0:  # keep the owner the gateway runs as
                    os.fchown(f.fileno(), uid, gid)
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
