"""Fixtures for the workflow tier: run the examples as a user would, against the real stack."""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow import MlflowClient

from ..support import RunningStack, clean_env, running_stack

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"
VENV_BIN = str(Path(sys.executable).parent)


def user_env(stack: RunningStack, **extra: str) -> dict[str, str]:
    """A user's shell: the exported MLFLOW_TRACKING_* only, and the venv activated."""
    env = clean_env(**{**stack.client_env(), **extra})
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}"
    env.pop("PYTHONPATH", None)  # the examples must not see the repo by accident
    return env


def run_example(stack: RunningStack, script: str, *args: str, cwd: Path,
                env: dict[str, str] | None = None,
                timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """`python examples/SCRIPT ARGS` from `cwd`; fails the test with the output if it fails."""
    result = subprocess.run(
        [sys.executable, str(EXAMPLES / script), *args], cwd=cwd, env=env or user_env(stack),
        capture_output=True, text=True, timeout=timeout,
    )
    assert result.returncode == 0, f"{script} failed:\n{result.stdout}\n{result.stderr}"
    return result


def unique(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(3)}"


@pytest.fixture
def exported_credentials(stack: RunningStack, monkeypatch: pytest.MonkeyPatch) -> None:
    """The test process sees exactly the MLFLOW_TRACKING_* a user exports."""
    for name, value in stack.client_env().items():
        monkeypatch.setenv(name, value)


@pytest.fixture
def mlflow_client(exported_credentials: None) -> MlflowClient:
    """An MlflowClient in the test process with exactly the exported credentials."""
    return MlflowClient()


@pytest.fixture(scope="session")
def registered_model(stack: RunningStack,
                     tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """examples/register.py run once: its model name and the predictions it printed."""
    name = unique("diabetes")
    result = run_example(stack, "register.py", "--name", name,
                         "--experiment", unique("registry"), cwd=tmp_path_factory.mktemp("reg"))
    champion = re.search(r"champion: version (\d+)", result.stdout)
    by_alias = re.search(r"@champion predicts (\[.*\])", result.stdout)
    by_stage = re.search(r"/Production predicts (\[.*\])", result.stdout)
    assert champion and by_alias and by_stage, result.stdout
    return {"name": name, "champion": champion.group(1), "by_alias": by_alias.group(1),
            "by_stage": by_stage.group(1), "stdout": result.stdout}


@pytest.fixture(scope="session")
def strict_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    """A second stack for failure cases: tiny upload limit, 1 s proxy timeout, and its own
    failed-login counters (wrong passwords here never throttle the shared stack)."""
    with running_stack(tmp_path_factory.mktemp("strict"), max_upload="1k",
                       proxy_timeout=1) as running:
        yield running
