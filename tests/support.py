"""Test support: start the real stack (nginx + gateway + gunicorn MLflow) on free loopback
ports, and make HTTP requests from chosen loopback source addresses.

Failed logins are throttled per client IP, so negative tests send from their own 127.0.x.y
address and never slow down the tests that log in correctly.
"""

from __future__ import annotations

import itertools
import os
import random
import secrets
import socket
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests
from requests.adapters import HTTPAdapter
from trackgate.local import stack as stack_module
from trackgate.settings import Settings
from trackgate.users import HtpasswdStore

_source_counter = itertools.count(2)


# Below Linux's ephemeral range (32768-60999): a port the kernel hands out for port 0 is also
# what it gives the next outgoing connection, so a test's port could be taken by another
# process's connection (ansible, docker) before the stack binds it.
_PORTS = range(20000, 32768)
_given: set[int] = set()


def free_port() -> int:
    """A port free on every address now, never given before in this process."""
    for _ in range(1000):
        port = random.choice(_PORTS)
        if port in _given:
            continue
        try:
            for address in ("0.0.0.0", "127.0.0.1"):
                with socket.socket() as sock:
                    sock.bind((address, port))
        except OSError:
            continue
        _given.add(port)
        return port
    raise RuntimeError("no free port found in 20000-32767")


def fresh_source_ip() -> str:
    """A loopback address no other request in this run used (127.0.x.y)."""
    n = next(_source_counter)
    return f"127.0.{n // 250 + 10}.{n % 250 + 2}"


class _SourceAddressAdapter(HTTPAdapter):
    def __init__(self, source_ip: str, **kwargs: Any) -> None:
        self._source = (source_ip, 0)
        super().__init__(**kwargs)

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        kwargs["source_address"] = self._source
        super().init_poolmanager(*args, **kwargs)


def session_from(source_ip: str | None = None) -> requests.Session:
    session = requests.Session()
    adapter = _SourceAddressAdapter(source_ip or fresh_source_ip())
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


@dataclass
class RunningStack:
    settings: Settings
    admin_password: str

    @property
    def url(self) -> str:
        return self.settings.public_url

    @property
    def ca(self) -> Path:
        return self.settings.ca_cert

    @property
    def users(self) -> HtpasswdStore:
        return HtpasswdStore(self.settings.htpasswd, self.settings.bcrypt_rounds)

    def new_user(self, prefix: str = "user") -> tuple[str, str]:
        name = f"{prefix}-{secrets.token_hex(3)}"
        password = secrets.token_urlsafe(12)
        self.users.add(name, password)
        return name, password

    def client_env(self, username: str = "admin", password: str | None = None) -> dict[str, str]:
        """What a user exports before running a training script."""
        return {
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_TRACKING_USERNAME": username,
            "MLFLOW_TRACKING_PASSWORD": self.admin_password if password is None else password,
            "MLFLOW_TRACKING_SERVER_CERT_PATH": str(self.ca),
        }

    def get(self, path: str, **kwargs: Any) -> requests.Response:
        return self.request("GET", path, **kwargs)

    def request(
        self,
        method: str,
        path: str,
        *,
        auth: tuple[str, str] | None = None,
        source_ip: str | None = None,
        **kwargs: Any,
    ) -> requests.Response:
        """One request from its own loopback source address (see fresh_source_ip)."""
        with session_from(source_ip) as session:
            kwargs.setdefault("timeout", 30)
            kwargs.setdefault("verify", str(self.ca))
            return session.request(method, self.url + path, auth=auth, **kwargs)


def stack_settings(data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = {
        "data_dir": data_dir,
        "hostname": "localhost",
        "http_port": free_port(),
        "https_port": free_port(),
        "tracking_port": free_port(),
        "gateway_port": free_port(),
        "metrics_port": free_port(),
        "nginx_exporter_port": free_port(),
        "listen_address": "127.0.0.1",
    }
    values.update(overrides)
    return Settings(**values)


@contextmanager
def running_stack(data_dir: Path, **overrides: Any) -> Iterator[RunningStack]:
    """`trackgate up` for real; always `down`, printing the logs if starting failed."""
    settings = stack_settings(data_dir, **overrides)
    try:
        result = stack_module.up(settings)
    except Exception:
        _print_logs(settings)
        raise
    try:
        assert result.admin_password, "a fresh stack creates the admin user"
        yield RunningStack(settings, result.admin_password)
    finally:
        stack_module.down(settings)


def _print_logs(settings: Settings) -> None:
    logs = settings.logs
    if logs is None or not logs.is_dir():
        return
    for path in sorted(logs.iterdir()):
        print(f"==> {path} <==")
        print("\n".join(path.read_text(errors="replace").splitlines()[-40:]))


# Variables that configure MLflow or trackgate: none may leak from the developer's shell into a
# test (the one list: support's clean_env and conftest's autouse fixture both use it).
AMBIENT_PREFIXES = ("MLFLOW_", "TRACKGATE_", "TRACKING_")


def clean_env(**extra: str) -> dict[str, str]:
    """The environment minus any MLflow/trackgate settings of the developer's shell."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(AMBIENT_PREFIXES)}
    # Stacks started through the CLI get metrics listeners of their own (the default ports
    # are one per host, and tests run several stacks at once).
    env["TRACKGATE_METRICS_PORT"] = str(free_port())
    env["TRACKGATE_NGINX_EXPORTER_PORT"] = str(free_port())
    env.update(extra)
    return env


def trackgate(
    *args: str,
    env: dict[str, str] | None = None,
    input: str | None = None,
    user: int | None = None,
    timeout: float = 180,
) -> subprocess.CompletedProcess[str]:
    """The `trackgate` command as a user runs it: its own process, a clean environment plus
    `env`, `input` on stdin, optionally as another (unprivileged) uid."""
    argv = [sys.executable, "-m", "trackgate", *args]
    if user is not None:
        argv = ["setpriv", f"--reuid={user}", f"--regid={user}", "--clear-groups", *argv]
    return subprocess.run(argv, input=input, capture_output=True, text=True, timeout=timeout,
                          env=clean_env(**(env or {})), cwd="/")


@contextmanager
def patched_environ(values: dict[str, str]) -> Iterator[None]:
    """os.environ with VALUES set, restored afterwards (the MLflow client and `trackgate up`
    read their settings from this process's environment)."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def run_at_once(argv: list[str], count: int = 2) -> list[subprocess.CompletedProcess[str]]:
    """Start COUNT copies of a command together (a race on purpose), then collect each."""
    procs = [subprocess.Popen(argv, env=clean_env(), stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True, cwd="/") for _ in range(count)]
    done = []
    for proc in procs:
        out, err = proc.communicate(timeout=600)
        done.append(subprocess.CompletedProcess(argv, proc.returncode, out, err))
    return done

