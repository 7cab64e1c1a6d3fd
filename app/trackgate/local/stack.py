"""`trackgate up|down|status`: the whole stack on one machine, without systemd or Docker.

`up` provisions (see provision.py), checks ports and the nginx config, then starts the
supervisor in its own session and waits until /health answers through nginx.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import database, nginx, processes
from ..processes import port_in_use
from ..provision import prepare
from ..server import objectstore
from ..settings import Settings
from . import supervisor
from .probe import health, https_get
from .supervisor import state_file

START_TIMEOUT = 120.0
STOP_LEFTOVERS_TIMEOUT = 35.0  # gunicorn's graceful_timeout is 30 s


class StackError(RuntimeError):
    """Something stops the stack from starting, with what to do about it."""


@dataclass
class UpResult:
    url: str
    already_running: bool
    admin_password: str | None  # only when the admin user was created by this call
    cleaned: int = 0  # processes a killed supervisor had left, stopped before starting


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
    # A copied data dir holds the original's record: never let it point us at the original.
    if Path(fields.get("data_dir", "")).resolve() != settings.data_dir.resolve():
        return settings
    return Settings(**fields)


def _owner_file(settings: Settings) -> Path:
    """Whose PID file this is: the supervisor's PID and start time, and the data dir it serves.
    A copy of a data dir carries the original's, which then names another directory."""
    return settings.run_dir / "supervisor.owner"


def _owner(settings: Settings) -> dict[str, object] | None:
    """The recorded supervisor if it was started for THIS data dir (not a copy's original)."""
    try:
        owner = json.loads(_owner_file(settings).read_text())
    except (FileNotFoundError, ValueError):
        return None
    if not isinstance(owner, dict) or owner.get("data_dir") != str(settings.data_dir.resolve()):
        return None
    return owner


