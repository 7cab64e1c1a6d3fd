"""`docker compose up` of compose/: the same checks as the one-machine stack, through nginx's
published loopback port, for sqlite and PostgreSQL; then what containers add: users managed
with `docker compose exec`, persistence across `down`/`up`, a crashed container coming back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import textwrap
from pathlib import Path
from typing import Any

import pytest

from ..support import clean_env

# The one-machine stack's checks, run here against the containers (`stack` is the compose one).
from ..test_auth_matrix import (  # noqa: F401
    member,
    test_every_path_family_passes_the_right_credentials_to_mlflow,
    test_every_path_family_refuses_bad_credentials_with_a_basic_challenge,
)
from ..test_browser_login import (  # noqa: F401
    browser,
    experiment,
    test_a_wrong_password_shows_the_error_on_the_login_page,
    test_logged_in_the_mlflow_ui_renders_and_shows_the_clients_experiment,
    test_login_lands_on_the_page_asked_for_and_the_account_menu_shows_the_user,
    test_the_login_page_appears_instead_of_the_native_prompt,
    test_the_mlflow_menus_logout_ends_the_session_and_a_replayed_cookie_gets_401,
)
from ..test_host_guard import (  # noqa: F401
    test_configured_host_is_served_with_and_without_port,
    test_spoofed_host_gets_no_answer_over_http,
    test_spoofed_host_gets_no_answer_over_https,
)
from .harness import (
    ADMIN_LINE,
    COMPOSE_DIR,
    VARIANT_FILES,
    ComposeProject,
    ComposeStack,
    docker_env,
    write_env_file,
)

pytestmark = pytest.mark.compose

LOG_SCRIPT = textwrap.dedent('''
    import json, os, sys
    import mlflow

    class Doubler(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input * 2

    notes = os.path.join(sys.argv[1], "notes.txt")
    with open(notes, "w") as f:
        f.write("kept across restarts")
    mlflow.set_experiment("compose-persistence")
    with mlflow.start_run(run_name="kept") as run:
        mlflow.log_param("lr", "0.1")
        mlflow.log_metric("loss", 0.25, step=3)
        mlflow.log_artifact(notes, artifact_path="notes")
        mlflow.pyfunc.log_model(name="model", python_model=Doubler(),
                                registered_model_name="compose-doubler")
    print(json.dumps({"run_id": run.info.run_id}))
''')

READ_SCRIPT = textwrap.dedent('''
    import json, sys
    import mlflow, pandas as pd
    from mlflow import MlflowClient

    run_id, work = sys.argv[1], sys.argv[2]
    run = MlflowClient().get_run(run_id)
    notes = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path="notes/notes.txt",
                                                dst_path=work)
    model = mlflow.pyfunc.load_model("models:/compose-doubler/1")
    print(json.dumps({
        "params": run.data.params,
        "loss": run.data.metrics.get("loss"),
        "notes": open(notes).read(),
        "prediction": model.predict(pd.DataFrame({"x": [1, 2]}))["x"].tolist(),
    }))
''')


def _client(stack: ComposeStack, script: str, *args: str, cwd: Path) -> dict[str, Any]:
    """Run a script with only what a user exports (URI, user, password, CA) configuring MLflow."""
    path = cwd / "script.py"
    path.write_text(script, encoding="utf-8")
    env = clean_env(**stack.client_env(), MLFLOW_HTTP_REQUEST_MAX_RETRIES="2")
    result = subprocess.run([sys.executable, str(path), *args], cwd=cwd, capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _read_back(stack: ComposeStack, run_id: str, tmp_path: Path) -> None:
    work = tmp_path / f"read-{len(list(tmp_path.iterdir()))}"
    work.mkdir()
    out = _client(stack, READ_SCRIPT, run_id, str(work), cwd=work)
    assert out == {"params": {"lr": "0.1"}, "loss": 0.25, "notes": "kept across restarts",
                   "prediction": [2, 4]}


@pytest.fixture(scope="module")
def logged_run(stack: ComposeStack, tmp_path_factory: pytest.TempPathFactory) -> str:
    """A run with a param, a metric, an artifact and a registered model; its id."""
    work = tmp_path_factory.mktemp("log")
    return str(_client(stack, LOG_SCRIPT, str(work), cwd=work)["run_id"])


@pytest.mark.parametrize("variant", sorted(VARIANT_FILES))
def test_compose_files_are_valid_and_only_nginx_publishes_ports_on_loopback(
    variant: str, tmp_path: Path
) -> None:
    env_file = tmp_path / "empty.env"
    write_env_file(env_file)
    project = ComposeProject("tgtest-config", VARIANT_FILES[variant], env_file)
    project.run("config", "--quiet")
    config = json.loads(project.run("config", "--format", "json").stdout)["services"]
    published = {name: svc["ports"] for name, svc in config.items() if svc.get("ports")}
    assert list(published) == ["nginx"]
    assert {p["host_ip"] for p in published["nginx"]} == {"127.0.0.1"}
    for name, svc in config.items():
        if name == "init":  # one-shot: the others wait for it to complete successfully
            assert svc["restart"] == "no"
            continue
        assert svc.get("healthcheck", {}).get("test"), f"{name} has no healthcheck"
        assert svc["restart"] == "unless-stopped", name
    for name in ("tracking", "gateway"):
        assert config[name]["depends_on"]["init"]["condition"] == "service_completed_successfully"
    read_only = {v["target"] for v in config["nginx"]["volumes"] if v.get("read_only")}
    # artifacts: nginx sends downloads itself once the tracking server decided (issue 18)
    assert read_only == {"/var/lib/trackgate/run", "/var/lib/trackgate/tls",
                         "/var/lib/trackgate/artifacts"}
    # Every service, the backup one included, logs through the runtime with rotation.
    every = json.loads(project.run("--profile", "backup", "config", "--format", "json").stdout)
    assert "backup" in every["services"]
    for name, svc in every["services"].items():
        assert svc.get("logging") == {"driver": "json-file",
                                      "options": {"max-size": "10m", "max-file": "5"}}, name


def test_the_mlflow_client_logs_a_run_an_artifact_and_a_model_with_exported_credentials(
    stack: ComposeStack, logged_run: str, tmp_path: Path
) -> None:
    _read_back(stack, logged_run, tmp_path)
    # --serve-artifacts: the bytes are in the stack's artifacts volume, not on the client.
    stored = stack.project.exec("tracking", "find", "/var/lib/trackgate/artifacts",
                                "-name", "notes.txt").stdout
    assert logged_run in stored
    if stack.variant == "postgres":
        runs = stack.project.exec("postgres", "setpriv", "--reuid=postgres", "--regid=postgres",
                                  "--init-groups", "psql", "-d", "trackgate", "-tAc",
                                  f"select count(*) from runs where run_uuid = '{logged_run}'")
        assert runs.stdout.strip() == "1"


def test_the_settings_of_the_env_file_reach_every_trackgate_container(
    stack: ComposeStack,
) -> None:
    # Written to the env file by the harness; no line of compose.yaml names them.
    for service in ("tracking", "gateway"):
        layout = json.loads(stack.project.exec(service, "trackgate", "config", "--json").stdout)
        assert layout["settings"]["TRACKGATE_FAILURE_LIMIT"] == "100000", service
        assert layout["settings"]["TRACKGATE_BCRYPT_ROUNDS"] == "4", service
        assert layout["public_url"] == stack.url, service


def test_a_user_added_with_the_cli_logs_in_at_once_and_a_removed_one_cannot(
    stack: ComposeStack,
) -> None:
    path = "/api/2.0/mlflow/experiments/search?max_results=1"
    name, password = stack.new_user("cli")  # docker compose exec -T gateway trackgate users add
    assert stack.get(path, auth=(name, password)).status_code == 200
    stack.remove_user(name)
    assert stack.get(path, auth=(name, password)).status_code == 401


def test_an_api_token_made_with_the_cli_works_at_once_and_a_revoked_one_does_not(
    stack: ComposeStack,
) -> None:
    path = "/api/2.0/mlflow/experiments/search?max_results=1"
    name, _ = stack.new_user("token")
    token = stack.project.exec("gateway", "trackgate", "tokens", "create", "--user", name,
                               "--name", "ci").stdout.strip()
    assert stack.get(path, headers={"Authorization": f"Bearer {token}"}).status_code == 200
    stack.project.exec("gateway", "trackgate", "tokens", "revoke", "--user", name, "--name", "ci")
    assert stack.get(path, headers={"Authorization": f"Bearer {token}"}).status_code == 401


def test_a_crashed_tracking_container_comes_back_and_nothing_logged_is_lost(
    stack: ComposeStack, logged_run: str, tmp_path: Path
) -> None:
    stack.project.crash("tracking")
    assert stack.get("/health").status_code == 200
    _read_back(stack, logged_run, tmp_path)


def test_down_then_up_keeps_runs_artifacts_users_and_certificates(
    stack: ComposeStack, logged_run: str, tmp_path: Path
) -> None:
    stack.project.down()  # no --volumes: what an upgrade or a reboot does
    stack.project.up()
    # Same admin password, same CA (the client's copy still verifies), and no second password.
    assert not ADMIN_LINE.search(stack.project.logs("init"))
    auth = ("admin", stack.admin_password)
    assert stack.get("/api/2.0/mlflow/experiments/search?max_results=1", auth=auth).ok
    _read_back(stack, logged_run, tmp_path)


def test_no_container_runs_as_root_and_nginx_cannot_read_the_ca_key(stack: ComposeStack) -> None:
    """Issue 12 in compose: every long-running container is unprivileged, and the local CA's key
    lives in a volume only the one-shot init service mounts."""
    for service in ("tracking", "gateway", "nginx"):
        uid = stack.project.exec(service, "id", "-u").stdout.strip()
        assert uid not in ("", "0"), (service, uid)
    assert stack.project.exec("nginx", "test", "-r", "/var/lib/trackgate/tls/server.key",
                              check=False).returncode == 0  # nginx serves with the server key
    seen = stack.project.exec("nginx", "ls", "-A", "/var/lib/trackgate/tls/ca-key", check=False)
    assert "ca.key" not in seen.stdout
    assert stack.project.exec("nginx", "test", "-e", "/var/lib/trackgate/tls/ca-key/ca.key",
                              check=False).returncode != 0


# README's compose backup line, run as written (from a directory of its own, with the project's
# name, files and env file given by compose's environment variables).
BACKUP_LINE = (
    "(umask 077 && docker compose run --rm -T backup > trackgate-$(date -u +%Y%m%d-%H%M%S).tar)"
)


def test_the_documented_backup_line_archives_the_running_stack(
    stack: ComposeStack, logged_run: str, tmp_path: Path
) -> None:
    assert BACKUP_LINE in (COMPOSE_DIR.parent / "README.md").read_text()
    project = stack.project
    env = {
        **docker_env(),
        "COMPOSE_PROJECT_NAME": project.name,
        "COMPOSE_FILE": os.pathsep.join(str(COMPOSE_DIR / name) for name in project.files),
        "COMPOSE_ENV_FILES": str(project.env_file),
        "TRACKGATE_ENV_FILE": str(project.env_file),
    }
    proc = subprocess.run(["bash", "-c", BACKUP_LINE], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (archive,) = tmp_path.glob("trackgate-*.tar")
    assert archive.stat().st_mode & 0o777 == 0o600
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    database = "database/mlflow.pgdump" if stack.variant == "postgres" else "database/mlflow.db.gz"
    assert {"manifest.json", database} <= set(names), names
    roles = {entry["role"] for entry in manifest["members"].values()}
    assert {"db", "artifact", "settings"} <= roles, roles
    assert any(logged_run in name for name in names), "the logged run's artifacts are missing"
    assert any(name.endswith("htpasswd") for name in names), names
    # The stack kept serving: the backup container was a one-off, gone with --rm.
    assert stack.get("/health").status_code == 200


# Only the sqlite stack runs the profile (CI time): this test asks for that stack alone.
@pytest.mark.parametrize("stack", ["sqlite"], indirect=True)
def test_prometheus_of_the_monitoring_profile_sees_every_target_and_a_stopped_tracking_server(
    stack: ComposeStack,
) -> None:
    from ..prometheus_api import JOBS, over_http, wait_for_alert, wait_until_every_target_is_up

    env = dict(line.split("=", 1) for line in stack.project.env_file.read_text().splitlines())
    get = over_http(f"http://127.0.0.1:{env['TRACKGATE_PROMETHEUS_PORT']}")
    assert wait_until_every_target_is_up(get) == dict.fromkeys(JOBS, 1.0)
    assert not wait_for_alert(get, "TrackgateDown", "trackgate-tracking", timeout=0)
    stack.project.run("stop", "tracking")
    try:
        alerts = wait_for_alert(get, "TrackgateDown", "trackgate-tracking")
        assert alerts, "stopping the tracking server fired no TrackgateDown"
        assert alerts[0]["labels"]["trackgate_host"] == "localhost"
    finally:
        stack.project.run("start", "tracking")
        stack.project.run("up", "--detach", "--wait", "--wait-timeout", "180", "--no-build")
    assert wait_until_every_target_is_up(get) == dict.fromkeys(JOBS, 1.0)
