"""Models served by another process than `trackgate serve-model`'s own (compose's profile
"serving", the Ansible role's units): the addresses nginx may publish, the location nginx
accepts, and what the role renders for trackgate_models (its deploy run is not in CI: this renders
the unit, the credentials file and the settings with the role's own templates and vars), and a
stack publishing a model served on a fixed socket by another process, as the role's units do."""

from __future__ import annotations

import json
import os
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydantic import ValidationError
from trackgate import nginx
from trackgate.cli import cli
from trackgate.served import AddressError, parse_address

from .support import RunningStack, clean_env, running_stack, trackgate

ROLE = Path(__file__).resolve().parents[1] / "ansible" / "roles" / "trackgate"

# Models-from-code: the model is this file, stored with the model (no pickled class, so the
# container's Python need not match the client's).
MODEL_CODE = textwrap.dedent('''
    import mlflow.pyfunc
    from mlflow.models import set_model

    class Doubler(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input * 2

    set_model(Doubler())
''')

REGISTER_SCRIPT = textwrap.dedent('''
    import json, sys
    import mlflow
    from mlflow import MlflowClient

    mlflow.set_experiment("compose-serving")
    with mlflow.start_run():
        info = mlflow.pyfunc.log_model(name="model", python_model=sys.argv[1],
                                       pip_requirements=["mlflow"],
                                       registered_model_name=sys.argv[2])
    MlflowClient().set_registered_model_alias(sys.argv[2], "champion",
                                              info.registered_model_version)
    print(json.dumps({"version": info.registered_model_version}))
''')

PAYLOAD = {"dataframe_split": {"columns": ["x"], "data": [[1], [2]]}}


@pytest.mark.parametrize("text", ["8.8.8.8:8080", "0.0.0.0:8080", "[::]:80", "[2001:4860::8]:80",
                                  "unix:relative.sock", "unix:/a/../b.sock", "host", "host:99999"])
def test_a_scoring_server_address_that_is_public_or_malformed_is_refused(text: str) -> None:
    with pytest.raises(AddressError):
        parse_address(text)


def test_private_names_loopback_and_sockets_are_scoring_server_addresses() -> None:
    assert parse_address("unix:/run/m/model.sock").upstream == "unix:/run/m/model.sock:"
    assert parse_address("serving:8080").is_name
    assert parse_address("10.0.0.7:8080").upstream == "10.0.0.7:8080"
    assert parse_address("[::1]:8080").upstream == "[::1]:8080"


def test_served_models_setting_refuses_a_public_address_or_a_bad_name() -> None:
    from trackgate.settings import Settings

    for value in ("m=1.1.1.1:80,x=unix:/s", "../x=unix:/s", "m=unix:/a,m=unix:/b"):
        with pytest.raises(ValidationError):
            Settings(served_models=value)


def test_serve_model_refuses_a_public_address_with_a_clear_message(tmp_path: Path) -> None:
    result = trackgate("serve-model", "models:/m@champion", "--name", "m", "--address",
                       "0.0.0.0:8080", "--no-publish", "--data-dir", str(tmp_path))
    assert result.returncode != 0
    assert "every interface" in result.stderr and "Traceback" not in result.stderr


def test_serve_model_refuses_a_socket_in_a_shared_directory(tmp_path: Path) -> None:
    # Its directory is handed to the model account: never /tmp, /run or a directory in use.
    (tmp_path / "shared").mkdir()
    (tmp_path / "shared" / "other-file").write_text("")
    result = trackgate("serve-model", "models:/m@champion", "--name", "m", "--address",
                       f"unix:{tmp_path}/shared/model.sock", "--no-publish",
                       "--data-dir", str(tmp_path / "data"))
    assert result.returncode != 0
    assert "holds other files" in result.stderr and "Traceback" not in result.stderr
    assert (tmp_path / "shared").stat().st_uid == os.getuid()


