"""A person logging in with a browser: refused without credentials, the MLflow UI with them."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from .browser import chromium
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


def test_without_credentials_the_browser_is_refused(stack: RunningStack) -> None:
    from playwright.sync_api import Error

    with chromium() as browser:
        context: Any = browser.new_context(ignore_https_errors=True)  # type: ignore[attr-defined]
        page = context.new_page()
        with pytest.raises(Error, match="ERR_INVALID_AUTH_CREDENTIALS"):
            page.goto(stack.url + "/", timeout=30_000)


def test_with_wrong_credentials_the_browser_gets_the_401_page(stack: RunningStack) -> None:
    name, password = stack.new_user("browser")
    with chromium() as browser:
        context: Any = browser.new_context(  # type: ignore[attr-defined]
            ignore_https_errors=True, http_credentials={"username": name, "password": "nope"}
        )
        page = context.new_page()
        response = page.goto(stack.url + "/", timeout=30_000)
        assert response is not None and response.status == 401
        assert "wrong or missing username/password" in page.content()
        assert "MLflow" not in page.title()


def test_logged_in_the_mlflow_ui_renders_and_shows_the_clients_experiment(
    stack: RunningStack, experiment: tuple[str, str]
) -> None:
    name, experiment_id = experiment
    with chromium() as browser:
        context: Any = browser.new_context(  # type: ignore[attr-defined]
            ignore_https_errors=True,
            viewport={"width": 1400, "height": 800},
            http_credentials={"username": "admin", "password": stack.admin_password},
        )
        page = context.new_page()
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
