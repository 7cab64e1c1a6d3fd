"""Server-side sessions, the session cookie and where the login page may send a browser back
to: the parts of the sign-in that need no running stack."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from trackgate.server.login import safe_next
from trackgate.server.sessions import COOKIE, SessionStore, cookie_value, fingerprint, set_cookie


def test_a_session_is_found_by_its_id_and_only_its_hash_is_stored(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "sessions.db", idle=60, max_age=600)
    session_id = store.create("alice", fingerprint("$2b$hash", "editor"))
    found = store.get(session_id)
    assert found is not None and found.username == "alice"
    assert found.fingerprint == fingerprint("$2b$hash", "editor")
    assert store.get(session_id + "x") is None
    for path in tmp_path.iterdir():  # db, -wal, -shm: the id itself is nowhere on disk
        assert session_id.encode() not in path.read_bytes()
    assert (tmp_path / "sessions.db").stat().st_mode & 0o077 == 0


def test_another_store_on_the_same_file_sees_and_ends_the_session(tmp_path: Path) -> None:
    first = SessionStore(tmp_path / "sessions.db", idle=60, max_age=600)
    second = SessionStore(tmp_path / "sessions.db", idle=60, max_age=600)  # another process
    session_id = first.create("alice", "print")
    assert second.get(session_id) is not None
    assert second.end(session_id)
    assert first.get(session_id) is None


def test_a_session_ends_after_its_idle_time(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "sessions.db", idle=0.3, max_age=600)
    session_id = store.create("alice", "print")
    time.sleep(0.4)
    assert store.get(session_id) is None
    assert store.count() == 0  # deleted, not just refused


def test_a_session_ends_after_its_absolute_lifetime_however_active(tmp_path: Path) -> None:
    store = SessionStore(tmp_path / "sessions.db", idle=600, max_age=0.5)
    session_id = store.create("alice", "print")
    deadline = time.monotonic() + 0.45
    while time.monotonic() < deadline:  # in use all the time
        assert store.get(session_id) is not None
        time.sleep(0.05)
    time.sleep(0.1)
    assert store.get(session_id) is None


def test_a_new_password_or_role_gives_another_fingerprint() -> None:
    base = fingerprint("$2b$12$old", "editor")
    assert base != fingerprint("$2b$12$new", "editor")
    assert base != fingerprint("$2b$12$old", "admin")


def test_the_cookie_is_host_only_secure_httponly_and_lax() -> None:
    header = set_cookie("abc", 3600)
    assert header.startswith(f"{COOKIE}=abc;") and COOKIE.startswith("__Host-")
    for attribute in ("Path=/", "Secure", "HttpOnly", "SameSite=Lax", "Max-Age=3600"):
        assert attribute in header
    assert "Domain" not in header
    assert cookie_value(f"a=1; {COOKIE}=abc; b=2") == "abc"
    assert cookie_value(f"x{COOKIE}=forged") is None
    assert cookie_value(None) is None


@pytest.mark.parametrize(("target", "expected"), [
    ("/#/experiments/1", "/#/experiments/1"),
    ("/ajax-api/2.0/mlflow/experiments/search?max_results=1",
     "/ajax-api/2.0/mlflow/experiments/search?max_results=1"),
    ("//evil.example/", "/"),
    ("/\\evil.example/", "/"),
    ("https://evil.example/", "/"),
    ("javascript:alert(1)", "/"),
    ("evil.example", "/"),
    ("/\r\nSet-Cookie: x=1", "/"),
    ("/x\\y", "/"),
    ("", "/"),
    (None, "/"),
])
def test_login_sends_back_only_to_paths_of_this_server(target: str | None, expected: str) -> None:
    assert safe_next(target) == expected
