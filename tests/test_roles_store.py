"""The roles and groups files and the audit log on their own (no server): defaults, fail-closed
reads, reload on change, grants through groups, rotation and the `trackgate audit` filters."""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from trackgate.audit import AuditLog, parse_since, read_events
from trackgate.groups import GroupsStore, GroupsWatcher
from trackgate.roles import RolesStore, RolesWatcher
from trackgate.server.access import granted
from trackgate.users import UserError


def test_roles_default_to_editor_and_unknown_roles_read_only(tmp_path: Path) -> None:
    path = tmp_path / "roles"
    store = RolesStore(path)
    watcher = RolesWatcher(path)
    assert watcher.role_for("nobody") == "editor"  # no file: what `users add` gives
    store.set("alice", "viewer")
    store.set("bob", "ADMIN")
    assert watcher.role_for("alice") == "viewer" and watcher.role_for("bob") == "admin"
    with open(path, "a") as f:
        f.write("mallory:root\n")
    assert watcher.role_for("mallory") == "viewer"
    with pytest.raises(UserError, match="unknown role"):
        store.set("carol", "superuser")


def test_a_role_change_is_seen_on_the_next_lookup(tmp_path: Path) -> None:
    path = tmp_path / "roles"
    store, watcher = RolesStore(path), RolesWatcher(path)
    store.set("alice", "viewer")
    assert watcher.role_for("alice") == "viewer"
    store.set("alice", "admin")
    assert watcher.role_for("alice") == "admin"
    store.remove("alice")
    assert watcher.role_for("alice") == "editor"


def test_an_unreadable_roles_file_makes_everyone_a_viewer(tmp_path: Path) -> None:
    path = tmp_path / "roles"
    RolesStore(path).set("alice", "admin")
    watcher = RolesWatcher(path)
    assert watcher.role_for("alice") == "admin"
    path.write_bytes(b"alice:admin\ncaf\xe9:editor\n")
    assert watcher.role_for("alice") == "viewer"
    assert watcher.role_for("alice") == "viewer"  # still, on the next lookup
    path.write_bytes(b"alice:admin\n")
    assert watcher.role_for("alice") == "admin"


def test_groups_are_written_like_roles_and_seen_on_the_next_lookup(tmp_path: Path) -> None:
    path = tmp_path / "groups"
    store, watcher = GroupsStore(path), GroupsWatcher(path)
    assert watcher.groups_of("bob") == frozenset()  # no file: nobody is in a group
    store.add("analysts", ["bob", "carol"])
    store.add("analysts", ["bob"])  # already in: unchanged
    store.add("ops", ["bob"])
    assert store.read() == {"analysts": ["bob", "carol"], "ops": ["bob"]}
    assert watcher.groups_of("bob") == {"analysts", "ops"}
    store.remove("analysts", ["bob"])
    assert watcher.groups_of("bob") == {"ops"} and watcher.groups_of("carol") == {"analysts"}
    store.remove("ops", ["bob"])  # left empty: the group goes
    assert "ops" not in store.read() and watcher.groups_of("bob") == frozenset()
    with pytest.raises(UserError, match="no group"):
        store.remove("ops", ["bob"])
    for bad in ("a:b", "#x", "two words", ""):
        with pytest.raises(UserError):
            store.add(bad, ["bob"])
    with pytest.raises(UserError, match="username"):
        store.add("analysts", ["bo b:x"])
    path.write_bytes(b"analysts:bob\ncaf\xe9:carol\n")  # unreadable: nobody is in a group
    assert watcher.groups_of("bob") == frozenset()


def test_a_grant_level_comes_from_the_user_or_their_groups() -> None:
    asked: list[int] = []

    def groups() -> frozenset[str]:
        asked.append(1)
        return frozenset({"analysts"})

    tags = {"trackgate.grant.bob": "READ", "trackgate.owner": "carol"}
    assert granted(tags, "bob", groups) == 1 and not asked  # no group grant: never asked
    assert granted({**tags, "trackgate.grant.group:analysts": "EDIT"}, "bob", groups) == 2
    assert granted({"trackgate.grant.group:ops": "MANAGE"}, "bob", groups) == 0
    assert granted({"trackgate.grant.group:analysts": "ALL"}, "bob", groups) == 0
    assert granted({"trackgate.grant.group:analysts": "EDIT"}, None, groups) == 0
    # a user named like the group is not its member
    assert granted({"trackgate.grant.analysts": "EDIT"}, "bob", groups) == 0


def test_the_audit_log_survives_rotation_and_filters(tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    log = AuditLog(path)
    log.write({"user": "bob", "action": "create_run", "status": 200})
    os.rename(path, tmp_path / "audit.log.1")  # rotated away, like `trackgate logs rotate`
    log.write({"user": "carol", "action": "set_registered_model_alias", "status": 403})
    log.write({"user": "bob", "action": "login_failed", "status": 401})
    assert len(path.read_text().splitlines()) == 2
    every = list(read_events(path))
    assert [e["action"] for e in every] == [
        "create_run", "set_registered_model_alias", "login_failed"]
    assert [e["action"] for e in read_events(path, user="bob")] == ["create_run",
                                                                     "login_failed"]
    assert [e["user"] for e in read_events(path, action="alias")] == ["carol"]
    future = datetime.now(UTC) + timedelta(minutes=1)
    assert list(read_events(path, since=future)) == []
    assert all(json.loads(line)["time"].endswith("Z") for line in path.read_text().splitlines())


def test_since_takes_a_time_ago_or_an_iso_time() -> None:
    now = datetime.now(UTC)
    assert abs((now - parse_since("2h")) - timedelta(hours=2)) < timedelta(seconds=5)
    assert parse_since("2026-12-01T09:00") == datetime(2026, 12, 1, 9, tzinfo=UTC)
    with pytest.raises(ValueError, match="--since"):
        parse_since("yesterday")
