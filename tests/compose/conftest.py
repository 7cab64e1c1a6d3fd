"""The compose tier: one compose project per backend (sqlite, PostgreSQL), images built once.

`stack` here shadows the root conftest's: tests in this directory (including the shared checks
imported into it) run against the containers, through nginx's published loopback port.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from ..infra.ready import BASE_IMAGE, ensure_docker
from ..support import free_port
from .harness import VARIANT_FILES, ComposeProject, ComposeStack, start, write_env_file

# The model name of the profile "serving" (test_compose_serving.py), published by the sqlite stack.
SERVED_MODEL = "compose-doubler"

MONITORING = {
    "COMPOSE_PROFILES": "monitoring",
    "TRACKGATE_MONITORING_SCRAPE_INTERVAL": "1s",
    "TRACKGATE_MONITORING_DOWN_FOR": "3s",
}


@pytest.fixture(scope="session")
def compose_images(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Build the app, nginx and postgres images from this checkout, FROM the local base image
    (cached layers make a rebuild after a code change take seconds)."""
    ensure_docker()
    env_file = tmp_path_factory.mktemp("compose-build") / "build.env"
    write_env_file(env_file, TRACKGATE_BASE_IMAGE=BASE_IMAGE,  # no registry: the local base
                   COMPOSE_PROFILES="monitoring")
    project = ComposeProject("tgtest-build", VARIANT_FILES["scale"], env_file)
    started = time.monotonic()
    result = project.run("build", timeout=1800, check=False)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-4000:]
    print(f"\ncompose images built in {time.monotonic() - started:.0f} s")


@pytest.fixture(scope="session", params=["sqlite", "postgres"])
def stack(request: pytest.FixtureRequest, compose_images: None,
          tmp_path_factory: pytest.TempPathFactory) -> Iterator[ComposeStack]:
    variant: str = request.param
    failed_before = request.session.testsfailed
    started = time.monotonic()
    # The sqlite stack also runs the profile "monitoring" (Prometheus, short intervals).
    monitoring = {**MONITORING, "TRACKGATE_PROMETHEUS_PORT": str(free_port()),
                  "TRACKGATE_SERVE_MODEL_NAME": SERVED_MODEL} if variant == "sqlite" else {}
    running = start(variant, tmp_path_factory.mktemp(f"compose-{variant}"), **monitoring)
    print(f"\ncompose stack ({variant}) healthy in {time.monotonic() - started:.0f} s")
    try:
        yield running
    finally:
        if request.session.testsfailed > failed_before:
            _show_logs(request, running)
        running.project.down(volumes=True)


def _show_logs(request: pytest.FixtureRequest, running: ComposeStack) -> None:
    """On failure: every container's log on the terminal and in tests/artifacts/."""
    logs = running.project.logs()
    out = Path(__file__).resolve().parents[1] / "artifacts" / f"{running.project.name}.log"
    out.parent.mkdir(exist_ok=True)
    out.write_text(logs, encoding="utf-8")
    reporter = request.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_line(f"\n==> logs of {running.project.name} (also in {out}) <==")
        reporter.write_line(logs[-20000:])
