"""The supervisor of `trackgate up` never loses track (issue 13), against one real stack run
with the CLI: SIGKILL of the supervisor, of the nginx master and of the gunicorn (tracking)
master, each followed by `status`, `down` and `up`, with nothing of the data dir left running
and no acknowledged metric lost while a client keeps logging through the proxy; `status` and
/health report every component; a copy of a running data dir is a stack of its own.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import stat
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from trackgate import processes
from trackgate.local.supervisor import MAX_DELAY, STABLE_AFTER, next_delay

from .mlflow_content import mlflow_env
from .supervision import (
    CliStack,
    kill,
    mentioning,
    running_cli_stack,
    session_of,
    still_alive,
    wait_until,
    writing_client,
)

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliStack]:
    with running_cli_stack(tmp_path_factory, "supervisor") as running:
        yield running


@pytest.fixture
def work(tmp_path: Path) -> Path:
    return tmp_path


def _state(stack: CliStack) -> dict[str, dict[str, object]]:
    return json.loads((stack.data_dir / "run" / "supervisor.json").read_text())  # type: ignore[no-any-return]


def _new_run(stack: CliStack, name: str) -> str:
    from mlflow import MlflowClient

    with mlflow_env(stack.client_env()):
        client = MlflowClient()
        try:
            exp = client.create_experiment("kills")
        except Exception:
            exp = client.get_experiment_by_name("kills").experiment_id  # type: ignore[union-attr]
        return client.create_run(exp, run_name=name).info.run_id


def _stored_steps(stack: CliStack, run_id: str) -> set[int]:
    from mlflow import MlflowClient

    with mlflow_env(stack.client_env()):
        return {m.step for m in MlflowClient().get_metric_history(run_id, "m")}


def _health(stack: CliStack) -> int:
    ca = str(stack.data_dir / "tls" / "ca.pem")
    try:
        return requests.get(f"{stack.url}/health", verify=ca, timeout=15).status_code
    except requests.RequestException:
        return 0


def _healthy(stack: CliStack) -> bool:
    return stack.run("status").returncode == 0


def _port_free(port: int) -> bool:
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _down_leaves_nothing(stack: CliStack, snapshot: list[processes.ProcInfo]) -> None:
    down = stack.run("down")
    assert down.returncode == 0, down.stderr
    assert still_alive(snapshot) == [], "down left processes of the stack running"
    assert mentioning(stack.data_dir) == [], "a process naming the data dir is still running"
    assert _port_free(stack.https_port)
    assert not (stack.data_dir / "run" / "supervisor.pid").exists()
    after = stack.run("status")
    assert after.returncode == 3 and "not running" in after.stdout


def _no_acknowledged_metric_lost(stack: CliStack, run_id: str, written: list[object]) -> None:
    result = written[0]
    stored = _stored_steps(stack, run_id)
    lost = result.acked - stored  # type: ignore[attr-defined]
    print(f"acknowledged {len(result.acked)} steps, stored {len(stored)}, lost {len(lost)}, "  # type: ignore[attr-defined]
          f"failed calls {len(result.failed)}")  # type: ignore[attr-defined]
    assert result.acked, "the client logged nothing"  # type: ignore[attr-defined]
    assert lost == set()


# --- status and /health -----------------------------------------------------------------------


def test_status_names_each_healthy_component(stack: CliStack) -> None:
    result = stack.run("status")
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("tracking", "gateway", "nginx"):
        assert any(line.split()[:1] == [name] and line.endswith("ok")
                   for line in result.stdout.splitlines()), result.stdout
    assert _health(stack) == 200


def test_a_stopped_gateway_makes_status_and_health_fail(stack: CliStack) -> None:
    gateway = _state(stack)["gateway"]["pid"]
    assert isinstance(gateway, int)
    group = processes.group_members(gateway)
    for p in group:  # frozen, not dead: the supervisor does not restart it
        os.kill(p.pid, signal.SIGSTOP)
    try:
        result = stack.run("status")
        assert result.returncode == 1, result.stdout
        assert "gateway" in result.stdout and "DOWN" in result.stdout
        assert _health(stack) >= 500
    finally:
        for p in group:
            os.kill(p.pid, signal.SIGCONT)
    assert wait_until(lambda: _healthy(stack), 30)


def test_an_htpasswd_that_is_not_utf8_makes_status_and_health_fail(stack: CliStack) -> None:
    htpasswd = stack.data_dir / "htpasswd"
    good = htpasswd.read_bytes()
    st = htpasswd.stat()
    htpasswd.write_bytes(good + b"caf\xe9:$2b$12$" + b"x" * 53 + b"\n")
    try:
        result = stack.run("status")
        assert result.returncode == 1, result.stdout
        assert "not valid UTF-8" in result.stdout
        assert _health(stack) == 500
    finally:
        htpasswd.write_bytes(good)
        os.chown(htpasswd, st.st_uid, st.st_gid)
    assert wait_until(lambda: _healthy(stack), 30)


# --- kills ------------------------------------------------------------------------------------


def test_sigkill_of_the_supervisor_leaves_nothing_and_loses_nothing(
    stack: CliStack, work: Path
) -> None:
    run_id = _new_run(stack, "supervisor-killed")
    snapshot = session_of(stack.supervisor_pid())
    assert len(snapshot) >= 6  # supervisor, 2 gunicorn masters + workers, nginx master + workers
    with writing_client(stack, run_id, work) as written:
        time.sleep(3)
        kill(stack.supervisor_pid())
        status = stack.run("status")
        assert status.returncode == 3, status.stdout
        assert "not running" in status.stdout
        _down_leaves_nothing(stack, snapshot)
        again = stack.up()
        assert "already running" not in again.stdout
        time.sleep(3)
    _no_acknowledged_metric_lost(stack, run_id, written)


def test_without_down_the_children_of_a_killed_supervisor_stop_by_themselves(
    stack: CliStack,
) -> None:
    snapshot = session_of(stack.supervisor_pid())
    kill(stack.supervisor_pid())
    started = time.monotonic()
    # The parent-death signal: gunicorn stops gracefully, nginx fast.
    assert wait_until(lambda: not still_alive(snapshot), 40), still_alive(snapshot)
    print(f"children gone {time.monotonic() - started:.1f} s after the supervisor's SIGKILL")
    assert _port_free(stack.https_port)
    stack.run("down")
    stack.up()


def test_up_right_after_a_killed_supervisor_stops_what_is_left_and_starts(
    stack: CliStack,
) -> None:
    snapshot = session_of(stack.supervisor_pid())
    kill(stack.supervisor_pid())
    again = stack.up()  # no `down` first
    assert "already running" not in again.stdout
    assert still_alive(snapshot) == []
    print(f"up after the SIGKILL: {again.stderr.strip().splitlines()[-1]}")
    assert _healthy(stack)


@pytest.mark.parametrize("component", ["nginx", "tracking"])
def test_sigkill_of_a_master_leaves_no_orphan_holding_ports_and_loses_nothing(
    stack: CliStack, work: Path, component: str
) -> None:
    run_id = _new_run(stack, f"{component}-killed")
    master = _state(stack)[component]["pid"]
    assert isinstance(master, int)
    orphans = [p for p in processes.group_members(master) if p.pid != master]
    assert orphans, f"{component} has workers"
    with writing_client(stack, run_id, work) as written:
        time.sleep(3)
        killed = time.monotonic()
        kill(master)
        # The supervisor stops the orphaned workers, then restarts the master (1 s backoff).
        assert wait_until(lambda: not still_alive(orphans), 15), still_alive(orphans)
        assert wait_until(lambda: _healthy(stack), 60), stack.run("status").stdout
        print(f"{component}: orphans gone and healthy again "
              f"{time.monotonic() - killed:.1f} s after the SIGKILL")
        restarted = _state(stack)[component]
        assert restarted["pid"] != master and restarted["restarts"] == 1
        snapshot = session_of(stack.supervisor_pid())
        _down_leaves_nothing(stack, snapshot)
        stack.up()
        time.sleep(3)
    _no_acknowledged_metric_lost(stack, run_id, written)


# --- two data dirs ----------------------------------------------------------------------------


def _copy_data_dir(source: Path, target: Path) -> None:
    def no_sockets(directory: str, names: list[str]) -> list[str]:
        return [n for n in names if stat.S_ISSOCK(os.lstat(os.path.join(directory, n)).st_mode)]

    shutil.copytree(source, target, symlinks=True, ignore=no_sockets)


def test_a_copy_of_a_running_data_dir_is_a_stack_of_its_own(stack: CliStack) -> None:
    original = stack.supervisor_pid()
    copy = CliStack.new(stack.data_dir.parent / "copy")
    _copy_data_dir(stack.data_dir, copy.data_dir)
    copy.password = stack.password
    assert copy.run("status").returncode == 3  # the copied PID file is not the copy's
    assert copy.run("down").stdout.strip() == "trackgate was not running"
    assert processes.is_same(original, processes.info(original).start)  # type: ignore[union-attr]
    started = copy.run("up")
    try:
        assert started.returncode == 0, started.stdout + started.stderr
        assert "already running" not in started.stdout
        assert copy.supervisor_pid() != original
        assert _healthy(copy)
    finally:
        down = copy.run("down")
    assert down.returncode == 0 and "stopped" in down.stdout
    assert stack.supervisor_pid() == original and _healthy(stack)
    assert mentioning(copy.data_dir) == []


# --- backoff ----------------------------------------------------------------------------------


def test_backoff_grows_while_a_child_keeps_dying_and_resets_after_a_stable_period() -> None:
    failures, delays = 0, []
    for _ in range(8):
        delay, failures = next_delay(failures, ran_for=0.5)
        delays.append(delay)
    assert delays == [1, 2, 4, 8, 16, MAX_DELAY, MAX_DELAY, MAX_DELAY]
    delay, failures = next_delay(failures, ran_for=STABLE_AFTER + 1)
    assert (delay, failures) == (1, 1)
