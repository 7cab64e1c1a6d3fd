"""Single sign-on (OIDC) through a real provider: Canaille (pytest-iam) runs in this process,
trackgate's stack is configured with it, and Chromium signs in through both; plus the ID token
checks (wrong audience or issuer refused) against tokens signed with a key of our own."""

from __future__ import annotations

import base64
import io
import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from joserfc import jwt
from joserfc.jwk import KeySet, RSAKey
from trackgate.server.gateway import create_app
from trackgate.server.oidc import OIDCError, parse_role_map, role_for, verify_id_token
from trackgate.server.sessions import COOKIE
from trackgate.settings import Settings
from trackgate.users import HtpasswdStore, UserError

from .browser import chromium
from .support import RunningStack, free_port, running_stack, trackgate

CURRENT = "/ajax-api/2.0/mlflow/users/current"
PASSWORD = "correct horse battery staple"


@pytest.fixture(scope="module")
def https_port() -> int:
    return free_port()


@pytest.fixture(scope="module")
def client(iam_server: Any, https_port: int) -> Any:
    """trackgate registered at the provider (confidential client, code flow)."""
    models = iam_server.models
    client = models.Client(
        client_id=f"trackgate-{secrets.token_hex(4)}",
        client_secret=secrets.token_urlsafe(24),
        client_name="trackgate",
        redirect_uris=[f"https://localhost:{https_port}/login/oidc/callback"],
        grant_types=["authorization_code"],
        response_types=["code"],
        scope=["openid", "profile", "email", "groups"],
        token_endpoint_auth_method="client_secret_basic",
    )
    iam_server.backend.save(client)
    client.audience = [client]  # else the ID token's aud is empty
    iam_server.backend.save(client)
    return client


@pytest.fixture(scope="module")
def person(iam_server: Any) -> Any:
    """A user of the provider in the group mapped to admin."""
    user = iam_server.random_user(user_name=f"sso-{secrets.token_hex(3)}", password=PASSWORD)
    iam_server.random_group(display_name="ml-admins", members=[user])
    return user


@pytest.fixture(scope="module")
def sso_stack(tmp_path_factory: pytest.TempPathFactory, iam_server: Any, client: Any,
              https_port: int) -> Iterator[RunningStack]:
    with running_stack(
        tmp_path_factory.mktemp("sso"), https_port=https_port,
        oidc_issuer=iam_server.url.rstrip("/"), oidc_client_id=client.client_id,
        oidc_client_secret=client.client_secret, oidc_provider_name="Canaille",
        oidc_roles="ml-admins=admin,ml-team=editor",
        oidc_username_claim="sub",  # Canaille 0.3 sends no preferred_username; sub is the login
    ) as running:
        yield running


def test_chromium_signs_in_through_the_provider_with_the_groups_role(
        sso_stack: RunningStack, iam_server: Any, person: Any) -> None:
    with chromium() as browser:
        context: Any = browser.new_context(ignore_https_errors=True)  # type: ignore[attr-defined]
        page = context.new_page()
        page.goto(sso_stack.url + "/#/experiments", timeout=60_000)
        _through_canaille(page, sso_stack, iam_server, person.user_name)
        assert "/login" not in page.url, page.inner_text("main")
        assert page.url == sso_stack.url + "/#/experiments", page.content()[-600:]
        me = page.evaluate("fetch('/ajax-api/2.0/mlflow/users/current', {headers: "
                           "{'Content-Type': 'application/json'}}).then(r => r.json())")
        assert me["user"]["username"] == person.user_name
        assert me["user"]["role"] == "admin"  # ml-admins=admin
        cookie = next(c["value"] for c in context.cookies() if c["name"] == COOKIE)
    answer = sso_stack.get(CURRENT, headers={"Cookie": f"{COOKIE}={cookie}"})
    assert answer.status_code == 200 and answer.json()["user"]["role"] == "admin"


