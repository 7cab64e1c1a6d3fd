"""Helpers for the supervisor tests: a stack started with the real CLI, the processes of a data
dir as /proc shows them, and a client that keeps logging metrics and says which were
acknowledged."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from trackgate import processes

from ..support import clean_env, free_port, trackgate

PASSWORD = re.compile(r"Created user 'admin' with password: (\S+)")


@dataclass
class CliStack:
    """A stack run by `trackgate up/status/down` as an operator would, in its own data dir."""

    data_dir: Path
    env: dict[str, str]
    flags: list[str]
    password: str = ""
    log: list[str] = field(default_factory=list)

    @classmethod
    def new(cls, data_dir: Path, **extra_env: str) -> CliStack:
        env = {"TRACKGATE_DATA_DIR": str(data_dir), "TRACKGATE_LISTEN_ADDRESS": "127.0.0.1",
               **extra_env}
        flags = ["--http-port", str(free_port()), "--https-port", str(free_port()),
                 "--hostname", "localhost"]
        return cls(data_dir, env, flags)

    @property
    def https_port(self) -> int:
        return int(self.flags[3])

    @property
    def url(self) -> str:
        return f"https://localhost:{self.https_port}"

    def run(self, *args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
        flags = self.flags if args[0] in ("up", "status") else []
        started = time.monotonic()
        result = trackgate(*args, *flags, env=self.env, timeout=timeout)
        self.log.append(f"{' '.join(args)}: exit {result.returncode} in "
                        f"{time.monotonic() - started:.1f} s")
        return result

    def up(self) -> subprocess.CompletedProcess[str]:
        result = self.run("up")
        assert result.returncode == 0, result.stdout + result.stderr + self.logs_tail()
        found = PASSWORD.search(result.stdout)
        if found:
            self.password = found.group(1)
        return result

    def client_env(self) -> dict[str, str]:
        return {
            "MLFLOW_TRACKING_URI": self.url,
            "MLFLOW_TRACKING_USERNAME": "admin",
            "MLFLOW_TRACKING_PASSWORD": self.password,
            "MLFLOW_TRACKING_SERVER_CERT_PATH": str(self.data_dir / "tls" / "ca.pem"),
        }

    def supervisor_pid(self) -> int:
        return int((self.data_dir / "run" / "supervisor.pid").read_text())

    def logs_tail(self) -> str:
        out = []
        logs = self.data_dir / "logs"
        if logs.is_dir():
            for path in sorted(logs.iterdir()):
                lines = path.read_text(errors="replace").splitlines()[-15:]
                out.append(f"\n==> {path.name} <==\n" + "\n".join(lines))
        return "".join(out)


def mentioning(directory: Path) -> list[int]:
    """Live processes whose command line names the data dir (checking only: the product
    never finds its processes this way)."""
    text = str(directory)
    return [p.pid for p in processes.all_infos() if text in processes.cmdline(p.pid)]


def session_of(pid: int) -> list[processes.ProcInfo]:
    """Every process in the session `pid` leads (supervisor, servers, their workers)."""
    leader = processes.info(pid)
    assert leader is not None
    return processes.session_members(pid, started_after=leader.start)


def still_alive(snapshot: list[processes.ProcInfo]) -> list[processes.ProcInfo]:
    return [p for p in snapshot if processes.is_same(p.pid, p.start)]


def wait_until(predicate: object, timeout: float, step: float = 0.25) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():  # type: ignore[operator]
            return True
        time.sleep(step)
    return False


def kill(pid: int) -> None:
    os.kill(pid, signal.SIGKILL)


WRITER = """
import pathlib, sys, time
from mlflow import MlflowClient
client = MlflowClient()
run_id, stop = sys.argv[1], pathlib.Path(sys.argv[2])
step = 0
while not stop.exists():
    try:
        client.log_metric(run_id, "m", float(step), step=step)
        print("ack", step, flush=True)
    except Exception as exc:
        print("fail", step, type(exc).__name__, str(exc)[:200].replace("\\n", " "), flush=True)
    step += 1
    time.sleep(0.05)
"""


@dataclass
class Written:
    acked: set[int]
    failed: list[str]


@contextmanager
def writing_client(stack: CliStack, run_id: str, work: Path) -> Iterator[list[Written]]:
    """A training script logging metric steps through the proxy until the block ends; yields
    a list that then holds what it reports (acknowledged steps, failed calls)."""
    stop = work / f"stop-{run_id}"
    stop.unlink(missing_ok=True)
    env = clean_env(**stack.client_env(), MLFLOW_HTTP_REQUEST_MAX_RETRIES="6",
                    MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR="1", MLFLOW_HTTP_REQUEST_TIMEOUT="30")
    proc = subprocess.Popen([sys.executable, "-c", WRITER, run_id, str(stop)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=work)
    result: list[Written] = []
    try:
        yield result
    finally:
        stop.write_text("")
        try:
            out, err = proc.communicate(timeout=240)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
    acked = {int(line.split()[1]) for line in out.splitlines() if line.startswith("ack ")}
    failed = [line for line in out.splitlines() if line.startswith("fail ")]
    assert proc.returncode == 0, err[-2000:]
    result.append(Written(acked, failed))


@contextmanager
def running_cli_stack(tmp_path_factory: pytest.TempPathFactory, name: str,
                      **extra_env: str) -> Iterator[CliStack]:
    """`trackgate up` in a data dir of its own (a module's stack), `down` and its log at the end."""
    root = tmp_path_factory.mktemp(name)
    os.chmod(root, 0o711)  # as root, the service account passes through to the data dir
    running = CliStack.new(root / "data", **extra_env)
    running.up()
    try:
        yield running
    finally:
        running.run("down")
        print("\n".join(running.log))
