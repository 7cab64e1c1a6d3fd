"""Groups: named sets of users that a grant can name, kept beside the roles file.

The groups file has one ``group:user user ...`` line per group (usernames hold no whitespace)
and is written like the roles file, by the same code: under an exclusive lock, to a temporary
file that is fsynced and renamed over the original. The gateway re-reads it when it changes and
vouches for a user's groups in X-Trackgate-Groups, as for the role: a change applies on the next
request, and the tracking server needs no users file (compose, several hosts).

An experiment or registered model tagged ``trackgate.grant.group:NAME`` = READ, EDIT or MANAGE
grants that level to every member of NAME (a username holds no ``:``, so the tag never names a
user). An unreadable groups file makes nobody a member of anything (fail closed).
"""

from __future__ import annotations

from pathlib import Path

from .roles import WatchedFile
from .settings import Settings
from .users import HtpasswdStore, UserError, normalize_username, validate_username


def groups_path(settings: Settings) -> Path:
    """The groups file: `groups` beside the roles file."""
    return settings.groups_file


def _name(name: str, what: str) -> str:
    try:
        return validate_username(normalize_username(name.strip()))
    except UserError as exc:
        raise UserError(str(exc).replace("username", what, 1)) from None


def _members(value: str) -> list[str]:
    return list(dict.fromkeys(value.split()))


class GroupsStore:
    """Read and change the groups file (the roles file's atomic, locked writes)."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._file = HtpasswdStore(self.path)

    def read(self) -> dict[str, list[str]]:
        """group -> members, in the order they were added."""
        return {group: _members(value) for group, value in self._file.read().items()}

    def create(self) -> None:
        """An empty groups file if there is none (provisioning: so it is created by, and
        belongs to, whoever the data dir is given to, and the tracking server can read it)."""
        with self._file._editing():
            if not self.path.exists():
                self._file._write({})

    def add(self, group: str, users: list[str]) -> None:
        group = _name(group, "group name")
        users = [_name(user, "username") for user in users]
        with self._file._editing() as groups:
            groups[group] = " ".join(dict.fromkeys([*_members(groups.get(group, "")), *users]))

    def remove(self, group: str, users: list[str]) -> None:
        """Take USERS out of GROUP; a group left empty is removed."""
        group = _name(group, "group name")
        gone = {normalize_username(user.strip()) for user in users}
        with self._file._editing() as groups:
            if group not in groups:
                raise UserError(f"no group {group!r}")
            left = [user for user in _members(groups[group]) if user not in gone]
            if left:
                groups[group] = " ".join(left)
            else:
                del groups[group]


class GroupsWatcher(WatchedFile):
    """The groups file as the gateway reads it: user -> the groups they are in."""

    def __init__(self, path: Path) -> None:
        super().__init__(path)
        self._of: dict[str, frozenset[str]] = {}

    def _loaded(self, lines: dict[str, str] | None) -> None:
        of: dict[str, set[str]] = {}
        for group, value in (lines or {}).items():
            for user in _members(value):
                of.setdefault(user, set()).add(group)
        self._of = {user: frozenset(groups) for user, groups in of.items()}

    def groups_of(self, user: str) -> frozenset[str]:
        self.lines()
        return self._of.get(user, frozenset())
