"""`trackgate up|down|status`: the whole stack on one machine, without systemd or Docker.

`up` provisions (see provision.py), checks ports and the nginx config, then starts the
supervisor in its own session and waits until /health answers through nginx.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .. import nginx
from ..processes import pid_alive, port_in_use
from ..provision import prepare
from ..settings import Settings
from .probe import https_get
from .supervisor import state_file

START_TIMEOUT = 120.0


class StackError(RuntimeError):
    """Something stops the stack from starting, with what to do about it."""


@dataclass
class UpResult:
    url: str
    already_running: bool
    admin_password: str | None  # only when the admin user was created by this call


def _pid_file(settings: Settings) -> Path:
    return settings.run_dir / "supervisor.pid"


def _settings_file(settings: Settings) -> Path:
    return settings.run_dir / "settings.json"


def recorded_settings(settings: Settings) -> Settings:
    """The settings the running stack was started with (flags given to `up` included)."""
    try:
        recorded = json.loads(_settings_file(settings).read_text())
    except (FileNotFoundError, ValueError):
        return settings
    fields = {k.removeprefix("TRACKGATE_").lower(): v for k, v in recorded.items()}
    return Settings(**fields)


def running_pid(settings: Settings) -> int | None:
    """The supervisor's PID if the one we recorded is still alive."""
    try:
        pid = int(_pid_file(settings).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    return pid if pid_alive(pid) else None


def _check_ports(settings: Settings) -> None:
    public = "0.0.0.0" if settings.listen_address in ("", "*") else settings.listen_address
    # (host, port, how to change it): `up` has flags only for the public ports.
    checks = [
        (public, settings.https_port, "--https-port or TRACKGATE_HTTPS_PORT"),
        (public, settings.http_port, "--http-port or TRACKGATE_HTTP_PORT"),
    ]
    if settings.internal_transport == "tcp":
        checks += [
            (settings.internal_host, settings.tracking_port, "TRACKGATE_TRACKING_PORT"),
            (settings.internal_host, settings.gateway_port, "TRACKGATE_GATEWAY_PORT"),
        ]
    seen: dict[tuple[str, int], str] = {}
    for host, port, how in checks:
        if (host, port) in seen:
            raise StackError(f"port {port} is given twice ({seen[host, port]} and {how}): "
                             "every server needs its own port")
        seen[host, port] = how
        if port < 1024 and os.geteuid() != 0:
            raise StackError(f"port {port} needs root; run as root or pick a port above 1023 "
                             f"({how})")
        if port_in_use(host, port):
            raise StackError(f"port {port} on {host} is already in use by another program: stop "
                             f"it, or choose another port with {how}")


def up(settings: Settings) -> UpResult:
    pid = running_pid(settings)
    if pid is not None:
        return UpResult(settings.public_url, already_running=True, admin_password=None)
    nginx.find_binary(settings)
    _check_ports(settings)
    password = prepare(settings)
    nginx.test(settings)
    log_path = settings.logs / "supervisor.log" if settings.logs else Path(os.devnull)
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            [sys.executable, "-m", "trackgate", "supervise"],
            env={**os.environ, **settings.to_env()},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the shell that ran `trackgate up`
        )
    _pid_file(settings).write_text(f"{proc.pid}\n")
    _settings_file(settings).write_text(json.dumps(settings.to_env()))
    try:
        _wait_healthy(settings, proc)
    except BaseException:
        down(settings)
        raise
    return UpResult(settings.public_url, already_running=False, admin_password=password)


def _wait_healthy(settings: Settings, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"the supervisor exited ({proc.returncode}); see {settings.logs}")
        crashing = _crashing_child(settings)
        if crashing:
            raise StackError(f"{crashing} keeps exiting at start:\n{_log_tail(settings, crashing)}")
        try:
            answer = https_get(
                settings.hostname,
                settings.https_port,
                "/health",
                ca_file=_trust_file(settings),
                verify=settings.uses_local_ca,
                timeout=5,
            )
            if answer.status == 200:
                return
            last = f"/health answered {answer.status}"
        except OSError as exc:
            last = str(exc)
        time.sleep(0.5)
    raise StackError(
        f"the stack did not become healthy in {START_TIMEOUT:.0f} s ({last}); "
        f"see the logs in {settings.logs}"
    )


def _crashing_child(settings: Settings) -> str | None:
    try:
        state = json.loads(state_file(settings).read_text())
    except (FileNotFoundError, ValueError):
        return None
    return next((name for name, info in state.items() if info.get("restarts", 0) >= 2), None)


def _log_tail(settings: Settings, name: str, lines: int = 15) -> str:
    if settings.logs is None:
        return "(logs go to stderr)"
    path = settings.logs / f"{name}.out"
    try:
        tail = path.read_text(errors="replace").splitlines()[-lines:]
    except FileNotFoundError:
        return f"(no log at {path})"
    return "\n".join(f"  {line}" for line in tail) + f"\n(full log: {path})"


def _trust_file(settings: Settings) -> Path | None:
    """Our own CA when we issued the certificate; an operator's may chain to a private CA."""
    return settings.ca_cert if settings.uses_local_ca else None


def down(settings: Settings, timeout: float = 40.0) -> bool:
    """Stop the stack; True if something was running."""
    pid = running_pid(settings)
    if pid is None:
        _pid_file(settings).unlink(missing_ok=True)
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and running_pid(settings) is not None:
        _reap(pid)
        time.sleep(0.2)
    if running_pid(settings) is not None:
        os.killpg(pid, signal.SIGKILL)  # the session `up` created: only our own processes
        _reap(pid)
    _pid_file(settings).unlink(missing_ok=True)
    state_file(settings).unlink(missing_ok=True)
    _settings_file(settings).unlink(missing_ok=True)
    return True


def _reap(pid: int) -> None:
    """Collect the supervisor if it is our child (tests start it in-process)."""
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, os.WNOHANG)


@dataclass
class Status:
    running: bool
    pid: int | None
    children: dict[str, dict[str, int | None]]
    health: str


def status(settings: Settings) -> Status:
    pid = running_pid(settings)
    try:
        children = json.loads(state_file(settings).read_text()) if pid else {}
    except (FileNotFoundError, ValueError):
        children = {}
    health = "not running"
    if pid:
        try:
            answer = https_get(
                settings.hostname,
                settings.https_port,
                "/health",
                ca_file=_trust_file(settings),
                verify=settings.uses_local_ca,
                timeout=5,
            )
            health = "healthy" if answer.status == 200 else f"/health answered {answer.status}"
        except OSError as exc:
            health = f"unreachable: {exc}"
    return Status(pid is not None, pid, children, health)


def export_lines(settings: Settings, username: str, password: str | None) -> list[str]:
    lines = [
        f"export MLFLOW_TRACKING_URI={settings.public_url}",
        f"export MLFLOW_TRACKING_USERNAME={username}",
        f"export MLFLOW_TRACKING_PASSWORD={password or '<the password>'}",
    ]
    if settings.uses_local_ca:
        lines.append(f"export MLFLOW_TRACKING_SERVER_CERT_PATH={settings.ca_cert}")
    return lines