def test_nginx_accepts_the_site_with_models_on_a_socket_and_on_a_host_name(
    stack: RunningStack, tmp_path: Path
) -> None:
    settings = stack.settings.model_copy(update={
        "served_models": ["on-socket=unix:/run/trackgate-models/on-socket/model.sock",
                          "in.container=localhost:18080"],
        # nginx -t as root chowns every body directory it names to `nobody`: keep the live
        # stack's upload directory out of this copy of its site.
        "artifact_uploads": "tracking"})
    conf = tmp_path / "nginx.conf"
    conf.write_text(nginx.render(settings, standalone=True))
    site = conf.read_text()
    assert "proxy_pass http://unix:/run/trackgate-models/on-socket/model.sock:/;" in site
    # A name is resolved per request, so nginx starts while that container is down.
    assert 'set $trackgate_model "localhost:18080";' in site and "resolver " in site
    assert site.count("return 503") == 2  # a stopped model: 503, never 502
    binary = nginx.find_binary(settings)
    result = subprocess.run([binary, "-t", "-q", "-c", str(conf), "-p", str(tmp_path),
                             "-e", "stderr"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def _render_role(tmp_path: Path, models: list[dict[str, object]]) -> Path:
    """The role's templates rendered by ansible-playbook with its defaults and vars."""
    out = tmp_path / "out"
    out.mkdir()
    playbook = tmp_path / "render.yml"
    playbook.write_text(json.dumps([{
        "hosts": "localhost", "connection": "local", "gather_facts": False,
        "vars_files": [str(ROLE / "defaults" / "main.yml"), str(ROLE / "vars" / "main.yml")],
        "tasks": [
            {"ansible.builtin.template": {"src": str(ROLE / "templates" / src),
                                          "dest": str(out / dest)},
             "loop": loop, "vars": {}}
            for src, dest, loop in [
                ("trackgate-model.service.j2", "{{ item.name }}.service", "{{ trackgate_models }}"),
                ("trackgate.env.j2", "trackgate.env", [0]),
                ("trackgate-serving.env.j2", "serving.env", [0]),
            ]
        ],
    }]))
    # Extra vars: they beat the role's defaults, as an inventory's do.
    extra = tmp_path / "vars.json"
    extra.write_text(json.dumps({
        "trackgate_models": models, "trackgate_serving_username": "serving",
        "trackgate_serving_password": 'p"$w`d', "trackgate_hostname": "mlflow.test",
        "ansible_python_interpreter": sys.executable}))
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "ANSIBLE_NOCOLOR": "1", "ANSIBLE_LOCALHOST_WARNING": "0",
           "ANSIBLE_INVENTORY_UNPARSED_WARNING": "0"}
    result = subprocess.run([str(bindir / "ansible-playbook"), "-i", "localhost,",
                             "-e", f"@{extra}", str(playbook)],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return out


def _env_value(text: str, name: str) -> str:
    for line in text.splitlines():
        if line.startswith(f"{name}="):
            return shlex.split(line.split("=", 1)[1])[0]
    raise AssertionError(f"{name} not in {text}")


def test_the_ansible_role_renders_a_unit_and_the_same_serving_location_per_model(
    tmp_path: Path,
) -> None:
    from trackgate.settings import Settings

    out = _render_role(tmp_path, [{"name": "diabetes", "uri": "models:/diabetes@champion",
                                   "workers": 2},
                                  {"name": "iris.v2", "uri": "models:/iris/3"}])
    served = _env_value((out / "trackgate.env").read_text(), "TRACKGATE_SERVED_MODELS")
    settings = Settings(served_models=served, data_dir=tmp_path / "data")
    site = nginx.render(settings, standalone=False)
    for name in ("diabetes", "iris.v2"):
        unit = (out / f"{name}.service").read_text()
        exec_start = next(line for line in unit.splitlines() if line.startswith("ExecStart="))
        argv = shlex.split(exec_start.removeprefix("ExecStart="))
        # The unit's command is one trackgate accepts, listening where nginx's location points.
        assert argv[0].endswith("/bin/trackgate") and argv[1] == "serve-model"
        context = cli.commands["serve-model"].make_context("serve-model", argv[2:])
        assert context.params["name"] == name and context.params["publish"] is False
        socket = context.params["address"].removeprefix("unix:")
        assert f"location /serving/{name}/ {{" in site
        assert f"proxy_pass http://unix:{socket}:/;" in site
        assert f"RuntimeDirectory=trackgate-models/{name}\n" in unit
        assert socket == f"/run/trackgate-models/{name}/model.sock"
    assert "--workers 2" in (out / "diabetes.service").read_text()
    # Read as systemd and sh read it (both unescape \$ and \` inside double quotes).
    read = subprocess.run(["sh", "-c", '. "$0" && printf "%s %s" "$TRACKING_USERNAME" '
                           '"$TRACKING_PASSWORD"', str(out / "serving.env")],
                          capture_output=True, text=True, check=True)
    assert read.stdout == 'serving p"$w`d'
    assert (out / "serving.env").stat().st_size > 0


@pytest.fixture(scope="module")
def model_socket() -> Iterator[Path]:
    """Where the unit-style server listens: a directory serve-model creates and, as root,
    hands to the model account (under /tmp, which that account may pass)."""
    socket = Path(f"/tmp/trackgate-served-{secrets.token_hex(4)}") / "model.sock"
    yield socket
    shutil.rmtree(socket.parent, ignore_errors=True)


@pytest.fixture(scope="module")
def served_stack(tmp_path_factory: pytest.TempPathFactory,
                 model_socket: Path) -> Iterator[RunningStack]:
    """A stack whose nginx publishes a model served by another process (as an Ansible unit
    does): TRACKGATE_SERVED_MODELS=unit-model=unix:SOCKET."""
    with running_stack(tmp_path_factory.mktemp("served"),
                       served_models=[f"unit-model=unix:{model_socket}"]) as running:
        yield running


def test_a_model_served_on_a_fixed_socket_is_published_while_it_runs_and_503_otherwise(
    served_stack: RunningStack, model_socket: Path, tmp_path: Path,
) -> None:
    stack = served_stack
    (tmp_path / "model.py").write_text(MODEL_CODE, encoding="utf-8")
    (tmp_path / "register.py").write_text(REGISTER_SCRIPT, encoding="utf-8")
    env = clean_env(**stack.client_env())
    subprocess.run([sys.executable, "register.py", "model.py", "unit-doubler"], cwd=tmp_path,
                   env=env, check=True, capture_output=True, timeout=300)
    path = "/serving/unit-model/invocations"
    admin = ("admin", stack.admin_password)
    down = stack.request("POST", path, json=PAYLOAD, auth=admin)
    assert down.status_code == 503 and "unit-model is not running" in down.text
    log = tmp_path / "serve.log"
    # What trackgate-model-NAME.service runs.
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trackgate", "serve-model", "models:/unit-doubler@champion",
             "--name", "unit-model", "--address", f"unix:{model_socket}", "--no-publish",
             "--data-dir", str(stack.settings.data_dir)],
            cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 180
        while "serving models:/" not in log.read_text():
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()
            time.sleep(0.3)
        answer = stack.request("POST", path, json=PAYLOAD, auth=admin)
        assert answer.status_code == 200, answer.text
        assert answer.json()["predictions"] == [{"x": 2}, {"x": 4}]
        assert stack.request("POST", path, json=PAYLOAD).status_code == 401
        if os.geteuid() == 0:  # as root: only the model account and nginx's group may enter
            st = model_socket.parent.stat()
            assert (st.st_uid, st.st_mode & 0o777) == (65534, 0o710)
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=60)
    stopped = stack.request("POST", path, json=PAYLOAD, auth=admin)
    assert stopped.status_code == 503, stopped.text
