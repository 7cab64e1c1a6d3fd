"""Docker for the container tiers: `ensure_docker()` runs tests/infra/docker-ready.sh (engine,
compose plugin, local base image, systemd host image; each step only does what is missing)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

INFRA_DIR = Path(__file__).resolve().parent
# The names lib.sh builds. The base is a local name, never an upstream one: the compose
# Dockerfiles get it as a build argument (TRACKGATE_BASE_IMAGE).
BASE_IMAGE = "trackgate-base:bookworm"
SYSTEMD_IMAGE = "trackgate/systemd-host:bookworm"


def ensure_docker() -> None:
    """Make Docker ready (idempotent: seconds when it already is)."""
    subprocess.run(
        ["bash", str(INFRA_DIR / "docker-ready.sh")],
        check=True,
        timeout=1200,
        env={**os.environ, "TRACKGATE_PYTHON": sys.executable},
    )
