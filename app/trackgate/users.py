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
import re
import sys
import tempfile
import unicodedata
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from passlib.hash import bcrypt

BCRYPT_MAX_BYTES = 72
DEFAULT_MODE = 0o640


class UserError(ValueError):
    """Bad input or state, with a message that says what to do; never a traceback."""


def normalize_username(name: str) -> str:
    """NFC: one spelling per name, so 'é' typed composed or decomposed is the same account."""
    return unicodedata.normalize("NFC", name)


def validate_username(name: str) -> str:
    if not name:
        raise UserError("the username is empty")
    if name.startswith("#"):
        raise UserError(
            f"username {name!r} starts with '#', which makes its htpasswd line a comment"
        )
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


# The only hash accepted at login: bcrypt as htpasswd -B, passlib and OpenBSD write it. Anything
# else (`!` and `*`, the usual way to disable an account, or apr1, SHA, crypt, plaintext) means
# the account is disabled.
_BCRYPT = re.compile(r"\$2[aby]\$(0[4-9]|[12][0-9]|3[01])\$[./A-Za-z0-9]{53}")


def is_bcrypt(hashed: str) -> bool:
    return _BCRYPT.fullmatch(hashed) is not None


def verify_hash(password: str, hashed: str) -> bool:
    """Check a password against a bcrypt hash; any other kind of hash never matches."""
    if not is_bcrypt(hashed):
        return False
    try:
        return bool(bcrypt.verify(password, hashed))
    except (ValueError, TypeError):
        return False


@dataclass(frozen=True)
class Entry:
    """One user line of an htpasswd file."""

    name: str
    hash: str
    line: int

    @property
    def enabled(self) -> bool:
        return is_bcrypt(self.hash)


def decode(data: bytes, path: Path | str) -> str:
    """The file's text; invalid UTF-8 is a UserError naming the line, never a traceback."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise UserError(f"{path} line {line} is not valid UTF-8: fix or remove that line") from None


def parse_entries(text: str) -> list[Entry]:
    """The user lines of an htpasswd file's text; blank and comment lines are skipped."""
    entries = []
    for number, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line or line.startswith("#") or ":" not in line:
            continue
        name, hashed = line.split(":", 1)
        entries.append(Entry(name, hashed, number))
    return entries


def parse(text: str) -> dict[str, str]:
    """Users and hashes of an htpasswd file's text, disabled ones included (the last line of a
    name wins)."""
    return {entry.name: entry.hash for entry in parse_entries(text)}


def enabled_users(text: str) -> dict[str, str]:
    """Only the users who may log in: those with a bcrypt hash."""
    return {name: hashed for name, hashed in parse(text).items() if is_bcrypt(hashed)}


# --- look-alike names ---------------------------------------------------------------------

# Letters of other scripts that look like Latin ones (Unicode's confusables.txt, the part that
# matters for user names); with NFKC and case folding this is the "skeleton" of UTS #39.
_LOOKALIKES = str.maketrans(
    {
        **dict.fromkeys("аαɑ", "a"),
        "в": "b",
        **dict.fromkeys("сϲⅽ", "c"),
        "ԁ": "d",
        **dict.fromkeys("еε", "e"),
        "ɡ": "g",
        "һ": "h",
        **dict.fromkeys("іιɩӏ", "i"),
        "ј": "j",
        "κ": "k",
        "ⅼ": "l",
        "м": "m",
        "п": "n",
        **dict.fromkeys("оοσ", "o"),
        **dict.fromkeys("рρ", "p"),
        "ԛ": "q",
        "г": "r",
        "ѕ": "s",
        "т": "t",
        "υ": "u",
        **dict.fromkeys("νѵ", "v"),
        "ԝ": "w",
        **dict.fromkeys("хχ", "x"),
        **dict.fromkeys("уγ", "y"),
        "ᴢ": "z",
        "0": "o",
        "1": "l",
    }
)


def skeleton(name: str) -> str:
    """What NAME looks like: NFKC, case-folded, look-alike letters mapped to Latin."""
    folded = unicodedata.normalize("NFKC", name).casefold()
    return folded.replace("|", "l").translate(_LOOKALIKES)


def _scripts(name: str) -> set[str]:
    scripts = set()
    for char in name:
        if char.isalpha():
            scripts.add(unicodedata.name(char, "UNKNOWN").split(" ")[0])
    return scripts


def lookalike_warnings(name: str, existing: Iterable[str]) -> list[str]:
    """Why NAME could be mistaken for another account (empty: no reason seen)."""
    warnings = []
    scripts = _scripts(name)
    if len(scripts) > 1:
        warnings.append(
            f"username {name!r} mixes scripts ({', '.join(sorted(scripts))}): it can look like "
            "a different name"
        )
    elif not name.isascii() and skeleton(name).isascii():
        warnings.append(f"username {name!r} looks like the ASCII name {skeleton(name)!r}")
    look = skeleton(name)
    for other in existing:
        if other != name and skeleton(other) == look:
            warnings.append(f"username {name!r} looks like the existing user {other!r}")
    return warnings


class HtpasswdStore:
    """Add, change, remove and check users of one htpasswd file."""

    def __init__(self, path: Path | str, rounds: int = 12) -> None:
        self.path = Path(path)
        self.rounds = rounds

    def read(self) -> dict[str, str]:
        """Every user line (disabled ones too), name -> hash."""
        return {entry.name: entry.hash for entry in self.entries()}

    def entries(self) -> list[Entry]:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return []
        return parse_entries(decode(data, self.path))

    def list(self) -> list[str]:
        return sorted(self.read())

    def find(self, name: str) -> Entry | None:
        """NAME's entry: its NFC spelling, or (for lines written before names were normalised)
        exactly as typed."""
        entries = {entry.name: entry for entry in self.entries()}
        return entries.get(normalize_username(name)) or entries.get(name)

    def verify(self, name: str, password: str) -> bool:
        entry = self.find(name)
        return entry is not None and verify_hash(password, entry.hash)

    def add(self, name: str, password: str) -> None:
        name = validate_username(normalize_username(name))
        hashed = hash_password(password, self.rounds)  # hash outside the lock: it is slow
        with self._editing() as users:
            twin = next((n for n in users if normalize_username(n) == name), None)
            if twin is not None:
                raise UserError(f"user {twin!r} exists; use `trackgate users passwd {name}`")
            users[name] = hashed

    def set_password(self, name: str, password: str) -> None:
        hashed = hash_password(password, self.rounds)
        with self._editing() as users:
            key = _existing(users, name)
            if key is None:
                raise UserError(f"no user {name!r}; use `trackgate users add {name}`")
            users[key] = hashed

    def ensure(self, name: str, password: str) -> bool:
        """Create NAME or change its password, unless it already verifies; True if changed.

        Idempotent, for Ansible and first-start scripts: an unchanged password leaves the file
        (and so every cached login) untouched.
        """
        name = validate_username(normalize_username(name))
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
            key = _existing(users, name)
            if key is None:
                raise UserError(f"no user {name!r} in {self.path}")
            del users[key]

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


def _existing(users: dict[str, str], name: str) -> str | None:
    """The key NAME has in USERS: its NFC spelling, else exactly as typed."""
    for key in (normalize_username(name), name):
        if key in users:
            return key
    return None
