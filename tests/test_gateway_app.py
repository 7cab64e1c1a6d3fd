"""The auth gateway as a WSGI app, called directly through its factory (no nginx, no gunicorn):
each answer nginx relies on, for each kind of credential and htpasswd line."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import pytest
from trackgate.server.gateway import USER_HEADER, create_app
from trackgate.settings import Settings
from trackgate.users import HtpasswdStore, hash_password


class Answer:
    def __init__(self, app: Any, path: str, auth: tuple[str, str] | None = None,
                 client_ip: str = "192.0.2.10") -> None:
        environ: dict[str, Any] = {"PATH_INFO": path, "REQUEST_METHOD": "GET",
                                   "HTTP_X_REAL_IP": client_ip}
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            environ["HTTP_AUTHORIZATION"] = f"Basic {token}"
        captured: dict[str, Any] = {}

        def start_response(status: str, headers: list[tuple[str, str]]) -> None:
            captured["status"], captured["headers"] = status, dict(headers)

        self.body = b"".join(app(environ, start_response))
        self.status = int(captured["status"].split()[0])
        self.headers: dict[str, str] = captured["headers"]


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return Settings(data_dir=tmp_path, bcrypt_rounds=4, failure_limit=3, bcrypt_concurrency=1)


@pytest.fixture
def store(settings: Settings) -> HtpasswdStore:
    store = HtpasswdStore(settings.htpasswd, settings.bcrypt_rounds)
    store.add("alice", "alice-password")
    return store


def test_health_and_unknown_paths(settings: Settings) -> None:
    app = create_app(settings)
    assert Answer(app, "/healthz").status == 200
    assert Answer(app, "/anything").status == 404


def test_no_credentials_get_a_basic_challenge(settings: Settings, store: HtpasswdStore) -> None:
    answer = Answer(create_app(settings), "/auth")
    assert answer.status == 401
    assert answer.headers["WWW-Authenticate"].startswith("Basic realm=")


def test_right_password_is_allowed_as_that_user_then_answered_from_memory(
        settings: Settings, store: HtpasswdStore) -> None:
    app = create_app(settings)
    first = Answer(app, "/auth", ("alice", "alice-password"))
    assert first.status == 204
    assert first.headers[USER_HEADER] == "alice"
    assert Answer(app, "/auth", ("alice", "alice-password")).status == 204
    assert app.stats["bcrypt_checks"] == 1 and app.stats["cache_hits"] == 1


def test_wrong_password_is_challenged_and_repeated_failures_throttled(
        settings: Settings, store: HtpasswdStore) -> None:
    app = create_app(settings)
    codes = [Answer(app, "/auth", ("alice", f"wrong-{n}")).status for n in range(4)]
    assert codes == [401, 401, 401, 403]  # 403 + Retry-After: nginx answers 429
    throttled = Answer(app, "/auth", ("alice", "wrong-again"))
    assert int(throttled.headers["Retry-After"]) > 0


def test_a_changed_password_misses_the_cache_at_once(
        settings: Settings, store: HtpasswdStore) -> None:
    app = create_app(settings)
    assert Answer(app, "/auth", ("alice", "alice-password")).status == 204
    store.set_password("alice", "a-new-password")
    assert Answer(app, "/auth", ("alice", "alice-password")).status == 401
    assert Answer(app, "/auth", ("alice", "a-new-password"), client_ip="192.0.2.11").status == 204


def test_a_removed_user_is_refused_on_the_next_request(
        settings: Settings, store: HtpasswdStore) -> None:
    app = create_app(settings)
    assert Answer(app, "/auth", ("alice", "alice-password")).status == 204
    store.remove("alice")
    assert Answer(app, "/auth", ("alice", "alice-password")).status == 401


@pytest.mark.parametrize("line", ["carol:!", "carol:*", "carol:!$2y$04$abcdefghijklmnopqrstuu",
                                  "carol:plain", "carol:{SHA}abc="])
def test_disabled_and_non_bcrypt_lines_never_log_in(settings: Settings, line: str) -> None:
    settings.htpasswd.write_text(line + "\n")
    app = create_app(settings)
    for n, password in enumerate(("!", "*", "plain", line.split(":", 1)[1])):
        assert Answer(app, "/auth", ("carol", password), client_ip=f"192.0.2.{n}").status == 401


def test_a_name_beyond_latin1_is_percent_encoded_for_the_header(settings: Settings) -> None:
    settings.htpasswd.write_text(f"jürgen-Ω:{hash_password('pw-of-jurgen', 4)}\n")
    answer = Answer(create_app(settings), "/auth", ("jürgen-Ω", "pw-of-jurgen"))
    assert answer.status == 204
    assert answer.headers[USER_HEADER] == "j%C3%BCrgen-%CE%A9"
