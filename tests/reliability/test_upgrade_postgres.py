"""Schema changes on PostgreSQL (issue 13): two `trackgate db upgrade` at once on an empty
database serialize on `pg_advisory_lock` (without it, both create the tables: DuplicateTable),
and an older schema revision is refused by `trackgate up` with what to run."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ..support import clean_env, run_at_once
from .supervision import CliStack, mentioning
from .test_backup_postgres import Cluster, cluster  # noqa: F401 - the throwaway cluster fixture

pytestmark = pytest.mark.reliability


def _create_database(cluster: Cluster, name: str) -> str:  # noqa: F811 - the fixture's type
    import sqlalchemy

    engine = sqlalchemy.create_engine(cluster.uri("postgres"), isolation_level="AUTOCOMMIT")
    try:
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text(f'CREATE DATABASE "{name}"'))
    finally:
        engine.dispose()
    return cluster.uri(name)


def _execute(uri: str, sql: str) -> object:
    import sqlalchemy

    engine = sqlalchemy.create_engine(uri)
    try:
        with engine.begin() as connection:
            result = connection.execute(sqlalchemy.text(sql))
            return result.scalar() if result.returns_rows else None
    finally:
        engine.dispose()


def test_two_upgrades_at_once_on_postgres_run_one_after_the_other(
    cluster: Cluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    uri = _create_database(cluster, "upgrade_race")
    argv = [sys.executable, "-m", "trackgate", "db", "upgrade", "--data-dir", str(tmp_path),
            "--backend-store-uri", uri]
    outcomes = []
    for done in run_at_once(argv):
        assert done.returncode == 0, done.stderr[-3000:]
        outcomes.append(done.stdout.strip())
    assert sorted(outcomes) == ["database schema created", "database schema current"]
    assert _execute(uri, "SELECT count(*) FROM alembic_version") == 1


def test_up_refuses_an_older_postgres_schema_with_what_to_run(
    cluster: Cluster,  # noqa: F811
    tmp_path: Path,
) -> None:
    uri = _create_database(cluster, "upgrade_old")
    made = subprocess.run([sys.executable, "-m", "trackgate", "db", "upgrade", "--data-dir",
                           str(tmp_path), "--backend-store-uri", uri], env=clean_env(),
                          capture_output=True, text=True, timeout=600)
    assert made.returncode == 0, made.stderr
    # Pretend an older MLflow made it: one revision back in MLflow's own migration history.
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config

    script = ScriptDirectory.from_config(_get_alembic_config(uri))
    previous = script.get_revision(script.get_current_head()).down_revision
    _execute(uri, f"UPDATE alembic_version SET version_num = '{previous}'")
    os.chmod(tmp_path, 0o711)
    stack = CliStack.new(tmp_path / "data", TRACKGATE_BACKEND_STORE_URI=uri)
    refused = stack.run("up")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
    assert "trackgate db upgrade" in refused.stderr and str(previous) in refused.stderr
    assert cluster.password not in refused.stderr
    assert mentioning(stack.data_dir) == []
