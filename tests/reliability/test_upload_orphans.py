"""An upload body file a killed nginx left behind does not stay on disk (issue 18): a real
`trackgate up` stack, a large upload streamed slowly, nginx's master and workers SIGKILLed while
nginx writes the body (as the OOM killer would): when the supervisor has started nginx again,
the dead nginx's file is gone, the supervisor said so, and the next upload works."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from trackgate import processes
from trackgate.settings import Settings

from .supervision import CliStack, kill, running_cli_stack, still_alive, wait_until

pytestmark = pytest.mark.reliability
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
PIECE = 64 << 10


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliStack]:
    with running_cli_stack(tmp_path_factory, "upload-orphans") as running:
        yield running


def _nginx(stack: CliStack) -> dict[str, object]:
    state = json.loads((stack.data_dir / "run" / "supervisor.json").read_text())
    return state["nginx"]  # type: ignore[no-any-return]


def _api(stack: CliStack, path: str, body: dict[str, object]) -> dict[str, object]:
    answer = requests.post(f"{stack.url}{path}", json=body, auth=("admin", stack.password),
                           verify=str(stack.data_dir / "tls" / "ca.pem"), timeout=60)
    assert answer.status_code == 200, answer.text
    return answer.json()  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def prefix(stack: CliStack) -> str:
    """Where the uploads go: a run's artifacts."""
    experiment = _api(stack, "/api/2.0/mlflow/experiments/create", {"name": "orphans"})
    run = _api(stack, "/api/2.0/mlflow/runs/create",
               {"experiment_id": experiment["experiment_id"]})["run"]
    return f"{ARTIFACTS}/{experiment['experiment_id']}/{run['info']['run_id']}/artifacts"  # type: ignore[index]


@contextlib.contextmanager
def _upload_in_flight(stack: CliStack, url: str, folder: Path) -> Iterator[str]:
    """A PUT announcing 512 MiB, streamed until nginx has started writing its body file;
    yields that file's name, the connection still open (the upload unfinished)."""
    context = ssl.create_default_context(cafile=str(stack.data_dir / "tls" / "ca.pem"))
    token = base64.b64encode(f"admin:{stack.password}".encode()).decode()
    with socket.create_connection(("127.0.0.1", stack.https_port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"PUT {url} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic {token}\r\n"
                    f"Content-Length: {512 << 20}\r\n\r\n".encode())
        tls.sendall(os.urandom(4 << 20))
        deadline = time.monotonic() + 60  # past the auth gateway, nginx writes the body
        while not os.listdir(folder) and time.monotonic() < deadline:
            tls.sendall(os.urandom(PIECE))
        names = os.listdir(folder)
        assert names, "nginx never wrote the body"
        yield names[0]


def _curl_put(stack: CliStack, source: Path, url: str) -> int:
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert",
                          str(stack.data_dir / "tls" / "ca.pem"), "-u",
                          f"admin:{stack.password}", "-T", str(source), stack.url + url],
                         capture_output=True, text=True, timeout=120)
    return int(out.stdout or 0)


def _kill_nginx(stack: CliStack) -> None:
    """SIGKILL nginx's master and its workers: the master's PID from the supervisor's record,
    the workers as the members of its process group (never found by name)."""
    master = _nginx(stack)["pid"]
    assert isinstance(master, int)
    started = processes.info(master)
    assert started is not None
    nginx = [p for p in processes.group_members(master) if p.start >= started.start]
    assert len(nginx) >= 2, "nginx has a master and workers"
    for p in nginx:
        kill(p.pid)
    assert wait_until(lambda: not still_alive(nginx), 10), still_alive(nginx)


def test_a_killed_nginxs_upload_file_is_removed_before_nginx_starts_again(
    stack: CliStack, prefix: str, tmp_path: Path,
) -> None:
    settings = Settings(data_dir=stack.data_dir)
    folder = settings.nginx_upload_dir
    assert folder is not None, "nginx hands uploads over on one machine with a local store"
    with _upload_in_flight(stack, f"{prefix}/huge.bin", folder) as orphan:
        _kill_nginx(stack)
        size = (folder / orphan).stat().st_size  # left behind: nginx died without cleaning
        assert size > 0
    killed = time.monotonic()
    assert wait_until(lambda: _nginx(stack)["restarts"] == 1
                      and stack.run("status").returncode == 0, 60), stack.logs_tail()
    print(f"nginx healthy again {time.monotonic() - killed:.1f} s after the SIGKILL; "
          f"its orphan held {size} bytes")
    assert orphan not in os.listdir(folder), "the killed nginx's body file is still there"
    said = (stack.data_dir / "logs" / "supervisor.log").read_text()
    assert f"removed 1 upload file(s) a killed nginx left in {folder}" in said
    # The next upload lands whole, and nginx removes its own file again.
    source = tmp_path / "after.bin"
    source.write_bytes(os.urandom((3 << 20) + 5))
    url = f"{prefix}/after.bin"
    assert _curl_put(stack, source, url) == 200
    stored = Path(settings.artifacts_uri, url.removeprefix(ARTIFACTS + "/"))
    assert stored.read_bytes() == source.read_bytes()
    assert wait_until(lambda: not os.listdir(folder), 30), os.listdir(folder)
    assert not Path(settings.artifacts_uri, f"{prefix.removeprefix(ARTIFACTS + '/')}/huge.bin"
                    ).exists()


def test_upload_files_left_by_a_killed_stack_are_removed_when_it_starts_again(
    stack: CliStack, prefix: str,
) -> None:
    """nginx and the supervisor killed at once (nothing restarts nginx): `up` clears them."""
    folder = Settings(data_dir=stack.data_dir).nginx_upload_dir
    assert folder is not None
    supervisor = stack.supervisor_pid()
    with _upload_in_flight(stack, f"{prefix}/huge-2.bin", folder) as orphan:
        _kill_nginx(stack)  # first, then its supervisor: it restarts nginx 1 s later at the
        kill(supervisor)  # earliest
    assert wait_until(lambda: processes.info(supervisor) is None, 10)
    assert orphan in os.listdir(folder)
    log = stack.data_dir / "logs" / "supervisor.log"
    before = log.stat().st_size
    stack.up()
    assert orphan not in os.listdir(folder), "the killed stack's body file is still there"
    with log.open() as said:
        said.seek(before)
        assert f"removed 1 upload file(s) a killed nginx left in {folder}" in said.read()
