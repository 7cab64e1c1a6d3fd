"""Attack 8 of issue 12: MLflow lets localhost origins through its own cross-origin block, and a
logged-in browser resends cached credentials, so a page on any local port could upload or
overwrite artifacts. nginx now refuses every state-changing request whose Origin or
Sec-Fetch-Site is not this server's own origin. Shown in real Chromium, with a same-origin
control that must still write; the MLflow client (no Origin at all) keeps writing."""

from __future__ import annotations

import http.server
import ssl
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from trackgate.server.sessions import COOKIE

from ..browser import chromium, log_in
from ..support import RunningStack, free_port

pytestmark = pytest.mark.security

# The classic CSRF: a form that posts itself. A navigation carries the browser's credentials
# for the target, and text/plain is a body MLflow's upload-artifact takes.
ATTACK = """<!doctype html><html><body onload="document.forms[0].submit()">
<form method="POST" enctype="text/plain" action="{target}">
<input type="hidden" name="planted" value="by another site"></form></body></html>"""


@pytest.fixture(scope="module")
def run_id(stack: RunningStack) -> str:
    admin = ("admin", stack.admin_password)
    created = stack.request("POST", "/api/2.0/mlflow/experiments/create", auth=admin,
                            json={"name": f"cross-site-{free_port()}"})
    assert created.status_code == 200, created.text
    run = stack.request("POST", "/api/2.0/mlflow/runs/create", auth=admin,
                        json={"experiment_id": created.json()["experiment_id"]})
    assert run.status_code == 200, run.text
    return str(run.json()["run"]["info"]["run_id"])


def _upload_url(stack: RunningStack, run: str, path: str) -> str:
    return f"{stack.url}/ajax-api/2.0/mlflow/upload-artifact?run_uuid={run}&path={path}"


def _artifacts(stack: RunningStack, run: str) -> set[str]:
    listed = stack.get(f"/api/2.0/mlflow/artifacts/list?run_id={run}",
                       auth=("admin", stack.admin_password))
    assert listed.status_code == 200, listed.text
    return {f["path"] for f in listed.json().get("files", [])}


@contextmanager
def _serve_page(page: bytes, tls: ssl.SSLContext | None = None) -> Iterator[int]:
    """The attacker's page, served on a free port of this host (over TLS if given); its port."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 - the stdlib's name
            self.send_response(200)
            self.send_header("Content-Type", "text/html")
            self.send_header("Content-Length", str(len(page)))
            self.end_headers()
            self.wfile.write(page)

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    if tls is not None:
        server.socket = tls.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture(scope="module")
def evil_site(stack: RunningStack, run_id: str) -> Iterator[str]:
    """A page on another port of this host (same site, other origin): http://127.0.0.1:PORT."""
    page = ATTACK.format(target=_upload_url(stack, run_id, "cross-site.txt")).encode()

    with _serve_page(page) as port:
        yield f"http://127.0.0.1:{port}/"


def _browser_context(browser: Any, stack: RunningStack) -> Any:
    """A browser that has signed in on the login page: its session cookie goes along with
    requests other pages make, as far as SameSite=Lax lets it."""
    context = browser.new_context(ignore_https_errors=True)
    log_in(context, stack.url, "admin", stack.admin_password).close()
    return context


@pytest.fixture(scope="module")
def same_site_evil_site(stack: RunningStack, run_id: str) -> Iterator[str]:
    """A page on another port of this very host over HTTPS (https://localhost:PORT): the same
    site as the server, so a SameSite=Lax cookie rides along on its requests; only the Origin /
    Sec-Fetch-Site check stands between it and a write. It posts a form and fires a fetch."""
    target = _upload_url(stack, run_id, "same-site.txt")
    page = (ATTACK.format(target=target).replace(
        "<body", f"<script>fetch({target!r}.replace('same-site.txt', 'same-site-fetch.txt'), "
        "{method: 'POST', mode: 'no-cors', credentials: 'include', body: 'planted'})</script>"
        "<body", 1)).encode()

    tls = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    tls.load_cert_chain(stack.settings.cert_file, stack.settings.key_file)  # valid for localhost
    with _serve_page(page, tls) as port:
        yield f"https://localhost:{port}/"


