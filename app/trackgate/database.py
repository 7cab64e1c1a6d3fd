"""The MLflow database: its schema (created on first start, upgraded after a backup) and its
backups (`trackgate db backup`, also what Ansible runs before an upgrade)."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import time
from pathlib import Path

from .settings import Settings

# A sqlite online backup waits this long for writers (MLflow holds write locks briefly).
SQLITE_BUSY_TIMEOUT_S = 30.0


class DatabaseError(RuntimeError):
    """A schema or backup problem with a message that says what to do."""


def backup(settings: Settings, dest: Path | None = None, *, label: str = "backup") -> Path:
    """A consistent copy of the backend store while clients keep writing; returns its path.

    sqlite: the online backup API in one step (a plain file copy misses rows committed in WAL
    mode); PostgreSQL: `pg_dump --format=custom`. Written to a temp name, then renamed, mode 0600.
    """
    sqlite_file = settings.sqlite_path
    suffix = ".db" if sqlite_file is not None else ".pgdump"
    if dest is None:
        stamp = time.strftime("%Y%m%d-%H%M%S")
        dest = settings.backups_dir / f"mlflow-{label}-{stamp}{suffix}"
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.partial")
    tmp.unlink(missing_ok=True)
    try:
        if sqlite_file is not None:
            _sqlite_backup(sqlite_file, tmp)
        else:
            _pg_dump(settings.database_uri, tmp)
        os.chmod(tmp, 0o600)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    return dest


def _sqlite_backup(source: Path, target: Path) -> None:
    if not source.is_file():
        raise DatabaseError(f"no database at {source}: nothing to back up")
    src = sqlite3.connect(source, timeout=SQLITE_BUSY_TIMEOUT_S)
    dst = sqlite3.connect(target)
    try:
        src.backup(dst)  # all pages in one step: a consistent snapshot, writers only wait
    except sqlite3.OperationalError as exc:
        raise DatabaseError(f"could not back up {source}: {exc} (is the disk full?)") from exc
    finally:
        dst.close()
        src.close()


def _pg_dump(uri: str, target: Path) -> None:
    if shutil.which("pg_dump") is None:
        raise DatabaseError(
            "pg_dump not found: install the PostgreSQL client "
            "(Debian: `apt-get install postgresql-client`)"
        )
    # libpq reads postgresql:// URIs itself; SQLAlchemy's driver suffix is not part of them.
    libpq_uri = uri.replace("postgresql+psycopg2://", "postgresql://", 1).replace(
        "postgresql+psycopg://", "postgresql://", 1
    )
    result = subprocess.run(
        ["pg_dump", "--format=custom", f"--file={target}", f"--dbname={libpq_uri}"],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise DatabaseError(f"pg_dump failed: {result.stderr.strip()}")


def ensure_schema(settings: Settings, *, allow_upgrade: bool = True) -> str:
    """Bring the schema to this MLflow's head: 'created', 'upgraded' or 'current'.

    A sqlite file is backed up (see `backup`) to data_dir/backups before any upgrade. Other
    databases are only upgraded when `allow_upgrade` is set (after a backup was made).
    """
    # MLflow's own migration helpers: the same code `mlflow db upgrade` runs.
    import sqlalchemy
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import (
        _get_alembic_config,
        _get_schema_version,
        _initialize_tables,
        _upgrade_db,
    )

    uri = settings.database_uri
    sqlite_file = settings.sqlite_path
    if sqlite_file is not None:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
    engine = sqlalchemy.create_engine(uri)
    try:
        current = _get_schema_version(engine)
        head = ScriptDirectory.from_config(_get_alembic_config(uri)).get_current_head()
        if current == head:
            return "current"
        if current is None:
            _initialize_tables(engine)  # create_all + stamp, as MLflow does on first use
            return "created"
        if sqlite_file is not None:
            backup(settings, label=f"before-upgrade-from-{current}")
        elif not allow_upgrade:
            raise DatabaseError(
                f"the database schema ({current}) is older than this MLflow's ({head}): "
                "back the database up, then run `trackgate db upgrade`"
            )
        _upgrade_db(engine)
        return "upgraded"
    finally:
        engine.dispose()
