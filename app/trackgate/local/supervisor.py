"""A small process supervisor for `trackgate up`: runs tracking, gateway and nginx, restarts
any that dies (with backoff), and stops them all on SIGTERM. systemd and compose do this job
on servers; this is for one machine without them.
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
from typing import IO

from .. import accounts, nginx
from ..accounts import Account
from ..settings import Settings

STOP_TIMEOUT = 20.0


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path | None
    # Started as root: the account to run as (nginx instead drops privileges itself, after its
    # master has bound the ports and read the key).
    account: Account | None = None
    proc: subprocess.Popen[bytes] | None = None
    restarts: int = 0
    next_start: float = 0.0
    _log_file: IO[bytes] | None = field(default=None, repr=False)

    def start(self, env: dict[str, str]) -> None:
        if self._log_file is None and self.log is not None:
            self._log_file = open(self.log, "ab")  # noqa: SIM115 - kept open for restarts
        out = self._log_file if self._log_file is not None else None
        extra = self.account.popen_kwargs() if self.account is not None else {}
        self.proc = subprocess.Popen(self.argv, env=env, stdout=out, stderr=subprocess.STDOUT,
                                     **extra)

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


def children(settings: Settings, nginx_binary: str) -> list[Child]:
    python = [sys.executable, "-m", "trackgate"]
    logs = settings.logs

    def log(name: str) -> Path | None:
        return logs / f"{name}.out" if logs else None

    account = accounts.lookup(settings.service_user) if accounts.running_as_root() else None
    if accounts.running_as_root() and account is None:
        raise accounts.AccountError(f"no account {settings.service_user!r}: run `trackgate up`")
    return [
        Child("tracking", [*python, "serve", "tracking"], log("tracking"), account),
        Child("gateway", [*python, "serve", "gateway"], log("gateway"), account),
        Child("nginx", nginx.foreground_argv(settings, nginx_binary), log("nginx")),
    ]


def state_file(settings: Settings) -> Path:
    return settings.run_dir / "supervisor.json"


def supervise(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    env = {**os.environ, **settings.to_env()}
    if accounts.running_as_root():  # the servers' HOME: their own data dir, never root's
        env["HOME"] = str(settings.data_dir)
    procs = children(settings, nginx.find_binary(settings))
    stopping = False

    def request_stop(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, request_stop)
    signal.signal(signal.SIGINT, request_stop)
    for child in procs:
        child.start(env)
    _write_state(settings, procs)
    while not stopping:
        time.sleep(0.5)
        for child in procs:
            if stopping or child.alive():
                continue
            now = time.monotonic()
            if child.next_start == 0.0:
                code = child.proc.returncode if child.proc else None
                delay = min(30.0, 2.0 ** min(child.restarts, 5))
                _say(f"{child.name} exited with {code}; restarting in {delay:.0f} s")
                child.next_start = now + delay
            elif now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                child.start(env)
                _write_state(settings, procs)
    _stop_all(procs)
    state_file(settings).unlink(missing_ok=True)
    return 0


def _stop_all(procs: list[Child]) -> None:
    # nginx first, so no new request reaches a server that is going away.
    for child in reversed(procs):
        if child.alive():
            assert child.proc is not None
            child.proc.send_signal(signal.SIGQUIT if child.name == "nginx" else signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for child in procs:
        if child.proc is None:
            continue
        try:
            child.proc.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.proc.kill()
            child.proc.wait()


def _write_state(settings: Settings, procs: list[Child]) -> None:
    state = {c.name: {"pid": c.proc.pid if c.proc else None, "restarts": c.restarts} for c in procs}
    tmp = state_file(settings).with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_file(settings))


def _say(message: str) -> None:
    print(f"[supervisor {time.strftime('%H:%M:%S')}] {message}", flush=True)
