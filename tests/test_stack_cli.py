"""`trackgate up|status|down` as a user runs them: output, idempotence, clean stop, clear errors."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from .support import clean_env, free_port, trackgate

PASSWORD_LINE = re.compile(r"Created user 'admin' with password: (\S+)")


def ports() -> list[str]:
    return ["--http-port", str(free_port()), "--https-port", str(free_port())]


def internal_ports() -> dict[str, str]:
    return {"TRACKGATE_TRACKING_PORT": str(free_port()), "TRACKGATE_GATEWAY_PORT": str(free_port())}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return (
        Path(f"/proc/{pid}").exists()
        and "Z" not in Path(f"/proc/{pid}/stat").read_text().split()[2]
    )


def test_up_prints_the_url_a_one_time_password_and_exports_then_down_stops_everything(
    tmp_path: Path,
) -> None:
    env = {"TRACKGATE_DATA_DIR": str(tmp_path), **internal_ports()}
    flags = ports()
    https_port = flags[3]
    first = trackgate("up", *flags, env=env)
    try:
        assert first.returncode == 0, first.stderr + first.stdout
        out = first.stdout
        assert f"running at https://localhost:{https_port}" in out
        password = PASSWORD_LINE.search(out).group(1)  # type: ignore[union-attr]
        assert f"export MLFLOW_TRACKING_URI=https://localhost:{https_port}" in out
        assert f"export MLFLOW_TRACKING_PASSWORD={password}" in out
        assert f"export MLFLOW_TRACKING_SERVER_CERT_PATH={tmp_path}/tls/ca.pem" in out
        assert password not in (tmp_path / "htpasswd").read_text()  # only its hash is stored

        ca = str(tmp_path / "tls" / "ca.pem")
        url = f"https://localhost:{https_port}/version"
        assert requests.get(url, auth=("admin", password), verify=ca, timeout=30).status_code == 200

        again = trackgate("up", *flags, env=env)
        assert again.returncode == 0
        assert "already running" in again.stdout
        assert "password" not in again.stdout

        status = trackgate("status", env=env)  # no flags: it reads what `up` was started with
        assert status.returncode == 0, status.stdout + status.stderr
        assert "health    healthy" in status.stdout
        children = json.loads((tmp_path / "run" / "supervisor.json").read_text())
        pids = [info["pid"] for info in children.values()]
        supervisor = int((tmp_path / "run" / "supervisor.pid").read_text())
    finally:
        stopped = trackgate("down", env=env)
    assert stopped.returncode == 0 and "stopped" in stopped.stdout
    assert not any(_alive(pid) for pid in [supervisor, *pids])
    with socket.socket() as sock:  # the port is free again
        sock.bind(("0.0.0.0", int(https_port)))
    after = trackgate("status", env=env)
    assert after.returncode == 3 and "not running" in after.stdout
    assert trackgate("down", env=env).stdout.strip() == "trackgate was not running"


def test_runs_and_artifacts_survive_down_and_up(tmp_path: Path) -> None:
    env = {"TRACKGATE_DATA_DIR": str(tmp_path), **internal_ports()}
    flags = ports()
    first = trackgate("up", *flags, env=env)
    assert first.returncode == 0, first.stderr
    password = PASSWORD_LINE.search(first.stdout).group(1)  # type: ignore[union-attr]
    client = {
        "MLFLOW_TRACKING_URI": f"https://localhost:{flags[3]}",
        "MLFLOW_TRACKING_USERNAME": "admin",
        "MLFLOW_TRACKING_PASSWORD": password,
        "MLFLOW_TRACKING_SERVER_CERT_PATH": str(tmp_path / "tls" / "ca.pem"),
    }
    log = (
        "import mlflow, pathlib\np = pathlib.Path('note.txt'); p.write_text('kept')\n"
        "with mlflow.start_run() as r:\n"
        "    mlflow.log_param('k', 'v'); mlflow.log_artifact(str(p))\n"
        "print(r.info.run_id)\n"
    )
    try:
        logged = subprocess.run(
            [sys.executable, "-c", log],
            env=clean_env(**client),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert logged.returncode == 0, logged.stderr[-2000:]
        run_id = logged.stdout.split()[-1]
    finally:
        assert trackgate("down", env=env).returncode == 0
    second = trackgate("up", *flags, env=env)
    try:
        assert second.returncode == 0, second.stderr
        assert "Created user" not in second.stdout
        read = (
            "import mlflow, sys\nr = mlflow.get_run(sys.argv[1])\n"
            "p = mlflow.artifacts.download_artifacts(\n"
            "    run_id=sys.argv[1], artifact_path='note.txt')\n"
            "print(r.data.params['k'], open(p).read())\n"
        )
        back = subprocess.run(
            [sys.executable, "-c", read, run_id],
            env=clean_env(**client),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert back.returncode == 0, back.stderr[-2000:]
        assert back.stdout.split()[-2:] == ["v", "kept"]
    finally:
        trackgate("down", env=env)


def test_a_taken_port_is_a_clear_error_and_nothing_is_left_running(tmp_path: Path) -> None:
    with socket.socket() as blocker:
        blocker.bind(("0.0.0.0", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        result = trackgate(
            "up",
            "--https-port",
            str(taken),
            "--http-port",
            str(free_port()),
            env={"TRACKGATE_DATA_DIR": str(tmp_path), **internal_ports()},
        )
    assert result.returncode == 1
    assert (
        f"port {taken}" in result.stderr and "--https-port or TRACKGATE_HTTPS_PORT" in result.stderr
    )
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "run" / "supervisor.pid").exists()


def test_missing_nginx_is_a_clear_error(tmp_path: Path) -> None:
    result = trackgate(
        "up",
        *ports(),
        env={"TRACKGATE_DATA_DIR": str(tmp_path), "TRACKGATE_NGINX_BINARY": "nginx-not-installed"},
    )
    assert result.returncode == 1
    assert "nginx not found" in result.stderr and "apt-get install nginx-light" in result.stderr


@pytest.mark.parametrize(
    "variable, value, message",
    [
        ("TRACKGATE_HTTPS_PORT", "abc", "TRACKGATE_HTTPS_PORT"),
        ("TRACKGATE_HTTPS_PORT", "70000", "not a TCP port"),
        ("TRACKGATE_HOSTNAME", "https://x.example/", "not a host name"),
        ("TRACKGATE_BCRYPT_ROUNDS", "3", "TRACKGATE_BCRYPT_ROUNDS"),
    ],
)
def test_invalid_settings_are_named_without_a_traceback(
    tmp_path: Path, variable: str, value: str, message: str
) -> None:
    result = trackgate("up", env={"TRACKGATE_DATA_DIR": str(tmp_path), variable: value})
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_a_flag_beats_the_environment_which_beats_the_default(tmp_path: Path) -> None:
    from trackgate.settings import load_settings

    os.environ["TRACKGATE_HTTPS_PORT"] = "9443"
    try:
        assert load_settings().https_port == 9443
        assert load_settings(https_port=10443).https_port == 10443
    finally:
        del os.environ["TRACKGATE_HTTPS_PORT"]
    assert load_settings().https_port == 8443


NOBODY = 65534


@pytest.fixture
def nobodys_dir() -> Iterator[Path]:
    """A data dir owned by `nobody` (pytest's own temp root is private to root)."""
    base = Path(tempfile.mkdtemp(prefix="trackgate-nobody-"))
    os.chmod(base, 0o755)
    data = base / "data"
    data.mkdir()
    os.chown(data, NOBODY, NOBODY)
    yield data
    shutil.rmtree(base, ignore_errors=True)


def test_a_normal_user_runs_the_stack_on_high_ports(nobodys_dir: Path) -> None:
    nobody, data = NOBODY, nobodys_dir
    env = {"TRACKGATE_DATA_DIR": str(data), "HOME": str(data), **internal_ports()}
    flags = ports()
    result = trackgate("up", *flags, env=env, user=nobody)
    try:
        assert result.returncode == 0, result.stderr + result.stdout
        assert "Created user 'admin'" in result.stdout
        supervisor = int((data / "run" / "supervisor.pid").read_text())
        assert Path(f"/proc/{supervisor}").stat().st_uid == nobody
    finally:
        down = trackgate("down", env=env, user=nobody)
    assert down.returncode == 0, down.stderr


def test_a_normal_user_cannot_take_privileged_ports(nobodys_dir: Path) -> None:
    data = nobodys_dir
    result = trackgate(
        "up",
        "--https-port",
        "443",
        "--http-port",
        "80",
        env={"TRACKGATE_DATA_DIR": str(data), "HOME": str(data)},
        user=65534,
    )
    assert result.returncode == 1
    assert "needs root" in result.stderr


def test_nginx_site_with_the_proxy_secret_is_readable_by_its_owner_only(tmp_path: Path) -> None:
    """The site carries the secret nginx adds to every request to the tracking servers: another
    local account must not read it, also when an older trackgate left it world-readable."""
    secret = tmp_path / "proxy-secret"
    secret.write_text("s3cr3t-for-the-test-only-0123456789abcdef\n")
    secret.chmod(0o600)
    site = tmp_path / "site" / "trackgate.conf"
    env = {"TRACKGATE_DATA_DIR": str(tmp_path / "data"), "TRACKGATE_INTERNAL_TRANSPORT": "tcp",
           "TRACKGATE_PROXY_SECRET_FILE": str(secret)}
    first = trackgate("nginx-site", str(site), env=env)
    assert first.returncode == 0, first.stderr
    assert "s3cr3t-for-the-test-only-0123456789abcdef" in site.read_text()
    assert site.stat().st_mode & 0o777 == 0o600
    site.chmod(0o644)
    again = trackgate("nginx-site", str(site), env=env)
    assert again.returncode == 0 and again.stdout.startswith("changed"), again.stdout
    assert site.stat().st_mode & 0o777 == 0o600
