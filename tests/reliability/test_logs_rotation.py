"""Log rotation of `trackgate up` (issue 13): rename + reopen while clients keep sending, by
`trackgate logs rotate` and by size (TRACKGATE_LOG_MAX_BYTES), loses no line: every request
sent has its line in nginx's and gunicorn's access logs, across the rotated files."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests
from trackgate.local.supervisor import shift

from .supervision import CliStack, running_cli_stack

pytestmark = pytest.mark.reliability

WRITERS = 4
SECONDS = 12.0


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[CliStack]:
    # Small enough that the supervisor also rotates by size during the test; many copies kept,
    # so every line can be counted afterwards.
    with running_cli_stack(tmp_path_factory, "logs", TRACKGATE_LOG_MAX_BYTES="150000",
                           TRACKGATE_LOG_KEEP="60") as running:
        yield running


def _lines_with(logs: Path, name: str, marker: str) -> tuple[int, int]:
    """(lines naming `marker` in NAME and its rotated copies, how many files that was)."""
    files = [p for p in logs.iterdir() if p.name == name or p.name.startswith(name + ".")]
    count = sum(p.read_text(errors="replace").count(marker) for p in files)
    return count, len(files)


def test_rotation_under_load_loses_no_line(stack: CliStack) -> None:
    logs = stack.data_dir / "logs"
    marker = f"rot{int(time.time())}"
    ca = str(stack.data_dir / "tls" / "ca.pem")
    sent = [0] * WRITERS
    errors: list[str] = []
    stop = threading.Event()

    def write(n: int) -> None:
        with requests.Session() as session:
            session.auth = ("admin", stack.password)
            i = 0
            while not stop.is_set():
                url = f"{stack.url}/version?m={marker}-{n}-{i}"
                response = session.get(url, verify=ca, timeout=30)
                if response.status_code != 200:
                    errors.append(f"{response.status_code} {response.text[:100]}")
                sent[n] += 1
                i += 1

    threads = [threading.Thread(target=write, args=(n,)) for n in range(WRITERS)]
    for t in threads:
        t.start()
    rotated = 0
    try:
        deadline = time.monotonic() + SECONDS
        while time.monotonic() < deadline:
            time.sleep(2.0)
            result = stack.run("logs", "rotate")
            assert result.returncode == 0, result.stderr
            rotated += 1
    finally:
        stop.set()
        for t in threads:
            t.join()
    time.sleep(2)  # the last lines reach the files (nginx and gunicorn write per request)
    total = sum(sent)
    nginx_lines, nginx_files = _lines_with(logs, "nginx-access.log", marker)
    gunicorn_lines, gunicorn_files = _lines_with(logs, "tracking-access.log", marker)
    print(f"{total} requests during {rotated} `logs rotate` calls (plus rotations by size); "
          f"nginx access lines {nginx_lines} in {nginx_files} files, gunicorn access lines "
          f"{gunicorn_lines} in {gunicorn_files} files")
    assert errors == []
    assert total > 100
    assert nginx_lines == total and gunicorn_lines == total
    assert nginx_files > rotated and gunicorn_files > rotated
    # Our own logs were reopened too: the supervisor wrote into its new file.
    assert "rotated the logs" in (logs / "supervisor.log").read_text()


def test_logs_rotate_without_a_running_stack_is_one_clear_line(tmp_path: Path) -> None:
    stopped = CliStack.new(tmp_path / "data")
    result = stopped.run("logs", "rotate")
    assert result.returncode == 1 and "not running" in result.stderr
    assert "Traceback" not in result.stderr


def test_shift_keeps_the_newest_copies_only(tmp_path: Path) -> None:
    log = tmp_path / "x.log"
    for n in range(4):
        log.write_text(f"generation {n}\n")
        shift(log, keep=2)
    assert not log.exists()
    assert (tmp_path / "x.log.1").read_text() == "generation 3\n"
    assert (tmp_path / "x.log.2").read_text() == "generation 2\n"
    assert not (tmp_path / "x.log.3").exists()
