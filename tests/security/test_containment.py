"""Attacks 3, 5, 6 and 9 of issue 12, each run for real against a `trackgate up` stack:

3. the internal servers answered any local account (and believed its identity header and
   client address);
5. one logged-in user's slow uploads tied up every tracking thread, and one huge JSON body grew a
   worker to gigabytes;
6. an anonymous slowloris exhausted nginx's connections;
9. a `.env` in the working directory configured the server.
"""

from __future__ import annotations

import json
import os
import resource
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support import RunningStack, clean_env, fresh_source_ip, running_stack

pytestmark = pytest.mark.security


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("containment"), bcrypt_rounds=4,
                       failure_limit=3) as running:
        yield running


def _tls(stack: RunningStack, source_ip: str) -> ssl.SSLSocket:
    context = ssl.create_default_context(cafile=str(stack.ca))
    raw = socket.create_connection(("127.0.0.1", stack.settings.https_port), timeout=30,
                                   source_address=(source_ip, 0))
    return context.wrap_socket(raw, server_hostname="localhost")


def _basic(user: str, password: str) -> str:
    import base64

    return base64.b64encode(f"{user}:{password}".encode()).decode()


def _timed_health(stack: RunningStack) -> float:
    started = time.monotonic()
    answer = stack.get("/health", timeout=20)
    assert answer.status_code == 200
    return time.monotonic() - started


# --- 3: only nginx reaches the internal servers ---------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="needs another local account (run as root)")
@pytest.mark.parametrize("server", ["tracking", "gateway"])
def test_another_local_account_cannot_reach_the_internal_servers(
        stack: RunningStack, server: str) -> None:
    address = stack.settings.bind_address(server)
    assert address.startswith("unix:"), "no TCP port for a local account to call"
    probe = (f"import socket; s = socket.socket(socket.AF_UNIX); "
             f"s.connect({address.removeprefix('unix:')!r}); print('connected')")
    result = subprocess.run(["su", "-s", "/bin/sh", "daemon", "-c",
                             f"{sys.executable} -c \"{probe}\""],
                            capture_output=True, text=True, timeout=60)
    assert "connected" not in result.stdout
    assert "PermissionError" in result.stderr, result.stderr


def test_a_client_sent_identity_header_is_not_believed(stack: RunningStack) -> None:
    answer = stack.get("/api/2.0/mlflow/experiments/search?max_results=1",
                       headers={"X-Trackgate-User": "admin", "X-Remote-User": "admin"})
    assert answer.status_code == 401


def test_a_client_sent_address_does_not_move_its_failures_elsewhere(stack: RunningStack) -> None:
    """The per-address limit counts the real peer: a forged X-Real-IP / X-Forwarded-For
    neither escapes it nor blocks the forged address."""
    name, _ = stack.new_user("ipspoof")
    attacker = fresh_source_ip()
    codes = []
    for n in range(6):
        forged = {"X-Real-IP": f"203.0.113.{n}", "X-Forwarded-For": f"198.51.100.{n}"}
        codes.append(stack.get("/version", auth=(name, f"wrong-{n}"), source_ip=attacker,
                               headers=forged).status_code)
    assert 429 in codes, codes  # throttled: each forged address did not start a fresh count


def test_the_gateway_counters_are_not_published(stack: RunningStack) -> None:
    answer = stack.get("/stats", auth=("admin", stack.admin_password))
    assert "cache_hits" not in answer.text


# --- 5: slow and huge requests ----------------------------------------------------------------

def _connections_to(socket_path: str) -> int:
    """Connected streams on a Unix socket path (the kernel's own table; state 03: connected)."""
    lines = Path("/proc/net/unix").read_text().splitlines()[1:]
    return sum(1 for line in lines
               if line.split()[-1] == socket_path and line.split()[5] == "03")


def test_slow_uploads_do_not_reach_the_tracking_server_until_their_body_is_complete(
        stack: RunningStack) -> None:
    """More slow uploads than the tracking server has threads (workers x threads): nginx holds
    the unfinished bodies itself, so MLflow sees none of them (no connection is opened for
    them) and the API and /health answer at once."""
    slow = stack.settings.workers * stack.settings.threads + 4
    tracking_socket = stack.settings.bind_address("tracking").removeprefix("unix:")
    user, password = stack.new_user("slowpoke")
    source = fresh_source_ip()
    stack.get("/version", auth=(user, password), source_ip=source)  # its login is cached
    before = _connections_to(tracking_socket)
    held: list[ssl.SSLSocket] = []
    try:
        for n in range(slow):
            conn = _tls(stack, source)
            conn.sendall(
                (f"PUT /api/2.0/mlflow-artifacts/artifacts/slow/{n}.bin HTTP/1.1\r\n"
                 f"Host: localhost:{stack.settings.https_port}\r\n"
                 f"Authorization: Basic {_basic(user, password)}\r\n"
                 "Content-Length: 1000000\r\n\r\nx").encode())
            held.append(conn)
        time.sleep(3)  # every upload has started sending
        assert _connections_to(tracking_socket) - before < slow // 2
        started = time.monotonic()
        answer = stack.get("/api/2.0/mlflow/experiments/search?max_results=1",
                           auth=("admin", stack.admin_password), timeout=20)
        assert answer.status_code == 200
        assert time.monotonic() - started < 5
        assert _timed_health(stack) < 5
    finally:
        for conn in held:
            conn.close()


