"""A small process supervisor for `trackgate up`: runs tracking, gateway and nginx, restarts
any that dies (with backoff), rotates their logs, and stops them all on SIGTERM. systemd and
compose do this job on servers; this is for one machine without them.

Why our own and not supervisord: what the kill tests need is small and Linux-specific, and
supervisord would still need all of it from us. (1) A SIGKILLed supervisor must leave nothing:
every child gets PR_SET_PDEATHSIG, and all of them stay in the supervisor's session, so `down`
finds leftovers by session id (checked against the supervisor's start time), never by name.
supervisord has no parent-death signal and would itself need a PID file tied to the data dir.
(2) Orphaned nginx or gunicorn workers must never keep a port: each child leads its own process
group, and when a child dies its whole group (the orphans) is stopped before the restart;
supervisord's `killasgroup` only applies when it stops a program, not when the master dies.
(3) Logs rotate without losing a line: children write their stdout into pipes we read, so we
reopen those files ourselves; nginx and gunicorn reopen theirs on USR1 after a rename.
(4) Backoff resets after a stable period. That is about 300 lines we test against real stacks,
against a second daemon with its own config, socket and log handling to secure.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

from .. import accounts, nginx, processes
from ..accounts import Account
from ..processes import die_with_parent
from ..server.uploads import sweep_orphans
from ..settings import Settings

STOP_TIMEOUT = 20.0
# A child that ran this long before it died was healthy: its next restart waits 1 s again.
STABLE_AFTER = 60.0
MAX_DELAY = 30.0
# How long orphans of a dead child (nginx or gunicorn workers) get to stop before SIGKILL.
ORPHAN_TIMEOUT = 5.0
# How often log sizes are compared with log_max_bytes.
LOG_CHECK_INTERVAL = 2.0


def next_delay(failures: int, ran_for: float) -> tuple[float, int]:
    """(seconds to wait before the restart, consecutive failures after this one).

    1, 2, 4 ... 30 s for a child that keeps dying at once; a child that had run for
    STABLE_AFTER seconds starts again from 1 s (issue 13: the delay used to stay at 30 s)."""
    if ran_for >= STABLE_AFTER:
        failures = 0
    return min(MAX_DELAY, 2.0 ** min(failures, 5)), failures + 1


@dataclass
class Child:
    name: str
    argv: list[str]
    log: Path | None
    # Started as root: the account to run as (nginx instead drops privileges itself, after its
    # master has bound the ports and read the key).
    account: Account | None = None
    # The signal that makes this child reopen its own log files after a rename.
    reopen_signal: int | None = signal.SIGUSR1
    proc: subprocess.Popen[bytes] | None = None
    start: int | None = None  # /proc start time of proc
    started_at: float = 0.0
    restarts: int = 0
    failures: int = 0
    next_start: float = 0.0
    _log_file: IO[bytes] | None = field(default=None, repr=False)
    _pipe: int | None = field(default=None, repr=False)

    def start_process(self, env: dict[str, str]) -> None:
        if self._log_file is None and self.log is not None:
            self._log_file = open(self.log, "ab")  # noqa: SIM115 - kept open for restarts
        extra = self.account.popen_kwargs() if self.account is not None else {}
        parent = os.getpid()

        def tie_to_supervisor() -> None:
            # Runs after the switch to the account (a credential change clears the setting).
            die_with_parent()
            if os.getppid() != parent:  # the supervisor died before prctl: do not linger
                os.kill(os.getpid(), signal.SIGTERM)

        read_end, write_end = os.pipe() if self._log_file is not None else (None, None)
        try:
            self.proc = subprocess.Popen(
                self.argv,
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=write_end,
                stderr=subprocess.STDOUT if write_end is not None else None,
                process_group=0,  # its own group: its orphans can be stopped together
                preexec_fn=tie_to_supervisor,
                **extra,
            )
        finally:
            if write_end is not None:
                os.close(write_end)
        self._close_pipe()
        self._pipe = read_end
        if read_end is not None:
            os.set_blocking(read_end, False)
        self.start = processes.start_time(self.proc.pid)
        self.started_at = time.monotonic()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def pipe(self) -> int | None:
        return self._pipe

    def drain(self) -> None:
        """Copy what the child wrote to its log file (non-blocking)."""
        if self._pipe is None:
            return
        while True:
            try:
                data = os.read(self._pipe, 65536)
            except BlockingIOError:
                return
            if not data:
                self._close_pipe()
                return
            if self._log_file is not None:
                self._log_file.write(data)
                self._log_file.flush()

    def reopen_log(self) -> None:
        if self._log_file is not None and self.log is not None:
            self._log_file.close()
            self._log_file = open(self.log, "ab")  # noqa: SIM115 - kept open for restarts

    def _close_pipe(self) -> None:
        if self._pipe is not None:
            os.close(self._pipe)
            self._pipe = None

    def stop_orphans(self) -> None:
        """Stop what is left of this child's process group after its leader died: orphaned
        nginx workers or gunicorn workers would otherwise keep the ports and sockets."""
        if self.proc is None:
            return
        left = [p for p in processes.group_members(self.proc.pid) if self.start is None
                or p.start >= self.start]
        if left:
            _say(f"{self.name}: stopping {len(left)} orphaned process(es) of its group")
            processes.terminate(left, ORPHAN_TIMEOUT)


def children(settings: Settings, nginx_binary: str) -> list[Child]:
    # The data dir on every command line: `down` and the tests can tell whose process it is.
    python = [sys.executable, "-m", "trackgate"]
    where = ["--data-dir", str(settings.data_dir)]
    logs = settings.logs

    def log(name: str) -> Path | None:
        return logs / f"{name}.out" if logs else None

    account = accounts.lookup(settings.service_user) if accounts.running_as_root() else None
    if accounts.running_as_root() and account is None:
        raise accounts.AccountError(f"no account {settings.service_user!r}: run `trackgate up`")
    kids = [
        Child("tracking", [*python, "serve", "tracking", *where], log("tracking"), account),
        Child("gateway", [*python, "serve", "gateway", *where], log("gateway"), account),
        Child("nginx", nginx.foreground_argv(settings, nginx_binary), log("nginx")),
    ]
    exporter = nginx_exporter_binary() if settings.metrics else None
    if exporter:  # optional: without it, the nginx figures are the gateway's own
        argv = [*nginx_exporter_argv(settings, exporter), "--", *where]  # flags end at --
        kids.append(Child("nginx-exporter", argv, log("nginx-exporter"), account,
                          reopen_signal=None))
    return kids


def nginx_exporter_binary() -> str | None:
    """Debian's prometheus-nginx-exporter, if installed."""
    name = "prometheus-nginx-exporter"
    return shutil.which(name) or shutil.which(name, path="/usr/bin:/usr/sbin")