def running_pid(settings: Settings) -> int | None:
    """The supervisor's PID if the one we recorded still runs: same PID, same start time, and a
    command line that names this data dir (never a PID that was reused, or a copy's original)."""
    try:
        pid = int(_pid_file(settings).read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    owner = _owner(settings)
    if owner is None or owner.get("pid") != pid:
        return None
    start = owner.get("start")
    if not processes.is_same(pid, start if isinstance(start, int) else None):
        return None
    if "supervise" not in processes.cmdline(pid) or not processes.names_dir(pid, settings.data_dir):
        return None
    return pid


def leftovers(settings: Settings) -> list[processes.ProcInfo]:
    """Processes a supervisor of this data dir left running (e.g. after a SIGKILL): the members
    of its session. The kernel does not reuse a session id while a member lives, and a reused
    PID shows another start time, so nothing outside this data dir's session is included."""
    owner = _owner(settings)
    if owner is None:
        return []
    sid, start = owner.get("pid"), owner.get("start")
    if not isinstance(sid, int) or not isinstance(start, int):
        return []
    leader = processes.info(sid)
    if leader is not None and not leader.zombie and leader.start != start:
        return []  # the PID was reused, so the whole session had ended
    return [p for p in processes.session_members(sid, started_after=start) if p.pid != os.getpid()]


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
    if settings.metrics:
        checks.append((settings.metrics_address, settings.metrics_port, "TRACKGATE_METRICS_PORT"))
        if supervisor.nginx_exporter_binary():
            checks.append((settings.metrics_address, settings.nginx_exporter_port,
                           "TRACKGATE_NGINX_EXPORTER_PORT"))
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
    cleaned = _stop_leftovers(settings)
    if settings.internal_transport == "tcp" and settings.proxy_secret_file is None:
        # On TCP every local account can reach the tracking port: only nginx may call it.
        settings = settings.model_copy(
            update={"proxy_secret_file": settings.data_dir / "secrets" / "proxy-secret"})
    nginx.find_binary(settings)
    _check_ports(settings)
    _check_writable(settings)
    # MLflow would migrate an old schema on its first request, without a backup: refuse first.
    database.check_schema(settings)
    if objectstore.is_s3(settings.artifacts_uri):  # wrong endpoint, keys or bucket: say so now
        objectstore.check(settings)
    password = prepare(settings)
    nginx.test(settings)
    log_path = settings.logs / "supervisor.log" if settings.logs else Path(os.devnull)
    with open(log_path, "ab") as log:  # the child keeps its own copy of the descriptor
        proc = subprocess.Popen(
            # The data dir on the command line: `down` checks it belongs to this data dir.
            [sys.executable, "-m", "trackgate", "supervise", "--data-dir",
             str(settings.data_dir.resolve())],
            env={**os.environ, **settings.to_env()},
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # survives the shell; its session finds what it started
        )
    owner = {"pid": proc.pid, "start": processes.start_time(proc.pid),
             "data_dir": str(settings.data_dir.resolve())}
    _write_atomic(_owner_file(settings), json.dumps(owner))
    _write_atomic(_pid_file(settings), f"{proc.pid}\n")
    _write_atomic(_settings_file(settings), json.dumps(settings.to_env()))
    try:
        _wait_healthy(settings, proc)
    except BaseException:
        down(settings)
        raise
    return UpResult(settings.public_url, already_running=False, admin_password=password,
                    cleaned=cleaned)


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _stop_leftovers(settings: Settings) -> int:
    """Stop what a killed supervisor of this data dir left behind; how many there were."""
    left = leftovers(settings)
    if left:
        processes.terminate(left, timeout=STOP_LEFTOVERS_TIMEOUT)
    return len(left)


def _check_writable(settings: Settings) -> None:
    """A read-only data dir (a read-only mount, or a directory of another user) is one clear
    line here, not a traceback from deep inside provisioning."""
    probe = settings.data_dir
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise StackError(
            f"the data dir {settings.data_dir} is not writable ({probe} is read-only for this "
            "user or file system): run as its owner, or choose another with --data-dir or "
            "TRACKGATE_DATA_DIR")


def _wait_healthy(settings: Settings, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    last = "no answer yet"
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise StackError(f"the supervisor exited ({proc.returncode}); see {settings.logs}")
        crashing = _crashing_child(settings)
        if crashing:
            raise StackError(f"{crashing} keeps exiting at start:\n{_log_tail(settings, crashing)}")
        problem = _public_health(settings)
        if problem is None:
            return
        last = problem
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
    """Stop the stack of this data dir; True if something of it was running.

    The supervisor stops its children; whatever a killed supervisor left (its session's
    members) is stopped by PID, each checked against its start time."""
    found = False
    pid = running_pid(settings)
    if pid is not None:
        found = True
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and running_pid(settings) is not None:
            processes.reap(pid)
            time.sleep(0.2)
        processes.reap(pid)
    left = leftovers(settings)
    if left:
        found = True
        processes.terminate(left, timeout=STOP_LEFTOVERS_TIMEOUT)
    for path in (_pid_file(settings), _owner_file(settings), state_file(settings),
                 _settings_file(settings)):
        path.unlink(missing_ok=True)
    return found


@dataclass
class Status:
    running: bool
    pid: int | None
    children: dict[str, dict[str, object]]
    health: str  # "healthy", or what is wrong
    # Each component's own health: None when fine, else what is wrong.
    components: dict[str, str | None] = field(default_factory=dict)
    leftovers: list[int] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return self.running and all(v is None for v in self.components.values())


def status(settings: Settings) -> Status:
    """The supervisor, then each component by its own health check: tracking and gateway on
    their internal addresses, nginx by /health through it (which asks both behind it)."""
    pid = running_pid(settings)
    if pid is None:
        left = [p.pid for p in leftovers(settings)]
        said = "not running"
        if left:
            said += f"; {len(left)} leftover process(es) of this data dir: run `trackgate down`"
        return Status(False, None, {}, said, {}, left)
    try:
        state = json.loads(state_file(settings).read_text())
    except (FileNotFoundError, ValueError):
        state = {}
    kids = {k: v for k, v in state.items() if k != "supervisor" and isinstance(v, dict)}
    components: dict[str, str | None] = {}
    for name in ("tracking", "gateway"):
        info = kids.get(name, {})
        if info.get("restarting"):
            components[name] = "exited; the supervisor is restarting it"
            continue
        components[name] = health(settings, name)
    components["nginx"] = _public_health(settings)
    problems = [f"{name}: {why}" for name, why in components.items() if why]
    return Status(True, pid, kids, "; ".join(problems) or "healthy", components)


def _public_health(settings: Settings) -> str | None:
    try:
        answer = https_get(
            settings.hostname,
            settings.https_port,
            f"{settings.base_path}/health",
            ca_file=_trust_file(settings),
            verify=settings.uses_local_ca,
            timeout=5,
        )
    except OSError as exc:
        return f"no answer on port {settings.https_port}: {exc}"
    return None if answer.status == 200 else f"/health answered {answer.status}"


def rotate_logs(settings: Settings, timeout: float = 30.0) -> int:
    """Ask the running supervisor to rotate its logs now; returns how many rotations it has
    done. Lines written meanwhile land in the renamed file (rename, then reopen)."""
    pid = running_pid(settings)
    if pid is None:
        raise StackError("trackgate is not running (logs are rotated by `trackgate up`'s "
                         "supervisor)")
    before = _rotations(settings)
    os.kill(pid, signal.SIGUSR1)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        now = _rotations(settings)
        if now > before:
            return now
        time.sleep(0.1)
    raise StackError(f"the supervisor did not rotate the logs within {timeout:.0f} s")


def _rotations(settings: Settings) -> int:
    try:
        info = json.loads(state_file(settings).read_text()).get("supervisor", {})
    except (FileNotFoundError, ValueError):
        return 0
    return int(info.get("log_rotations", 0))


def export_lines(settings: Settings, username: str, password: str | None) -> list[str]:
    lines = [
        f"export MLFLOW_TRACKING_URI={settings.public_url}",
        f"export MLFLOW_TRACKING_USERNAME={username}",
        f"export MLFLOW_TRACKING_PASSWORD={password or '<the password>'}",
    ]
    if settings.uses_local_ca:
        lines.append(f"export MLFLOW_TRACKING_SERVER_CERT_PATH={settings.ca_cert}")
    return lines
