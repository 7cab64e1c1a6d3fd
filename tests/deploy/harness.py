"""Run the real `ansible-playbook deploy.yml` against a systemd host container.

The container shares the machine's network (`network="host"`): it is the only way for the
"server" to reach the Debian mirror here (dockerd runs without NAT), so each deployment gets its
own free ports instead of 80/443 and every client request goes to 127.0.0.1. Python
dependencies travel from the controller as a wheelhouse (`trackgate_wheelhouse: true`), so the
host needs no PyPI access.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import requests
import yaml

from tests.infra.ready import ensure_docker
from tests.infra.systemd_host import systemd_host
from tests.support import free_port, session_from

REPO = Path(__file__).resolve().parents[2]
ANSIBLE_DIR = REPO / "ansible"
ARTIFACTS = ANSIBLE_DIR / "artifacts"  # git-ignored; keeps the wheelhouse between runs
PLAYBOOK_TIMEOUT = 1500.0
ALICE, BOB = "alice", "bob"


def snapshot_source(dest: Path) -> Path:
    """Copy what the wheel is built from, so edits made meanwhile in the shared checkout cannot
    turn a "nothing changed" run into a changed one."""
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, dest / name)
    for name in ("app", "nginx", "monitoring"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    return dest


@dataclass
class PlaybookRun:
    """One ansible-playbook run, read from the ansible.posix.json callback."""

    returncode: int
    report: dict[str, Any]
    log: Path
    seconds: float

    @property
    def tasks(self) -> list[tuple[str, dict[str, Any]]]:
        """(task name, result on our one host) in the order they ran, handlers included."""
        out: list[tuple[str, dict[str, Any]]] = []
        for play in self.report.get("plays", []):
            for task in play.get("tasks", []):
                name = task["task"]["name"].split(" : ", 1)[-1]  # drop "role : "
                for result in task.get("hosts", {}).values():
                    out.append((name, result))
        return out

    @property
    def changed_tasks(self) -> list[str]:
        return [name for name, result in self.tasks if result.get("changed")]

    @property
    def stats(self) -> dict[str, int]:
        return next(iter(self.report.get("stats", {}).values()), {})

    def failure(self) -> str:
        """The failed task and its message, for assertion messages."""
        for name, result in self.tasks:
            if result.get("failed") or result.get("unreachable"):
                return f"{name}: {result.get('msg') or result.get('stderr') or result}"
        return f"rc={self.returncode}, see {self.log}"

    def assert_ok(self) -> PlaybookRun:
        assert self.returncode == 0, self.failure()
        return self


@dataclass
class Deployment:
    """A systemd host container and the inventory that deploys trackgate to it."""

    name: str
    workdir: Path
    source: Path
    backend: str
    ports: dict[str, int]
    passwords: dict[str, str]
    db_password: str = ""
    extra_vars: dict[str, Any] = field(default_factory=dict)
    runs: int = 0
    # Also in group trackgate_monitoring: Prometheus on the same host (issue 17).
    monitoring: bool = False
    # The controller's trackgate_artifacts_dir (wheel, wheelhouse, fetched CA certificates).
    artifacts: Path = ARTIFACTS

    @property
    def url(self) -> str:
        return f"https://localhost:{self.ports['https']}"

    @property
    def ca(self) -> Path:
        return self.artifacts / self.name / "ca.pem"

    def host_vars(self, **overrides: Any) -> dict[str, Any]:
        values: dict[str, Any] = {
            "ansible_connection": "community.docker.docker",
            "trackgate_hostname": "localhost",
            "trackgate_http_port": self.ports["http"],
            "trackgate_https_port": self.ports["https"],
            "trackgate_backend": self.backend,
            "trackgate_source_dir": str(self.source),
            "trackgate_wheelhouse": True,
            "trackgate_users": [{"name": n, "password": p, **({"role": "admin"} if n == "admin"
                                                               else {})}
                                for n, p in self.passwords.items()],
            "trackgate_settings": {
                # bcrypt cost 4 keeps the many logins of the tests cheap (trackgate's is 12).
                "bcrypt_rounds": 4,
            },
            **self.extra_vars,
        }
        if self.backend == "postgresql":
            values["trackgate_postgresql_port"] = self.ports["postgresql"]
            values["trackgate_postgresql_password"] = self.db_password
        values.update(overrides)
        return values

    def playbook(self, *args: str, playbook: str = "deploy.yml", **overrides: Any) -> PlaybookRun:
        """Run the real deploy.yml (or another playbook of ansible/) with a generated inventory;
        overrides change host variables."""
        self.runs += 1
        inventory = self.workdir / f"inventory-{self.runs}.yml"
        hosts = {self.name: self.host_vars(**overrides)}
        groups: dict[str, Any] = {"trackgate": {"hosts": hosts}}
        if self.monitoring:
            groups["trackgate_monitoring"] = {"hosts": {self.name: {}}}
        inventory.write_text(yaml.safe_dump({"all": {"children": groups}}))
        log = self.workdir / f"playbook-{self.runs}.json"
        env = {
            **os.environ,
            "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
            "ANSIBLE_FORCE_COLOR": "0",
            "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
        }
        started = time.monotonic()
        with log.open("w") as out:
            proc = subprocess.run(
                [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory),
                 playbook, *args],
                cwd=ANSIBLE_DIR, env=env, stdout=out, stderr=subprocess.STDOUT, text=True,
                timeout=PLAYBOOK_TIMEOUT, check=False,
            )
        text = log.read_text()
        # Warnings may precede the JSON document.
        report = json.loads(text[text.index("{"):]) if "{" in text else {}
        return PlaybookRun(proc.returncode, report, log, time.monotonic() - started)

    def session(self, user: str | None = None) -> requests.Session:
        """An HTTPS session that trusts the fetched CA, logged in as `user` if given."""
        session = session_from()
        session.trust_env = False  # else REQUESTS_CA_BUNDLE from the environment beats `verify`
        session.verify = str(self.ca)
        if user is not None:
            session.auth = (user, self.passwords[user])
        return session

    def wait_healthy(self, timeout: float = 120.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if self.session().get(f"{self.url}/health", timeout=5).status_code == 200:
                    return
            except requests.RequestException:
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"{self.url}/health not answering after {timeout:.0f}s")
            time.sleep(1)

    def client_env(self, user: str = ALICE) -> dict[str, str]:
        """What a user exports before running a training script."""
        return {
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_TRACKING_USERNAME": user,
            "MLFLOW_TRACKING_PASSWORD": self.passwords[user],
            "MLFLOW_TRACKING_SERVER_CERT_PATH": str(self.ca),
        }


@contextlib.contextmanager
def deployment(name: str, workdir: Path, backend: str = "sqlite") -> Iterator[Deployment]:
    """Boot a fresh systemd host, yield its Deployment (not yet deployed), always remove it."""
    ensure_docker()
    source = workdir / "src"
    source.mkdir()
    snapshot_source(source)
    ports = {k: free_port() for k in ("http", "https", "tracking", "gateway", "postgresql")}
    passwords = {ALICE: secrets.token_urlsafe(18), BOB: secrets.token_urlsafe(18)}
    with systemd_host(name, network="host"):
        yield Deployment(name, workdir, source, backend, ports, passwords,
                         db_password=secrets.token_urlsafe(18))
    shutil.rmtree(ARTIFACTS / name, ignore_errors=True)
