"""Attack 2: a model is code from whoever registered it. An ordinary user registers a pyfunc that
looks around when it runs; the admin serves it with `trackgate serve-model` (as root, with the
admin's credentials exported). It must run unprivileged, see none of the admin's secrets, and
reach neither the data dir nor any port: nginx alone reaches it, over a Unix socket.
"""

from __future__ import annotations

import json
import os
import pwd
import re
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from trackgate.local.probe import internal_connection

from ..support import RunningStack, clean_env

pytestmark = pytest.mark.security

SPY = '''
import json, os, socket
import mlflow
from mlflow.pyfunc import PythonModel


def _opens(path):
    try:
        with open(path, "rb"):
            return True
    except OSError:
        return False


class Spy(PythonModel):
    def predict(self, context, model_input, params=None):
        return [json.dumps({
            "uid": os.getuid(),
            "env": sorted(os.environ),
            "secrets": [v for k, v in os.environ.items() if "PASSWORD" in k or "TOKEN" in k],
            "reads_htpasswd": _opens(HTPASSWD),
            "enters_data_dir": os.access(DATA_DIR, os.X_OK),
        })]


mlflow.models.set_model(Spy())
'''

REGISTER = """
import sys, mlflow
from mlflow import MlflowClient
code, name = sys.argv[1], sys.argv[2]
with mlflow.start_run():
    info = mlflow.pyfunc.log_model(name="spy", python_model=code, registered_model_name=name,
                                   input_example=["x"])
version = MlflowClient().get_latest_versions(name)[0].version
MlflowClient().set_registered_model_alias(name, "champion", version)
print("registered", version)
"""


def _env(stack: RunningStack, username: str, password: str) -> dict[str, str]:
    env = clean_env(**stack.client_env(username, password))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@pytest.fixture(scope="module")
def spy_model(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Registered by an ordinary user, not the admin."""
    user, password = stack.new_user("mallory")
    work = tmp_path_factory.mktemp("spy")
    code = work / "spy_model.py"
    code.write_text(SPY.replace("HTPASSWD", repr(str(stack.settings.htpasswd)))
                    .replace("DATA_DIR", repr(str(stack.settings.data_dir))))
    name = f"spy-{os.getpid()}"
    result = subprocess.run([sys.executable, "-c", REGISTER, str(code), name], cwd=work,
                            env=_env(stack, user, password), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr
    return name


@pytest.fixture(scope="module")
def served_spy(stack: RunningStack, spy_model: str,
               tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, object]]:
    """`trackgate serve-model` run by the admin, the admin's password in its environment."""
    work = tmp_path_factory.mktemp("serve-spy")
    log = work / "serve.log"
    env = _env(stack, "admin", stack.admin_password)
    env["TRACKGATE_DATA_DIR"] = str(stack.settings.data_dir)
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trackgate", "serve-model", f"models:/{spy_model}@champion",
             "--name", spy_model], cwd=work, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 180
        while "serving models:/" not in log.read_text():
            assert proc.poll() is None, log.read_text()
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.5)
        answer = stack.request("POST", f"/serving/{spy_model}/invocations",
                               json={"inputs": ["x"]}, auth=("admin", stack.admin_password))
        assert answer.status_code == 200, answer.text
        seen = json.loads(answer.json()["predictions"][0])
        location = (stack.settings.serving_dir / f"{spy_model}.conf").read_text()
        upstream = re.search(r"proxy_pass http://(\S+)/;", location)
        assert upstream, location
        seen["upstream"] = upstream.group(1)
        yield seen
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def test_the_model_sees_none_of_the_callers_secrets(served_spy: dict[str, object]) -> None:
    assert served_spy["secrets"] == []
    names: list[str] = served_spy["env"]  # type: ignore[assignment]
    assert not [k for k in names if k.startswith(("MLFLOW_TRACKING", "TRACKGATE_", "AWS_"))]


@pytest.mark.skipif(os.geteuid() != 0, reason="the model account is used when started by root")
def test_the_model_runs_unprivileged_and_cannot_touch_the_data_dir(
        stack: RunningStack, served_spy: dict[str, object]) -> None:
    assert served_spy["uid"] == pwd.getpwnam(stack.settings.model_user).pw_uid != 0
    assert served_spy["reads_htpasswd"] is False
    assert served_spy["enters_data_dir"] is False


def test_the_model_listens_on_a_socket_only_nginx_can_reach(
        stack: RunningStack, served_spy: dict[str, object]) -> None:
    upstream = str(served_spy["upstream"])
    assert upstream.startswith("unix:"), upstream  # no TCP port for any local account to call
    socket = upstream.removeprefix("unix:").removesuffix(":")
    if os.geteuid() == 0:
        other = subprocess.run(
            ["su", "-s", "/bin/sh", "daemon", "-c",  # any other local account
             f"{sys.executable} -c \"import socket; s = socket.socket(socket.AF_UNIX); "
             f"s.connect('{socket}')\""], capture_output=True, text=True, timeout=60)
        assert other.returncode != 0 and "PermissionError" in other.stderr, other.stderr
    conn = internal_connection(upstream.removesuffix(":"), timeout=5)
    try:  # the proxy's own account (here: root, for the test) does reach it
        conn.request("GET", "/ping")
        assert conn.getresponse().status == 200
    finally:
        conn.close()
