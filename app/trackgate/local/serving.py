"""`trackgate serve-model`: publish a registered model through nginx, behind the same login.

The model is downloaded through the proxy with the caller's exported credentials (exactly what a
client machine would do), the MLflow pyfunc scoring server runs on loopback, and a location
rendered from nginx/serving-location.conf.j2 publishes it at /serving/NAME/. Stopping (Ctrl-C,
SIGTERM) removes the location again, so a stopped model never answers with a 502.

Where nginx is not ours to reload (compose's serving profile, the Ansible role's units, a host
without nginx), `--address` puts the scoring server on a fixed socket or private TCP address and
`--no-publish` leaves publishing to TRACKGATE_SERVED_MODELS, rendered with the same template.
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import socket as socketlib
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

import requests

from .. import accounts, client, nginx, served
from ..accounts import Account
from ..processes import die_with_parent, pid_alive
from ..settings import Settings
from .probe import internal_connection
from .stack import StackError

NAME_PATTERN = served.NAME_PATTERN
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
    try:
        return served.check_name(name)
    except served.AddressError as exc:
        raise ServingError(str(exc)) from None


def parse_address(text: str) -> served.Address:
    try:
        return served.parse_address(text)
    except served.AddressError as exc:
        raise ServingError(str(exc)) from None


@contextmanager
def connect_to(url: str | None, host: str | None) -> Iterator[None]:
    """Reach URL's server at HOST instead of the address its name resolves to, keeping the name
    for TLS and Host (curl's --connect-to): compose's serving container reaches nginx by its
    service name while the public name (often `localhost`) means something else in there."""
    from urllib.parse import urlsplit

    name = urlsplit(url or "").hostname
    if not host or not name:
        yield
        return
    real = socketlib.getaddrinfo

    def pinned(target: object, *args: object, **kwargs: object) -> object:
        return real(host if target == name else target, *args, **kwargs)  # type: ignore[arg-type]

    socketlib.getaddrinfo = pinned  # type: ignore[assignment]
    try:
        yield
    finally:
        socketlib.getaddrinfo = real


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
    model_path: Path, address: served.Address, workers: int, workdir: Path
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
        "HOME": str(workdir),
        "TMPDIR": str(workdir),
        "LANG": os.environ.get("LANG", "C.UTF-8"),
    })
    app = argv[-1]
    bind = ["--uds", address.socket] if address.socket else \
        ["--host", address.host, "--port", str(address.port)]
    return [sys.executable, "-m", "uvicorn", *bind, "--workers", str(workers), app], env


def publish(settings: Settings, name: str, address: served.Address) -> Path:
    path = location_file(settings, name)
    nginx.write_if_changed(path, nginx.render_serving_location(name, address), mode=0o644)
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


def _sandbox(settings: Settings, workdir: Path, *dirs: Path) -> Account | None:
    """As root, the model runs as the model account and owns only its work dir (and the
    directory of a given socket), which the service account (nginx workers) may pass to reach
    the socket; no one else may enter."""
    if not accounts.running_as_root():
        for path in (workdir, *dirs):
            os.chmod(path, 0o700)
        return None
    model = accounts.lookup(settings.model_user)
    service = accounts.lookup(settings.service_user)
    if model is None or service is None:
        missing = settings.model_user if model is None else settings.service_user
        raise ServingError(f"no account {missing!r}: start the stack with `trackgate up` (as "
                           "root) first, or set TRACKGATE_MODEL_USER to an unprivileged account")
    if model.uid == 0:
        raise ServingError("TRACKGATE_MODEL_USER must not be root: models are untrusted code")
    for path in (workdir, *dirs):
        accounts.give_to(Account(model.name, model.uid, service.gid), path)
        os.chmod(path, 0o710)
    return model


def _own_socket_dir(directory: Path, socket: Path) -> None:
    """A given socket's directory is handed to the model account (as root): it must be one of
    its own, empty but for a killed server's socket, never a shared one such as /run or /tmp."""
    try:
        directory.mkdir(mode=0o700, exist_ok=True)
    except OSError as exc:
        raise ServingError(f"cannot create the socket's directory {directory}: "
                           f"{exc.strerror}") from None
    if any(path != socket for path in directory.iterdir()):
        raise ServingError(
            f"{directory} holds other files: give the socket a directory of its own (it is "
            "handed to the model account), e.g. unix:/run/trackgate-models/NAME/model.sock")
    socket.unlink(missing_ok=True)  # a killed server's


def _socket_answers(address: served.Address) -> bool:
    where = f"unix:{address.socket}" if address.socket else address.upstream
    conn = internal_connection(where, timeout=5)
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
    address: str | None = None,
    publish_location: bool = True,
    connect_host: str | None = None,
    on_ready: Callable[[Published], None] = lambda _p: None,
) -> int:
    """Download, serve and (unless `publish_location` is off) publish until stopped; returns
    the scoring server's exit code. `address`: a fixed socket or private host:port instead of
    a socket in a private temporary dir; `connect_host`: see connect_to()."""
    validate_name(name)
    listen = parse_address(address) if address else None
    socket_dirs = [Path(listen.socket).parent] if listen and listen.socket else []
    for directory in socket_dirs:
        _own_socket_dir(directory, Path(listen.socket or ""))
    if not model_uri.strip():
        raise ServingError("no model URI: give one such as models:/NAME@champion")
    config = client.configure(env_file=".env")
    owner = _claim(settings, name)  # before the try: never unpublish another process's model
    workdir = Path(tempfile.mkdtemp(prefix=f"trackgate-serve-{name}-"))
    listen = listen or served.Address(socket=str(workdir / "model.sock"))
    proc: subprocess.Popen[bytes] | None = None
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        (workdir / "model").mkdir()
        with connect_to(config.uri, connect_host):
            model_path = download_model(model_uri, config, workdir / "model")
        account = _sandbox(settings, workdir, *socket_dirs)
        argv, env = scoring_server(model_path, listen, workers, workdir)
        extra = account.popen_kwargs() if account is not None else {}
        proc = subprocess.Popen(argv, env=env, cwd=workdir, stdin=subprocess.DEVNULL,
                                preexec_fn=die_with_parent, **extra)
        _wait_until(lambda: _socket_answers(listen), proc, "it answered /ping")
        base = f"{settings.public_url}/serving/{name}"
        path = location_file(settings, name)
        if publish_location:
            path = publish(settings, name, listen)
            auth = (config.username, config.password or "") if config.username else None
            verify: bool | str = config.cert_path or True
            # nginx reloads asynchronously: ready means the public URL answers through the proxy.
            _wait_until(
                lambda: _answers(f"{base}/ping", auth=auth, verify=verify),
                proc,
                f"{base}/ping answered through nginx",
            )
        on_ready(Published(name, f"{base}/invocations", listen.upstream, path))
        return proc.wait()
    except _Stop:
        return 0
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        try:
            if publish_location:
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
