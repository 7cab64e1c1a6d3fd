"""Workflow 3: a registered model served behind the same login, and served on a client."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from trackgate.local.probe import internal_connection

from ..support import RunningStack, free_port, fresh_source_ip
from .conftest import user_env


def _payload() -> dict[str, object]:
    from sklearn.datasets import load_diabetes

    X, _ = load_diabetes(return_X_y=True, as_frame=True)
    head = X.head(3)
    return {"dataframe_split": {"columns": list(head.columns), "data": head.values.tolist()}}


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 120,
              proc: subprocess.Popen[str] | None = None, log: Path | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if proc is not None and proc.poll() is not None:
            break
        time.sleep(0.3)
    output = log.read_text() if log and log.exists() else ""
    pytest.fail(f"timed out or exited waiting for {what}\n{output}")


@dataclass
class Served:
    proc: subprocess.Popen[str]
    log: Path
    name: str
    url: str


def _stop(proc: subprocess.Popen[str]) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def internal_connection_refused(socket: str) -> bool:
    conn = internal_connection(f"unix:{socket}", timeout=2)
    try:
        conn.request("GET", "/ping")
        conn.getresponse()
    except OSError:
        return True
    finally:
        conn.close()
    return False


@contextmanager
def _serve_model(stack: RunningStack, model: str, name: str, workdir: Path) -> Iterator[Served]:
    """`trackgate serve-model models:/MODEL@champion --name NAME` in a user's shell."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "serve-model.log"
    env = user_env(stack, TRACKGATE_DATA_DIR=str(stack.settings.data_dir))
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trackgate", "serve-model", f"models:/{model}@champion",
             "--name", name], cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT,
            text=True)
    try:
        _wait_for(lambda: "serving models:/" in log.read_text(), "serve-model to publish",
                  proc=proc, log=log)
        yield Served(proc, log, name, f"{stack.url}/serving/{name}/invocations")
    finally:
        _stop(proc)


