"""Client side: configure() maps the short names and .env; check and login explain failures."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from trackgate import client
from trackgate.client import ClientError, TrackingConfig, check, configure, resolve

from .support import RunningStack, clean_env, free_port


def test_short_names_map_onto_mlflows_variables(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRACKING_URI", "https://mlflow.example.com")
    monkeypatch.setenv("TRACKING_USERNAME", "alice")
    monkeypatch.setenv("TRACKING_PASSWORD", "s3cret")
    config = configure()
    assert os.environ["MLFLOW_TRACKING_URI"] == "https://mlflow.example.com"
    assert os.environ["MLFLOW_TRACKING_USERNAME"] == "alice"
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cret"
    assert "s3cret" not in repr(config)


def test_a_dotenv_file_is_honored_and_the_environment_wins(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text(
        "TRACKING_URI=https://from-file.example\nTRACKING_USERNAME=bob\n"
        "TRACKING_PASSWORD='pa ss#word'\n"
    )
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "carol")
    config = configure()
    assert config.uri == "https://from-file.example"
    assert config.username == "carol"
    assert config.password == "pa ss#word"


def test_a_missing_uri_is_a_clear_error_not_a_silent_local_mlruns(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(client, "USER_ENV_FILE", tmp_path / "none.env")
    with pytest.raises(ClientError, match="MLFLOW_TRACKING_URI"):
        configure()


def test_a_username_without_password_is_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("TRACKING_URI", "https://x.example")
    monkeypatch.setenv("TRACKING_USERNAME", "alice")
    monkeypatch.setattr(client, "USER_ENV_FILE", tmp_path / "none.env")
    with pytest.raises(ClientError, match="no password"):
        configure()


def _config(stack: RunningStack, **changes: object) -> TrackingConfig:
    env = stack.client_env()
    values = {
        "uri": env["MLFLOW_TRACKING_URI"],
        "username": "admin",
        "password": stack.admin_password,
        "cert_path": str(stack.ca),
    }
    values.update(changes)
    return TrackingConfig(**values)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "changes, ok, message",
    [
        ({}, True, "OK: https://localhost"),
        ({"password": "wrong"}, False, "wrong username or password for 'admin'"),
        ({"username": None, "password": None}, False, "wants a login"),
        ({"cert_path": None}, False, "MLFLOW_TRACKING_SERVER_CERT_PATH"),
        ({"uri": "https://127.0.0.1:{port}"}, False, "not for the host name"),
        (
            {"uri": "https://127.0.0.1:{port}", "insecure_tls": True},
            False,
            "does not serve the host name",
        ),
        ({"uri": "http://localhost:{http_port}"}, False, "redirects to https://localhost:"),
        ({"uri": "https://localhost:{free}"}, False, "cannot connect"),
        ({"uri": "ftp://x"}, False, "not an http(s) URL"),
    ],
)
def test_check_explains_each_failure_precisely(
    stack: RunningStack, changes: dict[str, object], ok: bool, message: str
) -> None:
    if isinstance(changes.get("uri"), str):
        changes["uri"] = str(changes["uri"]).format(
            port=stack.settings.https_port, http_port=stack.settings.http_port, free=free_port()
        )
    if changes.get("password") == "wrong":
        name, _ = stack.new_user("checker")  # failures must not throttle admin
        changes["username"] = name
        message = f"wrong username or password for '{name}'"
    result = check(_config(stack, **changes))
    assert result.ok is ok
    assert message in result.message


def _login(
    stack: RunningStack, user: str, password: str, env_file: Path
) -> subprocess.CompletedProcess[str]:
    argv = ["login", stack.url, "-u", user, "--password-stdin", "--ca-cert", str(stack.ca)]
    return subprocess.run(
        [sys.executable, "-m", "trackgate", *argv, "--env-file", str(env_file)],
        input=password + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        env=clean_env(),
    )


def test_login_checks_then_saves_credentials_readable_only_by_the_user(
    stack: RunningStack, tmp_path: Path
) -> None:
    env_file = tmp_path / "creds.env"
    result = _login(stack, "admin", stack.admin_password, env_file)
    assert result.returncode == 0, result.stderr
    assert stat.S_IMODE(env_file.stat().st_mode) == 0o600
    config = resolve(env_file)
    expected = (stack.url, "admin", stack.admin_password)
    assert (config.uri, config.username, config.password) == expected
    assert config.cert_path == str(stack.ca)


def test_login_with_a_wrong_password_saves_nothing(stack: RunningStack, tmp_path: Path) -> None:
    name, _ = stack.new_user("login")
    env_file = tmp_path / "creds.env"
    result = _login(stack, name, "wrong", env_file)
    assert result.returncode == 1
    assert "wrong username or password" in result.stderr
    assert not env_file.exists()


def test_check_command_reports_what_the_environment_would_use(
    stack: RunningStack, tmp_path: Path
) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "trackgate", "check"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
        env=clean_env(**stack.client_env(), HOME=str(tmp_path)),
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"tracking URI: {stack.url}" in result.stdout
    assert "password:     (set)" in result.stdout
    assert stack.admin_password not in result.stdout
