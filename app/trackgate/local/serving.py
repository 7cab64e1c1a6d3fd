"""`trackgate serve-model`: publish a registered model through nginx, behind the same login.

The model is downloaded through the proxy with the caller's exported credentials (exactly what a
client machine would do), the MLflow pyfunc scoring server runs on loopback, and a location
rendered from nginx/serving-location.conf.j2 publishes it at /serving/NAME/. Stopping (Ctrl-C,
SIGTERM) removes the location again, so a stopped model never answers with a 502.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import requests

from .. import accounts, client, nginx
from ..accounts import Account
from ..processes import die_with_parent, pid_alive
from ..settings import Settings
from .probe import internal_connection
from .stack import StackError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
START_TIMEOUT = 120.0


class ServingError(StackError):
    """The model cannot be served or published; the message says what to do."""


@dataclass(frozen=True)
class Published:
    name: str
    url: str  # the public invocations URL
    upstream: str  # the scoring server, in nginx's notation (unix:/path/model.sock:)
    location_file: Path


def validate_name(name: str) -> str:
    """Names become part of a URL and of nginx config: letters, digits, '.', '_', '-' only."""
    if not NAME_PATTERN.match(name) or ".." in name:
        raise ServingError(
            f"{name!r} is not a serving name: use letters, digits, '.', '_' or '-' "
            "(at most 64, starting with a letter or digit)"
        )
    return name


def location_file(settings: Settings, name: str) -> Path:
    return settings.serving_dir / f"{name}.conf"


def download_model(model_uri: str, config: client.TrackingConfig, dst: Path) -> Path:
    """Fetch the model through the proxy as any client would; clear errors for bad credentials."""
    result = client.check(config)
    if not result.ok:
        raise client.ClientError(result.message)
    import mlflow.artifacts
    from mlflow.exceptions import MlflowException

    try:
        return Path(mlflow.artifacts.download_artifacts(artifact_uri=model_uri, dst_path=str(dst)))
    except MlflowException as exc:
        raise ServingError(f"cannot download {model_uri}: {exc.message}") from exc


def scoring_server(
    model_path: Path, socket: Path, workers: int
) -> tuple[list[str], dict[str, str]]:
    """The server `mlflow models serve --env-manager local` runs, on a Unix socket, with this
    interpreter's uvicorn, and an environment that carries nothing of the caller's: the model
    is code from whoever registered it, so it gets no password, token or key."""
    from mlflow.pyfunc import scoring_server as mlflow_scoring

    command, mlflow_env = mlflow_scoring.get_cmd(str(model_path), port=0, host="x", nworkers=1)
    argv = shlex.split(command)
    if argv[0] != "uvicorn":
        raise ServingError(f"unexpected scoring server command from MLflow: {command}")
    # What MLflow adds for the model (its path, timeouts), not the caller's whole environment.
    env = {k: v for k, v in mlflow_env.items() if os.environ.get(k) != v}
    env.update({
        "PATH": f"{Path(sys.executable).parent}:/usr/bin:/bin",
        "HOME": str(socket.parent),
        "TMPDIR": str(socket.parent),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    })
    app = argv[-1]
    return [sys.executable, "-m", "uvicorn", "--uds", str(socket), "--workers", str(workers),
            app], env


def publish(settings: Settings, name: str, upstream: str) -> Path:
    path = location_file(settings, name)
    nginx.write_if_changed(path, nginx.render_serving_location(name, upstream), mode=0o644)
    try:
        nginx.reload(settings)
    except nginx.NginxError:
        path.unlink(missing_ok=True)  # never leave a config nginx refuses
        raise
    return path


def unpublish(settings: Settings, name: str) -> None:
    path = location_file(settings, name)
    if path.exists():
        path.unlink()
        nginx.reload(settings)


def _claim(settings: Settings, name: str) -> Path:
    """Record that this process serves NAME; refuse if a live serve-model already does. A
    file left by a killed serve-model (dead PID) is simply taken over."""
    owner = settings.serving_dir / f"{name}.pid"
    try:
        other = int(owner.read_text().strip())
    except (FileNotFoundError, ValueError):
        other = None
    if other is not None and other != os.getpid() and pid_alive(other):
        raise ServingError(
            f"{name!r} is already served by `trackgate serve-model` (pid {other}): "
            "stop that one first, or choose another --name"
        )
    owner.parent.mkdir(parents=True, exist_ok=True)
    owner.write_text(f"{os.getpid()}\n")
    return owner


def _wait_until(check: Callable[[], bool], proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise ServingError(f"the scoring server exited ({proc.returncode}) before {what}")
        if check():
            return
        time.sleep(0.3)
    raise ServingError(f"timed out after {START_TIMEOUT:.0f} s waiting until {what}")


def _answers(url: str, **kwargs: object) -> bool:
    try:
        return requests.get(url, timeout=5, **kwargs).status_code == 200  # type: ignore[arg-type]
    except requests.RequestException:
        return False


class _Stop(Exception):
    pass


def _raise_stop(_signum: int, _frame: FrameType | None) -> None:
    raise _Stop


def _sandbox(settings: Settings, workdir: Path) -> Account | None:
    """As root, the model runs as the model account and owns only its work dir, which the
    service account (nginx workers) may pass to reach the socket; no one else may enter."""
    if not accounts.running_as_root():
        os.chmod(workdir, 0o700)
        return None
    model = accounts.lookup(settings.model_user)
    service = accounts.lookup(settings.service_user)
    if model is None or service is None:
        missing = settings.model_user if model is None else settings.service_user
        raise ServingError(f"no account {missing!r}: start the stack with `trackgate up` (as "
                           "root) first, or set TRACKGATE_MODEL_USER to an unprivileged account")
    if model.uid == 0:
        raise ServingError("TRACKGATE_MODEL_USER must not be root: models are untrusted code")
    accounts.give_to(Account(model.name, model.uid, service.gid), workdir)
    os.chmod(workdir, 0o710)
    return model


def _socket_answers(socket: Path) -> bool:
    conn = internal_connection(f"unix:{socket}", timeout=5)
    try:
        conn.request("GET", "/ping")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


def serve_model(
    settings: Settings,
    model_uri: str,
    name: str,
    *,
    workers: int = 1,
    on_ready: Callable[[Published], None] = lambda _p: None,
) -> int:
    """Download, serve and publish until stopped; returns the scoring server's exit code."""
    validate_name(name)
    config = client.configure(env_file=".env")
    owner = _claim(settings, name)  # before the try: never unpublish another process's model
    workdir = Path(tempfile.mkdtemp(prefix=f"trackgate-serve-{name}-"))
    socket = workdir / "model.sock"
    proc: subprocess.Popen[bytes] | None = None
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        (workdir / "model").mkdir()
        model_path = download_model(model_uri, config, workdir / "model")
        account = _sandbox(settings, workdir)
        argv, env = scoring_server(model_path, socket, workers)
        extra = account.popen_kwargs() if account is not None else {}
        proc = subprocess.Popen(argv, env=env, cwd=workdir, stdin=subprocess.DEVNULL,
                                preexec_fn=die_with_parent, **extra)
        upstream = f"unix:{socket}:"  # nginx's notation for an HTTP upstream on a socket
        _wait_until(lambda: _socket_answers(socket), proc, "it answered /ping")
        path = publish(settings, name, upstream)
        base = f"{settings.public_url}/serving/{name}"
        auth = (config.username, config.password or "") if config.username else None
        verify: bool | str = config.cert_path or True
        # nginx reloads asynchronously: ready means the public URL answers through the proxy.
        _wait_until(
            lambda: _answers(f"{base}/ping", auth=auth, verify=verify),
            proc,
            f"{base}/ping answered through nginx",
        )
        on_ready(Published(name, f"{base}/invocations", upstream, path))
        return proc.wait()
    except _Stop:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            unpublish(settings, name)
        finally:
            if proc is not None and proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
            shutil.rmtree(workdir, ignore_errors=True)
            owner.unlink(missing_ok=True)
