"""Backup and restore with a PostgreSQL backend store: `pg_dump -Fc` from an exported snapshot
in the archive, `pg_restore --no-owner --exit-on-error` into the configured database, and
`--verify` restoring into a scratch database beside the live one.

A throwaway PostgreSQL cluster runs on a free loopback port (Debian's postgresql 15 binaries).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from trackgate import backup
from trackgate.local import stack as stack_module

from ..infra.postgres import Cluster, postgres_cluster
from ..support import RunningStack, running_stack, stack_settings
from .mlflow_content import content, mlflow_env, populate

pytestmark = pytest.mark.reliability


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with postgres_cluster("mlflow", "restored") as found:
        yield found


@pytest.fixture(scope="module")
def live(cluster: Cluster, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    root = tmp_path_factory.mktemp("pg-backup")
    os.chmod(root, 0o711)
    with running_stack(root / "live", backend_store_uri=cluster.uri("mlflow")) as running:
        work = root / "populate"
        work.mkdir()
        with mlflow_env(running.client_env()):
            populate(work)
        yield running


def test_postgres_backup_restores_identical_and_verifies(
    live: RunningStack, cluster: Cluster, tmp_path: Path
) -> None:
    made = backup.backup(live.settings, tmp_path / "pg.tar")
    assert made.manifest["database"]["kind"] == "postgresql"
    assert backup.PG_MEMBER in made.manifest["members"]
    assert cluster.password not in (tmp_path / "pg.tar").read_bytes().decode("latin-1"), (
        "the database password stays out of the archive"
    )
    with mlflow_env(live.client_env()):
        expected = content(tmp_path / "live")

    target = stack_settings(tmp_path / "restored", backend_store_uri=cluster.uri("restored"))
    backup.restore(target, made.path)
    assert backup.content_summary(target.database_uri) == made.manifest["database"]["tables"]
    stack_module.up(target)
    try:
        restored = RunningStack(target, live.admin_password)
        env = {**restored.client_env(), "MLFLOW_TRACKING_SERVER_CERT_PATH": str(live.ca)}
        with mlflow_env(env):
            assert content(tmp_path / "restored-download") == expected
    finally:
        stack_module.down(target)

    # The restored database is no longer empty: a second restore needs --force.
    again = stack_settings(tmp_path / "again", backend_store_uri=cluster.uri("restored"))
    with pytest.raises(backup.BackupError, match="not empty.*--force"):
        backup.restore(again, made.path)
    backup.restore(again, made.path, force=True)
    assert backup.content_summary(again.database_uri) == made.manifest["database"]["tables"]

    result = backup.verify(live.settings, made.path, scratch_root=tmp_path)
    assert result.ok, result.differences
    assert result.compared_live
