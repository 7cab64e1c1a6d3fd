"""The login page and server-side sessions through the real stack (nginx + gateway + MLflow),
spoken to as a browser would (Sec-Fetch-* headers, the session cookie) and as scripts do."""

from __future__ import annotations

import re

import pytest
import requests
from trackgate.roles import RolesStore
from trackgate.server.sessions import COOKIE

from .support import RunningStack, fresh_source_ip

NAVIGATE = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Site": "none", "Sec-Fetch-Dest": "document"}
SAME_ORIGIN_FORM = {"Sec-Fetch-Mode": "navigate", "Sec-Fetch-Site": "same-origin"}
UI_FETCH = {"Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin",
            "Content-Type": "application/json; charset=utf-8"}


def log_in(stack: RunningStack, username: str, password: str, next_path: str = "/",
           source_ip: str | None = None) -> requests.Response:
    return stack.request("POST", "/login", source_ip=source_ip, allow_redirects=False,
                         headers=SAME_ORIGIN_FORM,
                         data={"username": username, "password": password, "next": next_path})


def session_cookie(stack: RunningStack, username: str, password: str) -> str:
    answer = log_in(stack, username, password)
    assert answer.status_code == 303, answer.text
    match = re.match(rf"{COOKIE}=([^;]+);", answer.headers["Set-Cookie"])
    assert match, answer.headers["Set-Cookie"]
    return match.group(1)


def with_cookie(stack: RunningStack, cookie: str, method: str, path: str,
                headers: dict[str, str] | None = None, **kwargs: object) -> requests.Response:
    return stack.request(method, path, allow_redirects=False,
                         headers={"Cookie": f"{COOKIE}={cookie}", **(headers or {})}, **kwargs)


def test_a_browser_navigation_without_credentials_goes_to_the_login_page(
        stack: RunningStack) -> None:
    answer = stack.get("/some/page?x=1", headers=NAVIGATE, allow_redirects=False)
    assert answer.status_code == 303
    assert answer.headers["Location"] == "/login?next=%2Fsome%2Fpage%3Fx%3D1"
    assert "WWW-Authenticate" not in answer.headers


def test_browser_subrequests_get_401_without_a_basic_challenge_and_scripts_keep_it(
        stack: RunningStack) -> None:
    path = "/ajax-api/2.0/mlflow/experiments/search?max_results=1"
    ui = stack.get(path, headers={"Sec-Fetch-Mode": "cors", "Sec-Fetch-Site": "same-origin"})
    assert ui.status_code == 401 and "WWW-Authenticate" not in ui.headers
    script = stack.get(path)
    assert script.status_code == 401
    assert script.headers["WWW-Authenticate"].startswith("Basic realm=")
    basic = stack.get(path, auth=("admin", stack.admin_password))
    assert basic.status_code == 200, basic.text


def test_the_login_page_is_a_plain_form_with_a_strict_content_security_policy(
        stack: RunningStack) -> None:
    answer = stack.get("/login?next=%2Fx", headers=NAVIGATE)
    assert answer.status_code == 200
    assert '<form method="post" action="/login">' in answer.text
    assert 'name="next" value="/x"' in answer.text
    policies = answer.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policies and "frame-ancestors 'none'" in policies
    assert "'unsafe-inline'" not in policies.split(",")[0]


def test_login_sets_a_host_only_session_cookie_and_returns_to_the_page_asked_for(
        stack: RunningStack) -> None:
    name, password = stack.new_user("cookie")
    answer = log_in(stack, name, password, next_path="/#/experiments/0")
    assert answer.status_code == 303
    assert answer.headers["Location"] == "/#/experiments/0"
    cookie = answer.headers["Set-Cookie"]
    assert cookie.startswith(f"{COOKIE}=")
    for attribute in ("Secure", "HttpOnly", "SameSite=Lax", "Path=/"):
        assert attribute in cookie
    session = re.match(rf"{COOKIE}=([^;]+);", cookie).group(1)  # type: ignore[union-attr]
    me = with_cookie(stack, session, "GET", "/ajax-api/2.0/mlflow/users/current",
                     headers=UI_FETCH)
    assert me.status_code == 200, me.text
    assert me.json()["user"]["username"] == name and me.json()["is_basic_auth"] is True