def test_a_huge_json_body_is_refused_before_mlflow_reads_it(stack: RunningStack) -> None:
    conn = _tls(stack, fresh_source_ip())
    try:
        conn.sendall(
            (f"POST /api/2.0/mlflow/runs/log-batch HTTP/1.1\r\n"
             f"Host: localhost:{stack.settings.https_port}\r\n"
             f"Authorization: Basic {_basic('admin', stack.admin_password)}\r\n"
             "Content-Type: application/json\r\n"
             f"Content-Length: {400 * 1024 * 1024}\r\n\r\n{{").encode())
        status = conn.recv(4096).decode(errors="replace")
    finally:
        conn.close()
    assert status.startswith("HTTP/1.1 413"), status
    assert "TRACKGATE_MAX_API_BODY" in status


def test_artifact_uploads_keep_no_body_cap(stack: RunningStack) -> None:
    body = os.urandom(80 * 1024 * 1024)  # over the JSON API cap of 64m
    answer = stack.request("PUT", "/api/2.0/mlflow-artifacts/artifacts/cap-test/big.bin",
                           data=body, auth=("admin", stack.admin_password), timeout=300)
    assert answer.status_code == 200, answer.text


# --- 6: slowloris -----------------------------------------------------------------------------

def test_a_slowloris_from_one_address_does_not_take_nginx_down(stack: RunningStack) -> None:
    want = 2500
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard < want + 200:
        pytest.skip(f"this machine allows {hard} open files, the attack needs {want}")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, want + 200), hard))
    attacker = fresh_source_ip()
    held: list[socket.socket] = []
    try:
        for _ in range(want):  # connections that never finish their handshake or headers
            held.append(socket.create_connection(("127.0.0.1", stack.settings.https_port),
                                                 timeout=10, source_address=(attacker, 0)))
        time.sleep(1)
        assert _timed_health(stack) < 5
        answer = stack.get("/api/2.0/mlflow/experiments/search?max_results=1",
                           auth=("admin", stack.admin_password), timeout=20)
        assert answer.status_code == 200
    finally:
        for conn in held:
            conn.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_anonymous_floods_are_rate_limited(stack: RunningStack) -> None:
    source = fresh_source_ip()
    codes = [stack.get("/api/2.0/mlflow/experiments/search", source_ip=source).status_code
             for _ in range(120)]
    assert 429 in codes
    assert set(codes) <= {401, 429}
    # Logged-in traffic from the same address is not affected by the anonymous limit.
    assert stack.get("/version", auth=("admin", stack.admin_password),
                     source_ip=source).status_code == 200


# --- 9: the working directory configures nothing ----------------------------------------------

def _config(cwd: Path, data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = clean_env(TRACKGATE_DATA_DIR=str(data_dir))
    return subprocess.run([sys.executable, "-m", "trackgate", "config", "--json"], cwd=cwd,
                          env=env, capture_output=True, text=True, timeout=60)


def test_a_dotenv_in_the_working_directory_is_not_read(tmp_path: Path) -> None:
    planted = tmp_path / "someone-elses-dir"
    planted.mkdir()
    (planted / ".env").write_text("TRACKGATE_NGINX_BINARY=/tmp/evil\n"
                                  "TRACKGATE_HOSTNAME=evil.example\n")
    result = _config(planted, tmp_path / "data")
    assert result.returncode == 0, result.stderr
    settings = json.loads(result.stdout)["settings"]
    assert settings["TRACKGATE_NGINX_BINARY"] == "nginx"
    assert settings["TRACKGATE_HOSTNAME"] == "localhost"


def test_the_data_dirs_settings_file_is_read_and_refused_when_others_can_write_it(
        tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    settings_file = data / "trackgate.env"
    settings_file.write_text("TRACKGATE_HOSTNAME=mlflow.example.org\n")
    settings_file.chmod(0o600)
    result = _config(tmp_path, data)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["public_url"] == "https://mlflow.example.org:8443"
    settings_file.chmod(0o666)
    refused = _config(tmp_path, data)
    assert refused.returncode == 2
    assert "can be changed by other accounts" in refused.stderr
    assert "Traceback" not in refused.stderr


# --- least privilege: nothing of the stack but the supervisor keeps root ----------------------

def _processes_of(data_dir: Path) -> list[tuple[int, int, str]]:
    """(pid, uid, command line) of every process whose command line names this data dir."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            uid = int((entry / "status").read_text().split("\nUid:")[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if str(data_dir) in cmdline:
            found.append((int(entry.name), uid, cmdline))
    return found


@pytest.mark.skipif(os.geteuid() != 0, reason="started by root, the stack drops privileges")
def test_started_by_root_only_the_supervisor_keeps_root(stack: RunningStack) -> None:
    processes = _processes_of(stack.settings.data_dir)
    names = " ".join(cmd for _, _, cmd in processes)
    assert "nginx: master" in names and "serve tracking" in names and "serve gateway" in names
    as_root = [cmd for _, uid, cmd in processes if uid == 0]
    assert all(" supervise" in cmd for cmd in as_root), as_root


@pytest.mark.skipif(os.geteuid() != 0, reason="started by root, the stack drops privileges")
def test_the_service_account_cannot_change_what_root_reads(stack: RunningStack) -> None:
    settings_file = stack.settings.data_dir / "trackgate.env"
    settings_file.write_text("TRACKGATE_HOSTNAME=localhost\n")
    settings_file.chmod(0o644)
    result = _config(stack.settings.data_dir, stack.settings.data_dir)  # as root
    assert result.returncode == 0, result.stderr
    os.chown(settings_file, *_service_ids(stack))  # the account took the file over
    refused = _config(stack.settings.data_dir, stack.settings.data_dir)
    assert refused.returncode == 2 and "can be changed by other accounts" in refused.stderr
    settings_file.unlink()


def _service_ids(stack: RunningStack) -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam(stack.settings.service_user)
    return entry.pw_uid, entry.pw_gid