@pytest.fixture(scope="module")
def served(stack: RunningStack, registered_model: dict[str, str],
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    name = registered_model["name"]
    with _serve_model(stack, name, name, tmp_path_factory.mktemp("serve")) as s:
        yield s


def test_served_model_predicts_through_nginx_with_credentials(
        stack: RunningStack, served: Served, registered_model: dict[str, str]) -> None:
    assert served.url in served.log.read_text()  # it prints the public URL users call
    answer = stack.request("POST", f"/serving/{served.name}/invocations", json=_payload(),
                           auth=("admin", stack.admin_password))
    assert answer.status_code == 200, answer.text
    predictions = [round(v, 3) for v in answer.json()["predictions"]]
    assert predictions == json.loads(registered_model["by_alias"])


def test_curl_with_user_password_gets_predictions(stack: RunningStack, served: Served) -> None:
    user, password = stack.new_user("scorer")  # any user of the server, not only admin
    result = subprocess.run(
        ["curl", "-sS", "--fail-with-body", "--cacert", str(stack.ca), "-u", f"{user}:{password}",
         "-H", "Content-Type: application/json", "-d", json.dumps(_payload()), served.url],
        capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(json.loads(result.stdout)["predictions"]) == 3


@pytest.mark.parametrize("wrong_password", [False, True], ids=["no-credentials", "wrong-password"])
def test_served_model_refuses_without_valid_login(
        stack: RunningStack, served: Served, wrong_password: bool) -> None:
    # A throwaway user and source address: failures are throttled per user and per IP.
    auth = (stack.new_user("victim")[0], "not-the-password") if wrong_password else None
    answer = stack.request("POST", f"/serving/{served.name}/invocations", json=_payload(),
                           auth=auth, source_ip=fresh_source_ip())
    assert answer.status_code == 401
    assert "predictions" not in answer.text


def test_stopping_serve_model_unpublishes_the_location(
        stack: RunningStack, registered_model: dict[str, str], tmp_path: Path) -> None:
    name = registered_model["name"]
    with _serve_model(stack, name, f"{name}.stopping", tmp_path) as served:
        _assert_unpublished_on_stop(stack, served)


def _assert_unpublished_on_stop(stack: RunningStack, served: Served) -> None:
    location = stack.settings.serving_dir / f"{served.name}.conf"
    assert location.is_file()
    assert _stop(served.proc) == 0
    assert not location.exists()
    assert not location.with_suffix(".pid").exists()
    assert "unpublished" in served.log.read_text()

    def gone() -> bool:  # nginx reloads asynchronously: the old workers drain first
        answer = stack.request("POST", f"/serving/{served.name}/invocations", json=_payload(),
                               auth=("admin", stack.admin_password))
        return answer.status_code == 404
    _wait_for(gone, "the location to disappear", timeout=30)


def test_serve_model_rejects_names_that_are_not_url_safe(stack: RunningStack,
                                                          tmp_path: Path) -> None:
    env = user_env(stack, TRACKGATE_DATA_DIR=str(stack.settings.data_dir))
    before = set(stack.settings.serving_dir.iterdir())
    result = subprocess.run(
        [sys.executable, "-m", "trackgate", "serve-model", "models:/x@champion",
         "--name", "a/../b;"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=60)
    assert result.returncode == 1
    assert "is not a serving name" in result.stderr
    assert set(stack.settings.serving_dir.iterdir()) == before


def test_mlflow_models_serve_on_a_client_downloads_through_the_proxy(
        stack: RunningStack, registered_model: dict[str, str], tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "models-serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(
            ["mlflow", "models", "serve", "-m", f"models:/{registered_model['name']}/Production",
             "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port)],
            cwd=tmp_path, env=user_env(stack), stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"

        def pings() -> bool:
            try:
                return requests.get(f"{base}/ping", timeout=2).status_code == 200
            except requests.RequestException:
                return False
        _wait_for(pings, "mlflow models serve to answer /ping", proc=proc, log=log)
        answer = requests.post(f"{base}/invocations", json=_payload(), timeout=30)
        assert answer.status_code == 200, answer.text
        predictions = [round(v, 3) for v in answer.json()["predictions"]]
        assert predictions == json.loads(registered_model["by_stage"])
    finally:
        _stop(proc)


def test_second_serve_model_for_the_same_name_is_refused_and_changes_nothing(
        stack: RunningStack, served: Served, tmp_path: Path) -> None:
    location = stack.settings.serving_dir / f"{served.name}.conf"
    published = location.read_text()
    env = user_env(stack, TRACKGATE_DATA_DIR=str(stack.settings.data_dir))
    result = subprocess.run(
        [sys.executable, "-m", "trackgate", "serve-model", f"models:/{served.name}@champion",
         "--name", served.name], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 1
    assert f"already served by `trackgate serve-model` (pid {served.proc.pid})" in result.stderr
    assert location.read_text() == published  # the running one keeps its location
    answer = stack.request("POST", f"/serving/{served.name}/invocations", json=_payload(),
                           auth=("admin", stack.admin_password))
    assert answer.status_code == 200


def test_killed_serve_model_takes_its_server_along_and_can_be_restarted(
        stack: RunningStack, registered_model: dict[str, str], tmp_path: Path) -> None:
    name = f"{registered_model['name']}.killed"
    with _serve_model(stack, registered_model["name"], name, tmp_path / "first") as first:
        location = (stack.settings.serving_dir / f"{name}.conf").read_text()
        found = re.search(r"proxy_pass http://unix:(\S+):/;", location)
        assert found, location
        socket = found.group(1)
        first.proc.kill()  # no cleanup runs: the location and pid file stay behind
        first.proc.wait()

        def scoring_server_gone() -> bool:
            return internal_connection_refused(socket)
        _wait_for(scoring_server_gone, "the orphaned scoring server to exit", timeout=30)
    # A new serve-model under the same name takes the stale location over.
    with _serve_model(stack, registered_model["name"], name, tmp_path / "second") as second:
        answer = stack.request("POST", f"/serving/{second.name}/invocations", json=_payload(),
                               auth=("admin", stack.admin_password))
        assert answer.status_code == 200


def test_serve_model_of_an_unknown_model_fails_clearly_and_publishes_nothing(
        stack: RunningStack, tmp_path: Path) -> None:
    env = user_env(stack, TRACKGATE_DATA_DIR=str(stack.settings.data_dir))
    result = subprocess.run(
        [sys.executable, "-m", "trackgate", "serve-model", "models:/no-such-model@champion",
         "--name", "no-such-model"], cwd=tmp_path, env=env, capture_output=True, text=True,
        timeout=120)
    assert result.returncode == 1
    assert "trackgate: error: cannot download models:/no-such-model@champion" in result.stderr
    serving = stack.settings.serving_dir
    assert not list(serving.glob("no-such-model.*"))


def test_serve_model_with_a_wrong_password_says_so_before_downloading(
        strict_stack: RunningStack, tmp_path: Path) -> None:
    user, _ = strict_stack.new_user("server-typo")
    env = user_env(strict_stack, TRACKGATE_DATA_DIR=str(strict_stack.settings.data_dir),
                   MLFLOW_TRACKING_USERNAME=user, MLFLOW_TRACKING_PASSWORD="not-the-password")
    result = subprocess.run(
        [sys.executable, "-m", "trackgate", "serve-model", "models:/any@champion", "--name", "any"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert f"401: wrong username or password for '{user}'" in result.stderr
