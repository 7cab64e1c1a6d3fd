"""Fixtures shared by every tier: one real stack per test session, started in a temp dir."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .support import RunningStack, running_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture(autouse=True)
def _no_ambient_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see no MLflow/trackgate variables from the developer's shell."""
    import os

    for name in list(os.environ):
        if name.startswith(("MLFLOW_", "TRACKGATE_", "TRACKING_")):
            monkeypatch.delenv(name)
