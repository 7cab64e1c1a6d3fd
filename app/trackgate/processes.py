"""Process and port facts the local stack and serve-model both need, asked one way each."""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys


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
