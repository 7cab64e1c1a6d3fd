"""A person signing in with a browser: the login page (never the native prompt), the MLflow UI
with the account menu showing who is in, its Logout, and sessions that end when they must."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from trackgate.server.sessions import COOKIE

from .browser import chromium, log_in
from .support import RunningStack, clean_env

SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "mlflow-ui-through-trackgate.png"


@pytest.fixture(scope="module")
def experiment(stack: RunningStack) -> tuple[str, str]:
    """An experiment and run created by the real client, to look for in the UI: (name, id)."""
    name = "browser-visible-experiment"
    code = (
        f"import mlflow\nexp = mlflow.set_experiment({name!r})\n"
        "with mlflow.start_run(run_name='first-run'):\n"
        "    mlflow.log_param('lr', 0.01)\n    mlflow.log_metric('accuracy', 0.93)\n"
        "print(exp.experiment_id)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code],
        env=clean_env(**stack.client_env()),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    return name, result.stdout.split()[-1]


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with chromium() as running:
        yield running


def _context(browser: Any, **kwargs: Any) -> Any:
    return browser.new_context(ignore_https_errors=True, **kwargs)


def test_the_login_page_appears_instead_of_the_native_prompt(
        stack: RunningStack, browser: Any) -> None:
    context = _context(browser)
    page = context.new_page()
    response = page.goto(stack.url + "/", timeout=60_000)  # no ERR_INVALID_AUTH_CREDENTIALS
    assert response is not None and response.status == 200
    assert "/login?next=" in page.url and page.title() == "Sign in - trackgate"
    context.close()


def test_a_wrong_password_shows_the_error_on_the_login_page(
        stack: RunningStack, browser: Any) -> None:
    name, _ = stack.new_user("browser")
    context = _context(browser)
    page = context.new_page()
    page.goto(stack.url + "/", timeout=60_000)
    page.fill("#username", name)
    page.fill("#password", "not-the-password")
    with page.expect_response(lambda r: r.url.endswith("/login") and r.request.method == "POST",
                              timeout=60_000) as answer:
        page.click("button[type=submit]")
    assert answer.value.status == 401, answer.value.status
    page.get_by_text("Wrong username or password.").wait_for(timeout=30_000)
    assert not [c for c in context.cookies() if c["name"] == COOKIE]
    context.close()


def test_login_lands_on_the_page_asked_for_and_the_account_menu_shows_the_user(
        stack: RunningStack, browser: Any, experiment: tuple[str, str]) -> None:
    name, password = stack.new_user("lands")
    context = _context(browser, viewport={"width": 1400, "height": 800})
    target = f"/#/experiments/{experiment[1]}/runs?workflowType=machine_learning"
    page = log_in(context, stack.url, name, password, path=target)
    assert page.url == stack.url + target  # the #route too, which no server ever sees
    page.get_by_text("first-run").first.wait_for(timeout=120_000)
    page.get_by_text(name, exact=True).first.wait_for(timeout=60_000)  # MLflow's account menu
    context.close()


def test_the_mlflow_menus_logout_ends_the_session_and_a_replayed_cookie_gets_401(
        stack: RunningStack, browser: Any) -> None:
    name, password = stack.new_user("menu-logout")
    context = _context(browser, viewport={"width": 1400, "height": 800})
    page = log_in(context, stack.url, name, password, path="/#/experiments")
    cookies = {c["name"]: c["value"] for c in context.cookies()}
    assert COOKIE in cookies, (page.url, sorted(cookies))
    cookie = cookies[COOKIE]
    page.get_by_text(name, exact=True).first.click()
    page.get_by_text("Logout", exact=True).first.click()
    page.wait_for_url("**/login?**", timeout=60_000)  # the UI reloads: now the login page
    replayed = stack.get("/ajax-api/2.0/mlflow/experiments/search?max_results=1",
                         headers={"Cookie": f"{COOKIE}={cookie}"})
    assert replayed.status_code == 401
    context.close()


def test_a_password_change_ends_the_users_other_sessions(
        stack: RunningStack, browser: Any) -> None:
    name, password = stack.new_user("two-browsers")
    first, second = _context(browser), _context(browser)
    pages = [log_in(c, stack.url, name, password, path="/#/experiments") for c in (first, second)]
    stack.users.set_password(name, "changed-elsewhere-123")
    for page in pages:
        page.reload()
        page.wait_for_url("**/login?**", timeout=60_000)
    log_in(first, stack.url, name, "changed-elsewhere-123")  # the new password works
    first.close()
    second.close()


def test_logged_in_the_mlflow_ui_renders_and_shows_the_clients_experiment(
    stack: RunningStack, experiment: tuple[str, str], browser: Any
) -> None:
    name, experiment_id = experiment
    context: Any = _context(browser, viewport={"width": 1400, "height": 800})
    page = log_in(context, stack.url, "admin", stack.admin_password)
    failed: list[str] = []
    page.on(
        "response", lambda r: failed.append(f"{r.status} {r.url}") if r.status >= 400 else None
    )
    # The Content-Security-Policy must leave the UI whole: Chromium reports every violation.
    blocked: list[str] = []
    page.on("console", lambda m: blocked.append(m.text)
            if "Content Security Policy" in m.text else None)
    page.goto(stack.url + "/#/experiments", timeout=120_000)
    page.get_by_text(name).first.wait_for(timeout=120_000)
    # MLflow 3 opens experiments in its GenAI view; the runs table is the "Model training" one.
    page.goto(f"{stack.url}/#/experiments/{experiment_id}/runs?workflowType=machine_learning")
    page.get_by_text("first-run").first.wait_for(timeout=120_000)
    # MLflow itself 404s a few optional endpoints (assistant, users); nothing may be refused.
    page.get_by_text("first-run").first.click()  # the run page: charts, params, metrics
    page.wait_for_url("**/runs/**", timeout=120_000)
    page.wait_for_timeout(3000)  # the UI polls, so there is no "network idle" to wait for
    assert not [f for f in failed if f.startswith(("401", "403", "429", "5"))], failed
    assert not blocked, blocked
    if os.environ.get("UPDATE_SCREENSHOTS"):
        close = page.get_by_role("button", name="Close")
        if close.count():
            close.first.click()
        SCREENSHOT.parent.mkdir(exist_ok=True)
        page.screenshot(path=str(SCREENSHOT))
