"""More tracking servers for a running stack, as other hosts would run them: `trackgate serve
tracking` with the stack's settings on a port of its own, as the service account, in a session of
its own (so a test can kill the whole server at once, as if its host died)."""

from __future__ import annotations

import os
import pwd
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import requests
from trackgate.settings import Settings

from ..support import clean_env

START_TIMEOUT = 90.0


@dataclass
class TrackingServer:
    port: int
    logs: Path
    proc: subprocess.Popen[bytes] | None = None  # None: the stack's own (its supervisor's)

    def access_log(self) -> str:
        path = self.logs / "tracking-access.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def kill(self) -> None:
        """SIGKILL the whole server (master and workers)."""
        assert self.proc is not None
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            self.proc.wait(timeout=40)


def start_tracking_server(settings: Settings, port: int, logs: Path) -> TrackingServer:
    """Start one more server with SETTINGS on PORT (logs in LOGS); returns once /health is OK."""
    account = pwd.getpwnam(settings.service_user) if os.geteuid() == 0 else None
    logs.mkdir(parents=True, exist_ok=True)
    prefix: list[str] = []
    if account is not None:
        os.chown(logs, account.pw_uid, account.pw_gid)
        prefix = ["setpriv", f"--reuid={account.pw_uid}", f"--regid={account.pw_gid}",
                  "--clear-groups"]
    env = clean_env(**{**settings.to_env(), "TRACKGATE_TRACKING_PORT": str(port),
                       "TRACKGATE_LOG_DIR": str(logs)})
    with open(logs / "stderr", "wb") as err:
        proc = subprocess.Popen([*prefix, sys.executable, "-m", "trackgate", "serve", "tracking"],
                                env=env, cwd="/", start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=err)
    server = TrackingServer(port, logs, proc)
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"tracking server on {port} exited ({proc.returncode}):\n"
                               + (logs / "stderr").read_text(errors="replace")[-3000:])
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return server
        except requests.RequestException:
            pass
        time.sleep(0.3)
    server.stop()
    raise RuntimeError(f"tracking server on {port} did not answer in {START_TIMEOUT:.0f} s")