def nginx_exporter_argv(settings: Settings, binary: str) -> list[str]:
    """The exporter on nginx's stub_status (on the metrics listener). It exits at once when
    nginx is not up yet, so it retries while nginx starts."""
    host = settings.metrics_address
    host = f"[{host}]" if ":" in host else host
    return [binary, f"-nginx.scrape-uri=http://{host}:{settings.metrics_port}/stub_status",
            f"-web.listen-address={host}:{settings.nginx_exporter_port}",
            "-nginx.retries=30", "-nginx.retry-interval=1s"]


def state_file(settings: Settings) -> Path:
    return settings.run_dir / "supervisor.json"


class _Requests:
    """What signals asked for, handled in the main loop (never inside a handler)."""

    def __init__(self) -> None:
        self.stop = False
        self.rotate = False

    def install(self) -> None:
        def stop(_signum: int, _frame: object) -> None:
            self.stop = True

        def rotate(_signum: int, _frame: object) -> None:
            self.rotate = True

        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
        signal.signal(signal.SIGUSR1, rotate)  # `trackgate logs rotate`
        signal.signal(signal.SIGPIPE, signal.SIG_IGN)


def supervise(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    env = {**os.environ, **settings.to_env()}
    if accounts.running_as_root():  # the servers' HOME: their own data dir, never root's
        env["HOME"] = str(settings.data_dir)
    kids = children(settings, nginx.find_binary(settings))
    asked = _Requests()
    asked.install()
    rotations = 0
    for child in kids:
        _before_start(settings, child)
        child.start_process(env)
    _write_state(settings, kids, rotations)
    next_log_check = time.monotonic() + LOG_CHECK_INTERVAL
    while not asked.stop:
        _wait_for_output(kids, 0.5)
        if asked.stop:
            break
        now = time.monotonic()
        if asked.rotate or (now >= next_log_check and _logs_too_big(settings)):
            asked.rotate = False
            rotate_logs(settings, kids)
            rotations += 1
            _write_state(settings, kids, rotations)
        if now >= next_log_check:
            next_log_check = now + LOG_CHECK_INTERVAL
        for child in kids:
            if asked.stop or child.alive():
                continue
            if child.next_start == 0.0:
                child.drain()
                child.stop_orphans()
                code = child.proc.returncode if child.proc else None
                delay, child.failures = next_delay(child.failures, now - child.started_at)
                _say(f"{child.name} exited with {code}; restarting in {delay:.0f} s")
                child.next_start = time.monotonic() + delay
                _write_state(settings, kids, rotations)
            elif now >= child.next_start:
                child.restarts += 1
                child.next_start = 0.0
                _before_start(settings, child)
                child.start_process(env)
                _write_state(settings, kids, rotations)
    _stop_all(kids)
    state_file(settings).unlink(missing_ok=True)
    return 0


def _before_start(settings: Settings, child: Child) -> None:
    """Before nginx starts (with the stack, or again after it died): remove the upload body
    files a killed nginx left (issue 18). No nginx runs at that moment (a dead one's orphaned
    workers were stopped when it died), so each file there is a dead nginx's, for an upload no
    client was told succeeded; left alone, they would fill the disk one killed nginx at a time."""
    directory = settings.nginx_upload_dir
    if child.name != "nginx" or directory is None:
        return
    try:
        files, size = sweep_orphans(directory)
    except OSError as exc:  # nginx then starts anyway: uploads still work
        _say(f"nginx: could not clear the upload files in {directory}: {exc}")
        return
    if files:
        _say(f"nginx: removed {files} upload file(s) a killed nginx left in {directory} "
             f"({size} bytes)")


def _wait_for_output(kids: list[Child], timeout: float) -> None:
    pipes = {child.pipe: child for child in kids if child.pipe is not None}
    if not pipes:
        time.sleep(timeout)
        return
    try:
        ready, _, _ = select.select(list(pipes), [], [], timeout)
    except InterruptedError:  # a signal: the loop looks at what it asked for
        return
    for fd in ready:
        pipes[fd].drain()


def _stop_all(kids: list[Child]) -> None:
    # nginx first, so no new request reaches a server that is going away.
    for child in reversed(kids):
        if child.alive():
            assert child.proc is not None
            child.proc.send_signal(signal.SIGQUIT if child.name == "nginx" else signal.SIGTERM)
    deadline = time.monotonic() + STOP_TIMEOUT
    for child in kids:
        if child.proc is None:
            continue
        while child.alive() and time.monotonic() < deadline:
            _wait_for_output(kids, 0.1)
        if child.alive():
            child.proc.kill()
            child.proc.wait()
        child.drain()
    for child in kids:
        child.stop_orphans()


# --- logs -------------------------------------------------------------------------------------


def _log_files(settings: Settings) -> list[Path]:
    """The live log files (not the rotated `.1`, `.2` ... copies)."""
    logs = settings.logs
    if logs is None or not logs.is_dir():
        return []
    return sorted(p for p in logs.iterdir() if p.suffix in (".log", ".out") and p.is_file())


def _logs_too_big(settings: Settings) -> bool:
    limit = settings.log_max_bytes
    if limit <= 0:
        return False
    for path in _log_files(settings):
        try:
            if path.stat().st_size > limit:
                return True
        except FileNotFoundError:
            continue
    return False


def shift(path: Path, keep: int) -> None:
    """path.(keep-1) -> path.keep ... path -> path.1; the oldest beyond `keep` is deleted.
    Renames keep the inode, so a writer that has not reopened yet loses nothing."""
    oldest = path.with_name(f"{path.name}.{keep}")
    oldest.unlink(missing_ok=True)
    for n in range(keep - 1, 0, -1):
        older = path.with_name(f"{path.name}.{n}")
        if older.exists():
            older.rename(path.with_name(f"{path.name}.{n + 1}"))
    if keep > 0:
        path.rename(path.with_name(f"{path.name}.1"))
    else:
        path.unlink()


def rotate_logs(settings: Settings, kids: list[Child]) -> None:
    """Rename every log, then have each writer reopen its path: we reopen the children's
    stdout logs and our own; nginx (USR1: its master reopens, then its workers) and gunicorn
    (USR1: master and workers) reopen theirs. Lines written before the reopen land in `.1`."""
    for path in _log_files(settings):
        try:
            shift(path, settings.log_keep)
        except FileNotFoundError:
            continue
    for child in kids:
        child.drain()
        child.reopen_log()
        if child.alive() and child.reopen_signal is not None:
            assert child.proc is not None
            child.proc.send_signal(child.reopen_signal)
    _reopen_own_output(settings)
    _say(f"rotated the logs in {settings.logs} (keeping {settings.log_keep})")


def _reopen_own_output(settings: Settings) -> None:
    """Our stdout/stderr is logs/supervisor.log when `up` started us: reopen it by path."""
    if settings.logs is None:
        return
    own = settings.logs / "supervisor.log"
    try:
        same = os.fstat(1).st_ino == os.stat(own).st_ino
    except OSError:
        same = False
    if same:
        return
    try:
        sys.stdout.flush()
        fd = os.open(own, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    except OSError:
        return
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


# --- state ------------------------------------------------------------------------------------


def _write_state(settings: Settings, kids: list[Child], rotations: int) -> None:
    state: dict[str, dict[str, object]] = {
        c.name: {
            "pid": c.proc.pid if c.proc else None,
            "start": c.start,
            "restarts": c.restarts,
            "restarting": c.next_start != 0.0,
        }
        for c in kids
    }
    state["supervisor"] = {
        "pid": os.getpid(),
        "start": processes.start_time(os.getpid()),
        "data_dir": str(settings.data_dir.resolve()),
        "log_rotations": rotations,
    }
    tmp = state_file(settings).with_suffix(".tmp")
    tmp.write_text(json.dumps(state))
    os.replace(tmp, state_file(settings))


def _say(message: str) -> None:
    print(f"[supervisor {time.strftime('%H:%M:%S')}] {message}", flush=True)

