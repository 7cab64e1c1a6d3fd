"""Unprivileged accounts for the processes `trackgate up` and `serve-model` start as root.

Started by root, nothing of trackgate's keeps root: the servers and nginx workers run as the
service account (which owns the data dir), a served model as the model account (which owns
nothing). Started by anyone else, everything simply runs as that user.
"""

from __future__ import annotations

import grp
import os
import pwd
import shutil
import stat
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class AccountError(RuntimeError):
    """An account is missing or cannot reach what it needs; the message says what to do."""


@dataclass(frozen=True)
class Account:
    name: str
    uid: int
    gid: int

    def popen_kwargs(self) -> dict[str, Any]:
        """subprocess arguments that start a child as this account, with no extra groups."""
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


def running_as_root() -> bool:
    return os.geteuid() == 0


def lookup(name: str) -> Account | None:
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        return None
    return Account(entry.pw_name, entry.pw_uid, entry.pw_gid)


def ensure_system_account(name: str) -> Account:
    """The account, created as a locked system account (no home, no shell) if missing."""
    found = lookup(name)
    if found is not None:
        return found
    useradd = shutil.which("useradd") or shutil.which("useradd", path="/usr/sbin:/sbin")
    if useradd is None:
        raise AccountError(f"no account {name!r} and no useradd to create it: create it, or set "
                           "TRACKGATE_SERVICE_USER to an existing unprivileged account")
    result = subprocess.run(
        [useradd, "--system", "--user-group", "--home-dir", "/nonexistent", "--no-create-home",
         "--shell", "/usr/sbin/nologin", name], capture_output=True, text=True)
    created = lookup(name)
    if result.returncode != 0 or created is None:
        raise AccountError(f"could not create the account {name!r}: {result.stderr.strip()}")
    return created


def check_reachable(path: Path, account: Account) -> None:
    """Every parent of `path` must let the account pass (x for it), or it cannot open its own
    data dir: say so instead of failing later with EACCES deep inside a server."""
    groups = {account.gid} | {g.gr_gid for g in grp.getgrall() if account.name in g.gr_mem}
    for parent in reversed(path.resolve().parents):
        st = parent.stat()
        if st.st_uid == account.uid:
            ok = bool(st.st_mode & stat.S_IXUSR)
        elif st.st_gid in groups:
            ok = bool(st.st_mode & stat.S_IXGRP)
        else:
            ok = bool(st.st_mode & stat.S_IXOTH)
        if not ok:
            raise AccountError(
                f"the account {account.name!r} cannot reach {path}: {parent} is closed to it "
                f"(mode {stat.S_IMODE(st.st_mode):o}). Choose a data dir under /var/lib or /srv "
                "(TRACKGATE_DATA_DIR), or open that directory with `chmod o+x`."
            )


def give_to(account: Account, root: Path, *, skip: tuple[Path, ...] = ()) -> None:
    """Make `root` and what is under it owned by the account (not following links), except the
    files and trees in `skip` (trees the account created itself, e.g. artifacts; what must stay
    root's)."""
    skipped = {p.resolve() for p in skip}
    for directory, dirs, files in os.walk(root):
        here = Path(directory)
        dirs[:] = [d for d in dirs if (here / d).resolve() not in skipped]
        for path in [here, *(here / f for f in files)]:
            if path.resolve() in skipped:
                continue
            st = path.lstat()
            if (st.st_uid, st.st_gid) != (account.uid, account.gid):
                os.chown(path, account.uid, account.gid, follow_symlinks=False)