def _through_canaille(page: Any, stack: RunningStack, iam_server: Any, login: str) -> None:
    """From trackgate's login page through Canaille's (login, password, consent) and back."""
    page.get_by_text("Sign in with Canaille").click()
    page.wait_for_url(iam_server.url + "**", timeout=30_000)
    page.fill("input[name=login]", login)
    page.click("button[type=submit]")
    page.fill("input[name=password]", PASSWORD)
    page.click("button[type=submit]")
    consent = page.locator("button[name=answer][value=accept]")
    # Canaille asks for consent once per user and client; it may not ask again.
    deadline = time.monotonic() + 60
    while not page.url.startswith(stack.url) and consent.count() == 0:
        assert time.monotonic() < deadline, page.url + "\n" + page.inner_text("body")[:1500]
        page.wait_for_timeout(200)
    if consent.count():
        consent.click()
    page.wait_for_url(lambda url: url.startswith(stack.url + "/login/oidc/callback")
                      or (url.startswith(stack.url) and "/login" not in url), timeout=60_000)


def test_a_provider_user_cannot_take_over_a_local_account_of_the_same_name(
        sso_stack: RunningStack, iam_server: Any) -> None:
    name, _ = sso_stack.new_user("clash")
    clash = iam_server.random_user(user_name=name, password=PASSWORD)
    iam_server.random_group(display_name="ml-team", members=[clash])
    with chromium() as browser:
        context: Any = browser.new_context(ignore_https_errors=True)  # type: ignore[attr-defined]
        page = context.new_page()
        page.goto(sso_stack.url + "/", timeout=60_000)
        _through_canaille(page, sso_stack, iam_server, name)
        assert "is a local account here" in page.inner_text("main")
        assert not [c for c in context.cookies() if c["name"] == COOKIE]


def test_a_sign_on_session_ends_when_a_local_account_of_its_name_is_created(
        sso_stack: RunningStack, iam_server: Any) -> None:
    # The attack: a provider user picks a name an admin will later give a local account
    # (svc-ci), signs in first, and keeps that name (and what it owns) once the account exists.
    name = f"svc-{secrets.token_hex(3)}"
    squatter = iam_server.random_user(user_name=name, password=PASSWORD)
    iam_server.random_group(display_name="ml-team", members=[squatter])
    with chromium() as browser:
        context: Any = browser.new_context(ignore_https_errors=True)  # type: ignore[attr-defined]
        page = context.new_page()
        page.goto(sso_stack.url + "/#/experiments", timeout=60_000)
        _through_canaille(page, sso_stack, iam_server, name)
        assert "/login" not in page.url, page.inner_text("main")
        session = next(c["value"] for c in context.cookies() if c["name"] == COOKIE)
        cookie = {"Cookie": f"{COOKIE}={session}"}
        assert sso_stack.get(CURRENT, headers=cookie).json()["user"]["username"] == name
        password = secrets.token_urlsafe(12)
        added = trackgate("users", "add", name, "--password-stdin", "--data-dir",
                          str(sso_stack.settings.data_dir), input=password + "\n")
        assert added.returncode == 0, added.stderr
        page.goto(sso_stack.url + "/", timeout=60_000)  # the session's next request
        assert "/login" in page.url, page.url
        assert "Sign in with Canaille" in page.content()
    assert sso_stack.get(CURRENT, headers=cookie).status_code == 401
    assert sso_stack.get(CURRENT, auth=(name, password)).json()["user"]["username"] == name
    assert sso_stack.settings.audit_log is not None
    ended = [e for e in map(json.loads, sso_stack.settings.audit_log.read_text().splitlines())
             if e.get("user") == name and e.get("action") == "session_ended"]
    assert len(ended) == 1, ended


def test_a_callback_this_browser_did_not_start_is_refused(sso_stack: RunningStack) -> None:
    answer = sso_stack.get("/login/oidc/callback?code=stolen&state=forged",
                           headers={"Cookie": "__Host-trackgate-sign-on=forged"})
    assert answer.status_code == 400 and "not started here" in answer.text
    assert "Set-Cookie" not in answer.headers


def test_the_login_page_offers_the_provider_and_local_users_still_work(
        sso_stack: RunningStack) -> None:
    page = sso_stack.get("/login")
    assert "Sign in with Canaille" in page.text and 'name="password"' in page.text
    basic = sso_stack.get("/api/2.0/mlflow/experiments/search?max_results=1",
                          auth=("admin", sso_stack.admin_password))
    assert basic.status_code == 200


