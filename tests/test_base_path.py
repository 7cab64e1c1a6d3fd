"""trackgate under a sub-path (TRACKGATE_BASE_PATH=/mlflow, issue 17): the UI, REST, ajax-api and
artifacts answer under /mlflow/ on the one-machine stack, and behind an existing nginx site that
proxies /mlflow/ to trackgate (the example in docs/outer-nginx-site.conf, rendered as is with
this machine's names); the MLflow client and a browser work through both."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from .browser import chromium, log_in
from .support import (
    RunningStack,
    clean_env,
    free_port,
    fresh_source_ip,
    running_stack,
    session_from,
)

PREFIX = "/mlflow"
SITE = Path(__file__).resolve().parents[1] / "docs" / "outer-nginx-site.conf"
CLIENT = """
import sys, mlflow
from pathlib import Path
mlflow.set_experiment(sys.argv[1])
with mlflow.start_run(run_name="under-a-prefix") as run:
    mlflow.log_metric("loss", 0.5)
    Path(sys.argv[2]).write_text("kept")
    mlflow.log_artifact(sys.argv[2])
client = mlflow.MlflowClient()
back = client.download_artifacts(run.info.run_id, Path(sys.argv[2]).name, sys.argv[3])
print(Path(back).read_text(), client.get_run(run.info.run_id).data.metrics["loss"])
"""


@dataclass
class Prefixed:
    stack: RunningStack
    outer_port: int

    @property
    def direct(self) -> str:
        return f"https://localhost:{self.stack.settings.https_port}{PREFIX}"

    @property
    def outer(self) -> str:
        return f"https://localhost:{self.outer_port}{PREFIX}"


def _outer_nginx(work: Path, stack: RunningStack, port: int) -> subprocess.Popen[bytes]:
    """The documented site, with this machine's names and files, in an nginx of its own."""
    tls = stack.settings
    site = SITE.read_text()
    for old, new in [
        ("listen 443 ssl http2;", f"listen 127.0.0.1:{port} ssl;"),
        ("/etc/ssl/www.example.org/fullchain.pem", str(tls.cert_file)),
        ("/etc/ssl/www.example.org/key.pem", str(tls.key_file)),
        ("/etc/ssl/trackgate-ca.pem", str(tls.ca_cert)),
        ("server_name www.example.org;", "server_name localhost;"),
        ("https://mlflow.internal:8443", f"https://127.0.0.1:{tls.https_port}"),
        ("proxy_ssl_name mlflow.internal;", "proxy_ssl_name localhost;"),
    ]:
        assert old in site, old
        site = site.replace(old, new)
    user = "user root root;" if os.geteuid() == 0 else ""
    (work / "nginx.conf").write_text(
        f"{user}\npid {work}/nginx.pid;\nerror_log {work}/error.log;\nevents {{}}\nhttp {{\n"
        f"access_log off;\nclient_body_temp_path {work}/body;\nproxy_temp_path {work}/proxy;\n"
        f"{site}\n}}\n")
    proc = subprocess.Popen(["nginx", "-c", str(work / "nginx.conf"), "-p", str(work),
                             "-g", "daemon off;"], stdin=subprocess.DEVNULL,
                            process_group=0)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
            return proc
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError((work / "error.log").read_text()) from None
            time.sleep(0.2)


@pytest.fixture(scope="module")
def prefixed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Prefixed]:
    outer_port = free_port()
    # Clients reach it through the outer site: its port is the public one.
    with running_stack(tmp_path_factory.mktemp("prefixed"), base_path=PREFIX,
                       public_port=outer_port, trusted_proxies=["127.0.0.1/32"],
                       bcrypt_rounds=4) as stack:
        work = tmp_path_factory.mktemp("outer-nginx")
        work.chmod(0o755)
        proc = _outer_nginx(work, stack, outer_port)
        try:
            yield Prefixed(stack, outer_port)
        finally:
            os.kill(proc.pid, signal.SIGQUIT)  # only the nginx this fixture started
            try:
                proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _session(prefixed: Prefixed, auth: bool = True) -> requests.Session:
    session = requests.Session()
    session.trust_env = False  # else REQUESTS_CA_BUNDLE beats `verify`
    session.verify = str(prefixed.stack.ca)
    if auth:
        session.auth = ("admin", prefixed.stack.admin_password)
    return session


def test_config_names_the_public_url_with_the_prefix(prefixed: Prefixed) -> None:
    layout = prefixed.stack.settings.layout()
    assert layout["public_url"] == prefixed.outer
    assert layout["health_urls"]["public"] == f"{prefixed.outer}/health"


