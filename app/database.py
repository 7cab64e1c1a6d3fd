"""The MLflow database schema: create it on first start, upgrade it (after a backup) later."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

from .settings import Settings


class DatabaseError(RuntimeError):
    """A schema problem with a message that says what to do."""


def _sqlite_path(uri: str) -> Path | None:
    if uri.startswith("sqlite:///") and uri != "sqlite:///:memory:":
        return Path(uri.removeprefix("sqlite:///"))
    return None


def ensure_schema(settings: Settings, *, allow_upgrade: bool = True) -> str:
    """Bring the schema to this MLflow's head: 'created', 'upgraded' or 'current'.

    A sqlite file is copied to data_dir/backups before any upgrade. Other databases are only
    upgraded when `allow_upgrade` is set (after the operator or Ansible made a backup).
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
    sqlite_file = _sqlite_path(uri)
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
            backup_dir = settings.data_dir / "backups"
            backup_dir.mkdir(parents=True, exist_ok=True)
            stamp = time.strftime("%Y%m%d-%H%M%S")
            shutil.copy2(sqlite_file, backup_dir / f"{sqlite_file.stem}-{current}-{stamp}.db")
        elif not allow_upgrade:
            raise DatabaseError(
                f"the database schema ({current}) is older than this MLflow's ({head}): "
                "back the database up, then run `trackgate db upgrade`"
            )
        _upgrade_db(engine)
        return "upgraded"
    finally:
        engine.dispose()