# --- the ID token checks, with tokens signed by a key of our own ------------------------------

ISSUER, CLIENT = "https://idp.example", "trackgate"


@pytest.fixture(scope="module")
def key() -> RSAKey:
    return RSAKey.generate_key(2048, parameters={"kid": "test"})


def _token(key: RSAKey, **claims: Any) -> str:
    now = int(time.time())
    body = {"iss": ISSUER, "aud": CLIENT, "sub": "u1", "iat": now, "exp": now + 300,
            "nonce": "n1", **claims}
    body = {k: v for k, v in body.items() if v is not None}
    return jwt.encode({"alg": "RS256", "kid": "test"}, body, key)


@pytest.mark.parametrize(("claims", "why"), [
    ({"aud": "someone-else"}, "aud"),
    ({"aud": None}, "aud"),  # no audience at all: authlib's default would let it pass
    ({"aud": []}, "aud"),
    ({"iss": "https://evil.example"}, "iss"),
    ({"nonce": "replayed"}, "nonce"),
    ({"exp": int(time.time()) - 3600}, "exp"),
    ({"aud": [CLIENT, "other"], "azp": "other"}, "azp"),
])
def test_id_tokens_with_a_wrong_audience_issuer_nonce_or_age_are_refused(
        key: RSAKey, claims: dict[str, Any], why: str) -> None:
    keys = KeySet([key])
    with pytest.raises(OIDCError):
        verify_id_token(_token(key, **claims), keys, issuer=ISSUER, client_id=CLIENT,
                        nonce="n1")


def test_a_right_id_token_passes_and_one_signed_by_another_key_does_not(key: RSAKey) -> None:
    keys = KeySet([key])
    claims = verify_id_token(_token(key), keys, issuer=ISSUER, client_id=CLIENT, nonce="n1")
    assert claims["sub"] == "u1"
    other = RSAKey.generate_key(2048, parameters={"kid": "test"})
    with pytest.raises(OIDCError):
        verify_id_token(_token(other), keys, issuer=ISSUER, client_id=CLIENT, nonce="n1")


def test_groups_map_to_the_highest_role_and_bad_maps_are_clear_errors() -> None:
    mapping = parse_role_map("ml-admins=admin, ml-team=editor,readers=viewer")
    assert role_for(frozenset({"ml-team", "readers"}), mapping, None) == "editor"
    assert role_for(frozenset({"other"}), mapping, None) is None
    assert role_for(frozenset({"other"}), mapping, "viewer") == "viewer"
    for bad in ("ml-admins", "x=root"):
        with pytest.raises(UserError):
            parse_role_map(bad)




def test_with_local_users_switched_off_no_password_logs_in(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, bcrypt_rounds=4, local_users=False)
    HtpasswdStore(settings.htpasswd, 4).add("alice", "alice-password")
    app = create_app(settings)

    def call(path: str, **environ: Any) -> str:
        status: list[str] = []
        base = {"PATH_INFO": path, "REQUEST_METHOD": "GET", "HTTP_X_REAL_IP": "192.0.2.1"}
        b"".join(app({**base, **environ}, lambda s, h: status.append(s)))
        return status[0]

    basic = "Basic " + base64.b64encode(b"alice:alice-password").decode()
    assert call("/auth", HTTP_AUTHORIZATION=basic).startswith("401")
    body = b"username=alice&password=alice-password"
    answer = call("/login", REQUEST_METHOD="POST", HTTP_SEC_FETCH_SITE="same-origin",
                  CONTENT_LENGTH=str(len(body)), **{"wsgi.input": io.BytesIO(body)})
    assert answer.startswith("403")


@pytest.mark.parametrize("values", [{"oidc_roles": "ml-admins"}, {"oidc_roles": "x=root"},
                                    {"oidc_default_role": "superuser"}])
def test_a_bad_role_map_is_a_clear_settings_error(tmp_path: Path, values: dict[str, str]) -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="role"):
        Settings(data_dir=tmp_path, **values)