@pytest.mark.parametrize("via", ["direct", "outer"])
def test_ui_rest_ajax_and_health_answer_under_the_prefix_only(prefixed: Prefixed,
                                                              via: str) -> None:
    base = getattr(prefixed, via)
    root = base.removesuffix(PREFIX)
    with _session(prefixed) as s:
        page = s.get(f"{base}/", timeout=30)
        assert page.status_code == 200 and "<html" in page.text.lower()
        assert s.get(f"{base}/static-files/favicon.ico", timeout=30).status_code == 200
        for api in ("api", "ajax-api"):
            found = s.get(f"{base}/{api}/2.0/mlflow/experiments/search?max_results=1", timeout=30)
            assert found.status_code == 200 and "experiments" in found.json(), found.text
        assert s.get(f"{base}/health", auth=None, timeout=30).status_code == 200
        # The prefix without its slash, and (direct) the bare root, lead to the UI: relative
        # redirects, right behind any proxy.
        moved = s.get(base, allow_redirects=False, timeout=30)
        assert moved.status_code == 308
        assert moved.headers["Location"] in (f"{PREFIX}/", f"{base}/")
        # Outside the prefix, trackgate serves nothing.
        if via == "direct":
            for path in ("/api/2.0/mlflow/experiments/search?max_results=1", "/health",
                         "/static-files/favicon.ico"):
                assert s.get(root + path, timeout=30).status_code == 404, path
            home = s.get(root + "/", allow_redirects=False, timeout=30)
            assert (home.status_code, home.headers["Location"]) == (308, f"{PREFIX}/")
        # Metrics stay off the public listener under the prefix too.
        assert s.get(f"{base}/metrics", timeout=30).status_code == 404
        # Still behind the gateway: no credentials, no data.
        refused = s.get(f"{base}/api/2.0/mlflow/experiments/search", auth=("admin", "wrong"),
                        timeout=30)
        assert refused.status_code == 401


@pytest.mark.parametrize("via", ["direct", "outer"])
def test_the_mlflow_client_logs_and_reads_back_under_the_prefix(
    prefixed: Prefixed, via: str, tmp_path: Path,
) -> None:
    client = {**prefixed.stack.client_env(), "MLFLOW_TRACKING_URI": getattr(prefixed, via)}
    env = clean_env(**client, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    result = subprocess.run(
        [sys.executable, "-c", CLIENT, f"prefixed-{via}", str(tmp_path / "note.txt"),
         str(tmp_path)], env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-2:] == ["kept", "0.5"]


def test_the_outer_proxy_names_the_real_client_to_the_throttle(prefixed: Prefixed) -> None:
    # The outer nginx connects from 127.0.0.1; with TRUSTED_PROXIES the gateway (throttles, audit
    # log, metrics) sees the address the client reached the outer site from.
    name, _ = prefixed.stack.new_user("behind")
    source = fresh_source_ip()
    with session_from(source) as s:
        s.trust_env = False
        s.verify = str(prefixed.stack.ca)
        s.get(f"{prefixed.outer}/api/2.0/mlflow/experiments/search", auth=(name, "x"),
              timeout=30)
    audit = (prefixed.stack.settings.logs / "audit.log").read_text()  # type: ignore[operator]
    line = next(x for x in reversed(audit.splitlines()) if f'"user": "{name}"' in x)
    assert f'"client_ip": "{source}"' in line and '"status": 401' in line, line
    assert f'"path": "{PREFIX}/api/2.0/mlflow/experiments/search"' in line


def test_a_browser_signs_in_uses_the_ui_and_writes_through_the_outer_site(
        prefixed: Prefixed) -> None:
    with chromium() as browser:
        context: Any = browser.new_context(ignore_https_errors=True)  # type: ignore[attr-defined]
        failed: list[str] = []
        context.on("response", lambda r: failed.append(f"{r.status} {r.url}")
                   if r.status in (401, 403, 404, 429) or r.status >= 500 else None)
        # The login page, its form, its script and the way back all live under the prefix.
        page = log_in(context, prefixed.outer, "admin", prefixed.stack.admin_password,
                      path="/#/experiments")
        assert page.url == f"{prefixed.outer}/#/experiments", page.url
        page.get_by_text("Default").first.wait_for(timeout=120_000)
        # A write from the UI's own page, as the UI sends it (relative URL, Origin header).
        status = page.evaluate(
            "fetch('ajax-api/2.0/mlflow/experiments/create', {method: 'POST', "
            "headers: {'Content-Type': 'application/json'}, "
            "body: JSON.stringify({name: 'made-in-the-browser'})}).then(r => r.status)")
        assert status == 200
        page.reload(timeout=120_000)
        page.get_by_text("made-in-the-browser").first.wait_for(timeout=120_000)
        assert not [f for f in failed if PREFIX in f and "/ajax-api/" not in f
                    or f.startswith(("401", "403", "429", "5"))], failed
        # Logout lands on the login page under the prefix too.
        status = page.evaluate(
            "fetch('logout', {method: 'POST'}).then(r => r.url)")
        assert status.startswith(f"{prefixed.outer}/login"), status
