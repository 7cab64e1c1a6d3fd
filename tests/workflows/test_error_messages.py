"""The proxy's refusals each tell the user what to fix: 401, 403, 413 and 504, provoked for real
(wrong passwords, a Host MLflow refuses, an upload over the limit, a hung tracking server)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import requests
from trackgate import client
from trackgate.client import connection
from trackgate.local.probe import internal_connection

from ..support import RunningStack
from .conftest import user_env

_SEARCH = "import mlflow; mlflow.search_experiments(max_results=1)"


def _check(stack: RunningStack, **env: str) -> subprocess.CompletedProcess[str]:
    """`trackgate check` in a user's shell with the given exported variables."""
    full = user_env(stack, **env)
    for name, value in env.items():
        if value == "":
            del full[name]
    argv = [sys.executable, "-m", "trackgate", "check", "--env-file", "/nonexistent"]
    return subprocess.run(argv, env=full, capture_output=True, text=True, timeout=60)


def test_check_names_the_user_whose_password_is_wrong(strict_stack: RunningStack) -> None:
    user, _ = strict_stack.new_user("typo")
    result = _check(strict_stack, MLFLOW_TRACKING_USERNAME=user,
                    MLFLOW_TRACKING_PASSWORD="not-the-password")
    assert result.returncode == 1
    assert f"401: wrong username or password for '{user}'" in result.stdout


def test_check_asks_for_a_login_when_none_is_exported(strict_stack: RunningStack) -> None:
    result = _check(strict_stack, MLFLOW_TRACKING_USERNAME="", MLFLOW_TRACKING_PASSWORD="")
    assert result.returncode == 1
    assert "the server wants a login: export MLFLOW_TRACKING_USERNAME" in result.stdout


def test_mlflow_client_error_for_a_wrong_password_says_what_to_set(
        strict_stack: RunningStack, tmp_path: Path) -> None:
    user, _ = strict_stack.new_user("typo")
    env = user_env(strict_stack, MLFLOW_TRACKING_USERNAME=user,
                   MLFLOW_TRACKING_PASSWORD="not-the-password")
    result = subprocess.run([sys.executable, "-c", _SEARCH], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "401" in result.stderr and "MLFLOW_TRACKING_PASSWORD" in result.stderr


@pytest.mark.parametrize("host", ["LOCALHOST", "Localhost", "localhost."])
def test_host_spelled_differently_reaches_mlflow_not_its_403(stack: RunningStack,
                                                             host: str) -> None:
    # nginx matches names case-insensitively and ignores a trailing dot; MLflow's Host check
    # does not. Before nginx passed its normalised $host, these answered 403 from MLflow.
    result = subprocess.run(
        ["curl", "-sS", "-w", "\n%{http_code}", "--cacert", str(stack.ca),
         "-u", f"admin:{stack.admin_password}", "-H", f"Host: {host}:{stack.settings.https_port}",
         stack.url + "/api/2.0/mlflow/experiments/search?max_results=1"],
        capture_output=True, text=True, timeout=30)
    body, _, code = result.stdout.rpartition("\n")
    assert code == "200", body
    assert "experiments" in json.loads(body) or json.loads(body) == {}


def test_check_explains_mlflows_own_host_refusal(stack: RunningStack) -> None:
    # The one 403 MLflow itself gives: only reachable by skipping nginx (its Host guard answers
    # unknown names with 444 first), so ask the loopback tracking server directly.
    conn = internal_connection(stack.settings.tracking_address, timeout=30)
    try:
        conn.request("GET", "/api/2.0/mlflow/experiments/search",
                     headers={"Host": "evil.example"})
        raw = conn.getresponse()
        answer = requests.Response()
        answer.status_code, answer._content = raw.status, raw.read()
        answer.headers.update(raw.getheaders())
    finally:
        conn.close()
    assert answer.status_code == 403
    result = connection._explain(403, answer, client.TrackingConfig(stack.url, "admin"))
    assert not result.ok
    assert "Host name is not allowed" in result.message
    assert "TRACKGATE_EXTRA_HOSTNAMES" in result.message


def test_upload_over_the_limit_gets_a_413_that_names_the_setting(
        strict_stack: RunningStack, tmp_path: Path) -> None:
    small, large = tmp_path / "small.txt", tmp_path / "large.bin"
    small.write_bytes(b"x" * 200)
    large.write_bytes(os.urandom(8 * 1024))  # the strict stack allows 1k
    script = ("import mlflow, sys\n"
              "with mlflow.start_run():\n"
              "    mlflow.log_artifact(sys.argv[1])\n"
              "    print('uploaded')\n")
    env = user_env(strict_stack, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    ok = subprocess.run([sys.executable, "-c", script, str(small)], env=env, cwd=tmp_path,
                        capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0 and "uploaded" in ok.stdout, ok.stderr  # the limit, not the path
    refused = subprocess.run([sys.executable, "-c", script, str(large)], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode != 0
    assert "413" in refused.stderr
    assert "TRACKGATE_MAX_UPLOAD" in refused.stderr  # nginx's own page says nothing of the kind


def _tracking_pids(stack: RunningStack) -> list[int]:
    """The gunicorn master `trackgate up` started and its workers (tracked PIDs, no patterns)."""
    state = json.loads((stack.settings.run_dir / "supervisor.json").read_text())
    master = int(state["tracking"]["pid"])
    workers = [int(pid) for task in Path(f"/proc/{master}/task").iterdir()
               for pid in (task / "children").read_text().split()]
    assert workers, "gunicorn runs at least one worker"
    return [master, *workers]


@contextmanager
def _hung_tracking_server(stack: RunningStack) -> Iterator[None]:
    """SIGSTOP the tracking server: connections are accepted, nothing is answered."""
    pids = _tracking_pids(stack)
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


def test_hung_tracking_server_gives_a_504_that_says_what_to_do(
        strict_stack: RunningStack) -> None:
    with _hung_tracking_server(strict_stack):
        result = _check(strict_stack)
        raw = strict_stack.get("/api/2.0/mlflow/experiments/search?max_results=1",
                               auth=("admin", strict_stack.admin_password))
    assert result.returncode == 1
    assert "504: the proxy gave up waiting for the tracking server" in result.stdout
    assert "trackgate status" in result.stdout
    assert raw.status_code == 504
    assert "TRACKGATE_PROXY_TIMEOUT" in raw.text and "1 s" in raw.text
    assert _check(strict_stack).returncode == 0  # and it recovers once MLflow answers again
