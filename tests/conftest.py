"""Fixtures shared by every tier: one real stack per test session, started in a temp dir."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from .support import AMBIENT_PREFIXES, RunningStack, running_stack


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("stack")) as running:
        yield running


@pytest.fixture(scope="session", autouse=True)
def _service_account_may_pass_base(tmp_path_factory: pytest.TempPathFactory) -> None:
    """As root, trackgate's servers run as an unprivileged account, which must pass through
    pytest's temp dirs to reach the data dirs inside them (x only: it can list nothing)."""
    import os

    if os.geteuid() == 0:
        base = tmp_path_factory.getbasetemp()
        for path in (base, base.parent):
            path.chmod(path.stat().st_mode | 0o001)


@pytest.fixture(autouse=True)
def _service_account_may_pass(request: pytest.FixtureRequest) -> None:
    import os

    if os.geteuid() == 0 and "tmp_path" in request.fixturenames:
        path = request.getfixturevalue("tmp_path")
        path.chmod(path.stat().st_mode | 0o001)


@pytest.fixture(autouse=True)
def _no_ambient_mlflow_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests see no MLflow/trackgate variables from the developer's shell."""
    import os

    for name in list(os.environ):
        if name.startswith(AMBIENT_PREFIXES):
            monkeypatch.delenv(name)
