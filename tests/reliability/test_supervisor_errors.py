"""Bad inputs to `trackgate up` (issue 13): each is one clear line (no traceback), quickly,
and leaves nothing running."""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..support import free_port, trackgate
from .supervision import CliStack, mentioning

pytestmark = pytest.mark.reliability

NOBODY = 65534


def _one_clear_error(result: object, *needles: str) -> str:
    stderr: str = result.stderr  # type: ignore[attr-defined]
    assert result.returncode == 1, stderr  # type: ignore[attr-defined]
    assert "Traceback" not in stderr
    errors = [line for line in stderr.splitlines() if line.startswith("trackgate: error:")]
    assert len(errors) == 1, stderr
    for needle in needles:
        assert needle in errors[0], errors[0]
    return errors[0]


def _nothing_running(data: Path) -> None:
    assert not (data / "run" / "supervisor.pid").exists()
    assert mentioning(data) == []


def test_an_htpasswd_that_is_not_utf8_stops_up_with_one_line(tmp_path: Path) -> None:
    stack = CliStack.new(tmp_path / "data")
    stack.data_dir.mkdir()
    (stack.data_dir / "htpasswd").write_bytes(b"admin:$2b$12$" + b"a" * 53 + b"\nj\xf6rg:x\n")
    result = stack.run("up")
    _one_clear_error(result, "htpasswd line 2 is not valid UTF-8")
    _nothing_running(stack.data_dir)


@pytest.fixture
def roots_dir() -> Iterator[Path]:
    """A data dir that belongs to root, under a directory every account may pass."""
    base = Path(tempfile.mkdtemp(prefix="trackgate-ro-"))
    os.chmod(base, 0o755)
    data = base / "data"
    data.mkdir(mode=0o755)
    yield data
    shutil.rmtree(base, ignore_errors=True)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run as another account")
def test_a_read_only_data_dir_stops_up_with_one_line(roots_dir: Path) -> None:
    env = {"TRACKGATE_DATA_DIR": str(roots_dir), "HOME": str(roots_dir)}
    flags = ["--http-port", str(free_port()), "--https-port", str(free_port())]
    result = trackgate("up", *flags, env=env, user=NOBODY)
    _one_clear_error(result, f"the data dir {roots_dir} is not writable", "--data-dir")
    assert list(roots_dir.iterdir()) == []  # nothing written, nothing running
    _nothing_running(roots_dir)


@pytest.fixture
def read_only_mount(tmp_path: Path) -> Iterator[Path]:
    """A read-only file system (tmpfs mounted ro): even root cannot write there."""
    point = tmp_path / "ro"
    point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(point)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a read-only tmpfs here: {mounted.stderr.strip()}")
    try:
        yield point
    finally:
        subprocess.run(["umount", str(point)], check=True)


def test_a_data_dir_on_a_read_only_file_system_stops_up_with_one_line(
    read_only_mount: Path,
) -> None:
    stack = CliStack.new(read_only_mount)
    result = stack.run("up")
    _one_clear_error(result, f"the data dir {read_only_mount} is not writable")
    _nothing_running(read_only_mount)


@pytest.mark.parametrize("tcp", [False, True], ids=["public", "internal"])
def test_the_same_port_for_two_servers_is_refused_at_once(tmp_path: Path, tcp: bool) -> None:
    port = free_port()
    if tcp:
        env = {"TRACKGATE_INTERNAL_TRANSPORT": "tcp", "TRACKGATE_TRACKING_PORT": str(port),
               "TRACKGATE_GATEWAY_PORT": str(port)}
        flags = ["--http-port", str(free_port()), "--https-port", str(free_port())]
        needles = ("TRACKGATE_TRACKING_PORT", "TRACKGATE_GATEWAY_PORT")
    else:
        env, flags = {}, ["--http-port", str(port), "--https-port", str(port)]
        needles = ("--https-port", "--http-port")
    started = time.monotonic()
    result = trackgate("up", *flags, env={"TRACKGATE_DATA_DIR": str(tmp_path / "d"), **env})
    took = time.monotonic() - started
    _one_clear_error(result, f"port {port} is given twice", *needles)
    assert took < 15, f"took {took:.1f} s"
    _nothing_running(tmp_path / "d")


def test_a_port_in_use_names_only_flags_up_has(tmp_path: Path) -> None:
    up_help = trackgate("up", "--help").stdout
    with socket.socket() as blocker:
        blocker.bind(("127.0.0.1", 0))
        blocker.listen()
        taken = blocker.getsockname()[1]
        result = trackgate(
            "up", "--http-port", str(free_port()), "--https-port", str(free_port()),
            env={"TRACKGATE_DATA_DIR": str(tmp_path / "d"), "TRACKGATE_INTERNAL_TRANSPORT": "tcp",
                 "TRACKGATE_TRACKING_PORT": str(taken), "TRACKGATE_GATEWAY_PORT": str(free_port())},
        )
    line = _one_clear_error(result, f"port {taken}", "TRACKGATE_TRACKING_PORT")
    flags = re.findall(r"--[a-z][a-z-]+", line)
    assert all(flag in up_help for flag in flags), (flags, line)
    assert "--tracking-port" not in line
    _nothing_running(tmp_path / "d")