@pytest.mark.parametrize("target", ["//evil.example/", "https://evil.example/", "/\\evil.example"])
def test_login_never_sends_the_browser_to_another_site(stack: RunningStack, target: str) -> None:
    name, password = stack.new_user("next")
    answer = log_in(stack, name, password, next_path=target)
    assert answer.status_code == 303 and answer.headers["Location"] == "/"


def test_a_wrong_password_shows_the_error_and_many_are_throttled_with_a_clear_message(
        stack: RunningStack) -> None:
    name, _ = stack.new_user("wrong")
    source = fresh_source_ip()
    limit = stack.settings.failure_limit
    for _ in range(limit):
        answer = log_in(stack, name, "not-the-password", source_ip=source)
        assert answer.status_code == 401
        assert "Wrong username or password." in answer.text
        assert "Set-Cookie" not in answer.headers
    throttled = log_in(stack, name, "not-the-password", source_ip=source)
    assert throttled.status_code == 429
    assert "Too many attempts" in throttled.text and int(throttled.headers["Retry-After"]) > 0


def test_a_login_form_posted_from_another_site_is_refused(stack: RunningStack) -> None:
    name, password = stack.new_user("login-csrf")
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Origin": "https://localhost:1"}, {}):
        answer = stack.request("POST", "/login", headers=headers, allow_redirects=False,
                               data={"username": name, "password": password})
        assert answer.status_code == 403, (headers, answer.status_code)
        assert "Set-Cookie" not in answer.headers


def test_a_cookie_write_needs_proof_it_comes_from_this_servers_own_page(
        stack: RunningStack) -> None:
    name, password = stack.new_user("writer")
    cookie = session_cookie(stack, name, password)
    path = "/ajax-api/2.0/mlflow/experiments/create"
    other_port = stack.url.rsplit(":", 1)[0] + ":1"
    refused = {
        "no browser header": {},  # a cookie without Sec-Fetch-Site/Origin: no proof
        "same site, other port": {"Sec-Fetch-Site": "same-site", "Origin": other_port},
        "other origin": {"Origin": other_port},
        "cross site": {"Sec-Fetch-Site": "cross-site"},
    }
    for why, headers in refused.items():
        answer = with_cookie(stack, cookie, "POST", path, headers=headers,
                             json={"name": f"refused-{name}"})
        assert answer.status_code in (401, 403), (why, answer.status_code, answer.text)
    for n, headers in enumerate(({"Sec-Fetch-Site": "same-origin"}, {"Origin": stack.url})):
        answer = with_cookie(stack, cookie, "POST", path, headers=headers,
                             json={"name": f"allowed-{name}-{n}"})
        assert answer.status_code == 200, answer.text


def test_logout_ends_the_session_on_the_server(stack: RunningStack) -> None:
    name, password = stack.new_user("logout")
    cookie = session_cookie(stack, name, password)
    path = "/ajax-api/2.0/mlflow/experiments/search?max_results=1"
    assert with_cookie(stack, cookie, "GET", path, headers=UI_FETCH).status_code == 200
    cross = with_cookie(stack, cookie, "POST", "/logout", headers={"Sec-Fetch-Site": "same-site"})
    assert cross.status_code == 403  # another port of this host cannot log you out
    assert with_cookie(stack, cookie, "GET", path, headers=UI_FETCH).status_code == 200
    out = with_cookie(stack, cookie, "POST", "/logout", headers={"Sec-Fetch-Site": "same-origin"})
    assert out.status_code == 303 and out.headers["Location"].startswith("/login")
    assert "Max-Age=0" in out.headers["Set-Cookie"]
    assert with_cookie(stack, cookie, "GET", path, headers=UI_FETCH).status_code == 401


def test_a_password_change_a_role_change_and_removal_end_sessions_at_once(
        stack: RunningStack) -> None:
    path = "/ajax-api/2.0/mlflow/experiments/search?max_results=1"
    roles = RolesStore(stack.settings.roles_file)
    changes = {
        "password": lambda name: stack.users.set_password(name, "a-new-password-123"),
        "role": lambda name: roles.set(name, "viewer"),
        "removal": lambda name: stack.users.remove(name),
    }
    for what, change in changes.items():
        name, password = stack.new_user(f"ends-{what}")
        cookie = session_cookie(stack, name, password)
        assert with_cookie(stack, cookie, "GET", path, headers=UI_FETCH).status_code == 200
        change(name)
        answer = with_cookie(stack, cookie, "GET", path, headers=UI_FETCH)
        assert answer.status_code == 401, (what, answer.status_code)
