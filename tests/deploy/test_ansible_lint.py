"""The playbook and role pass ansible-lint's production profile, offline (no Galaxy access)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from .harness import ANSIBLE_DIR

pytestmark = pytest.mark.deploy


def test_ansible_lint_production_profile_is_clean() -> None:
    bindir = Path(sys.executable).parent
    env = {**os.environ, "PATH": f"{bindir}{os.pathsep}{os.environ.get('PATH', '')}",
           "NO_COLOR": "1"}
    proc = subprocess.run([str(bindir / "ansible-lint"), "--profile", "production"],
                          cwd=ANSIBLE_DIR, env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "Profile 'production' was required, and it passed." in proc.stdout + proc.stderr