def test_a_page_on_another_local_port_cannot_make_a_logged_in_browser_write(
        stack: RunningStack, run_id: str, evil_site: str) -> None:
    with chromium() as browser:
        context = _browser_context(browser, stack)
        attacker = context.new_page()
        refused: list[int] = []
        attacker.on("response", lambda r: refused.append(r.status)
                    if "upload-artifact" in r.url else None)
        with attacker.expect_response(lambda r: "upload-artifact" in r.url and r.status != 401,
                                      timeout=60_000):
            attacker.goto(evil_site)
    assert refused[-1] == 403, refused
    assert "cross-site.txt" not in _artifacts(stack, run_id)


def test_a_page_on_another_port_of_the_same_host_over_https_cannot_make_a_signed_in_browser_write(
        stack: RunningStack, run_id: str, same_site_evil_site: str) -> None:
    with chromium() as browser:
        context = _browser_context(browser, stack)
        attacker = context.new_page()
        statuses: list[int] = []
        attacker.on("response", lambda r: statuses.append(r.status)
                    if "upload-artifact" in r.url else None)
        with attacker.expect_response(lambda r: "same-site.txt" in r.url, timeout=60_000):
            attacker.goto(same_site_evil_site)
        attacker.wait_for_timeout(1000)  # the fetch() too
        sent = [r for r in context.cookies() if r["name"] == COOKIE]
    assert sent, "the browser was signed in"
    assert statuses and all(s in (401, 403) for s in statuses), statuses
    assert not {"same-site.txt", "same-site-fetch.txt"} & _artifacts(stack, run_id)


def test_the_servers_own_page_still_writes_in_the_browser(
        stack: RunningStack, run_id: str) -> None:
    with chromium() as browser:
        page = _browser_context(browser, stack).new_page()
        page.goto(stack.url + "/", timeout=120_000)
        status = page.evaluate(
            """url => fetch(url, {method: "POST", headers: {"Content-Type": "text/plain"},
                                  body: "mine"}).then(r => r.status)""",
            _upload_url(stack, run_id, "same-origin.txt"))
    assert status == 200
    assert "same-origin.txt" in _artifacts(stack, run_id)


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"Origin": "http://127.0.0.1:9"}, 403),
        ({"Origin": "http://localhost"}, 403),
        ({"Origin": "null"}, 403),
        ({"Sec-Fetch-Site": "same-site"}, 403),  # another port of this host
        ({"Sec-Fetch-Site": "cross-site"}, 403),
        ({}, 200),  # the MLflow client and curl send neither
        ({"Sec-Fetch-Site": "same-origin"}, 200),
    ],
)
def test_writes_are_judged_by_origin_and_fetch_site(
        stack: RunningStack, run_id: str, headers: dict[str, str], expected: int) -> None:
    answer = stack.request("POST", f"/ajax-api/2.0/mlflow/upload-artifact?run_uuid={run_id}"
                           "&path=header-check.txt", data=b"x",
                           headers={"Content-Type": "text/plain", **headers},
                           auth=("admin", stack.admin_password))
    assert answer.status_code == expected, answer.text


def test_the_servers_own_origin_may_write(stack: RunningStack, run_id: str) -> None:
    answer = stack.request("POST", "/api/2.0/mlflow/runs/log-metric",
                           json={"run_id": run_id, "key": "m", "value": 1, "timestamp": 0},
                           headers={"Origin": stack.settings.public_origins[0]},
                           auth=("admin", stack.admin_password))
    assert answer.status_code == 200, answer.text


def test_reads_from_other_origins_are_not_refused_by_this_check(stack: RunningStack) -> None:
    answer = stack.get("/api/2.0/mlflow/experiments/search?max_results=1",
                       headers={"Origin": "http://127.0.0.1:9", "Sec-Fetch-Site": "cross-site"},
                       auth=("admin", stack.admin_password))
    assert answer.status_code == 200
