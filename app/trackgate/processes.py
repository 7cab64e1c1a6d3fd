"""Process and port facts, asked one way each: liveness, ports, die-with-parent, and which
processes belong to one data dir.

A PID alone proves nothing: it is reused, and a copied data dir holds the same PID files as the
original. A process is taken for ours only when its PID, its start time (clock ticks since boot,
/proc/PID/stat field 22) and its command line (which names the data dir) all match; the
processes a dead supervisor left behind are found by its session, whose id the kernel does not
hand out again while any member lives.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass
from pathlib import Path


def pid_alive(pid: int) -> bool:
    """True if a process with this PID exists (even one we may not signal)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def port_in_use(host: str, port: int) -> bool:
    """True if something already listens on host:port (we could not bind it)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return True
    return False


def any_free_port(host: str = "127.0.0.1") -> int:
    """A port the OS says is free right now."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def die_with_parent() -> None:
    """In a child (preexec_fn): get SIGTERM when the parent dies, even by SIGKILL (Linux
    prctl), so no orphan keeps a port."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL("libc.so.6").prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


# --- the processes of one data dir (/proc) ------------------------------------------------

_PROC = Path("/proc")


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    session: int
    start: int  # clock ticks after boot
    zombie: bool


def info(pid: int) -> ProcInfo | None:
    """What /proc/PID/stat says, or None if there is no such process."""
    try:
        raw = (_PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    fields = raw[raw.rindex(")") + 2 :].split()
    return ProcInfo(
        pid=pid,
        ppid=int(fields[1]),
        pgid=int(fields[2]),
        session=int(fields[3]),
        start=int(fields[19]),
        zombie=fields[0] in ("Z", "X"),
    )


def start_time(pid: int) -> int | None:
    found = info(pid)
    return None if found is None or found.zombie else found.start


def cmdline(pid: int) -> str:
    """The command line, arguments joined by spaces ('' if gone or unreadable)."""
    try:
        raw = (_PROC / str(pid) / "cmdline").read_bytes()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return ""
    return raw.replace(b"\0", b" ").decode(errors="replace").strip()


def names_dir(pid: int, directory: Path) -> bool:
    """True if the process's command line names `directory` (as given or resolved)."""
    line = f" {cmdline(pid)} "
    spellings = {str(directory), str(directory.resolve())}
    return any(f" {s} " in line or f" {s}/" in line or f"={s} " in line for s in spellings)


def is_same(pid: int, start: int | None) -> bool:
    """The process `pid` is alive and is the one that started at `start`."""
    return start is not None and start_time(pid) == start


def all_infos() -> list[ProcInfo]:
    found = []
    for entry in _PROC.iterdir():
        if entry.name.isdigit():
            one = info(int(entry.name))
            if one is not None and not one.zombie:
                found.append(one)
    return found


def session_members(session: int, *, started_after: int) -> list[ProcInfo]:
    """Live processes of a session that started no earlier than its leader did."""
    return [p for p in all_infos() if p.session == session and p.start >= started_after]


def group_members(pgid: int) -> list[ProcInfo]:
    return [p for p in all_infos() if p.pgid == pgid]


def signal_group(pgid: int, signum: int) -> bool:
    """Signal a process group; False if it has no member left."""
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_pid(pid: int, signum: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, signum)


def reap(pid: int) -> None:
    """Collect `pid` if it is our child (a zombie of ours would look alive to kill(0))."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def terminate(procs: list[ProcInfo], timeout: float, signum: int = signal.SIGTERM) -> None:
    """Ask each process to stop, wait up to `timeout`, then SIGKILL whoever is left (each
    checked by PID and start time, so a reused PID is never hit)."""
    for p in procs:
        if is_same(p.pid, p.start):
            signal_pid(p.pid, signum)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for p in procs:
            reap(p.pid)
        if not any(is_same(p.pid, p.start) for p in procs):
            return
        time.sleep(0.1)
    for p in procs:
        if is_same(p.pid, p.start):
            signal_pid(p.pid, signal.SIGKILL)
            reap(p.pid)
