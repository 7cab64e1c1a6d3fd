"""The MLflow database: its schema (created on first start, upgraded after a backup) and its
backups (`trackgate db backup`, also what Ansible runs before an upgrade)."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

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


def _versions(engine: object, uri: str) -> tuple[str | None, str]:
    """(the store's schema revision or None if it has no tables, this MLflow's head)."""
    from alembic.script import ScriptDirectory
    from mlflow.store.db.utils import _get_alembic_config, _get_schema_version

    current = _get_schema_version(engine)
    head = ScriptDirectory.from_config(_get_alembic_config(uri)).get_current_head()
    return current, head


def _too_old(settings: Settings, current: str, head: str) -> DatabaseError:
    return DatabaseError(
        f"the MLflow database {_where(settings)} has schema revision {current}, older than this "
        f"MLflow's ({head}); trackgate does not let MLflow migrate it implicitly. Run "
        "`trackgate db upgrade` (it backs the database up first, then upgrades it once), then "
        "start again"
    )


def _where(settings: Settings) -> str:
    sqlite_file = settings.sqlite_path
    return str(sqlite_file) if sqlite_file is not None else "(backend_store_uri)"


def check_schema(settings: Settings) -> None:
    """Raise DatabaseError if the store exists with an older schema than this MLflow's.

    Read-only: a missing sqlite file is left missing (the tracking server creates it)."""
    sqlite_file = settings.sqlite_path
    if sqlite_file is not None and not sqlite_file.exists():
        return
    import sqlalchemy

    engine = sqlalchemy.create_engine(settings.database_uri)
    try:
        current, head = _versions(engine, settings.database_uri)
    except sqlalchemy.exc.SQLAlchemyError as exc:
        raise DatabaseError(f"cannot read the MLflow database {_where(settings)}: {exc}") from None
    finally:
        engine.dispose()
    if current is not None and current != head:
        raise _too_old(settings, current, head)


def ensure_schema(settings: Settings, *, allow_upgrade: bool = True) -> str:
    """Bring the schema to this MLflow's head: 'created', 'upgraded' or 'current'.

    Without `allow_upgrade` (the tracking server at start) an older schema is refused with a
    message that says to run `trackgate db upgrade`: MLflow would otherwise migrate it on its
    first request, without a backup, possibly from several servers at once. With it (`trackgate
    db upgrade`), the upgrade runs under a lock (see `upgrade_lock`), once: whoever waited finds
    the schema current. The database is backed up (see `backup`) before it is upgraded.
    """
    import sqlalchemy
    from mlflow.store.db.utils import _initialize_tables, _upgrade_db

    uri = settings.database_uri
    sqlite_file = settings.sqlite_path
    if sqlite_file is not None:
        sqlite_file.parent.mkdir(parents=True, exist_ok=True)
    engine = sqlalchemy.create_engine(uri)
    try:
        current, head = _versions(engine, uri)
        if current == head:
            return "current"
        if current is not None and not allow_upgrade:
            raise _too_old(settings, current, head)
        with upgrade_lock(settings, engine):
            current, head = _versions(engine, uri)  # another upgrade may have run meanwhile
            if current == head:
                return "current"
            if current is None:
                _initialize_tables(engine)  # create_all + stamp, as MLflow does on first use
                return "created"
            backup(settings, label=f"before-upgrade-from-{current}")
            _upgrade_db(engine)
            return "upgraded"
    finally:
        engine.dispose()


# Any fixed number: the key of the PostgreSQL advisory lock of `trackgate db upgrade`.
_PG_LOCK_KEY = 0x7472_6B67_6462  # "trkgdb"


@contextlib.contextmanager
def upgrade_lock(settings: Settings, engine: Any) -> Iterator[None]:
    """One schema change at a time: a file lock beside a sqlite database, a session-level
    `pg_advisory_lock` on PostgreSQL (held by its own connection). A second caller waits."""
    sqlite_file = settings.sqlite_path
    if sqlite_file is not None:
        lock_path = sqlite_file.with_name(f".{sqlite_file.name}.upgrade-lock")
        with open(lock_path, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return
    if engine.dialect.name != "postgresql":
        yield  # MySQL/MSSQL: MLflow's own migration only
        return
    import sqlalchemy

    with engine.connect() as connection:
        connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": _PG_LOCK_KEY})
        connection.commit()
        try:
            yield
        finally:
            connection.execute(
                sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": _PG_LOCK_KEY}
            )
            connection.commit()


def give_back(settings: Settings) -> None:
    """After root upgraded a sqlite store: the database files and backups belong to the data
    dir's owner again (the service account), or the tracking server could not write them."""
    sqlite_file = settings.sqlite_path
    if sqlite_file is None or not settings.data_dir.is_dir():
        return
    st = settings.data_dir.stat()
    if st.st_uid == os.geteuid():
        return
    paths = [p for p in sqlite_file.parent.glob(f"{sqlite_file.name}*") if p.is_file()]
    if settings.backups_dir.is_dir():
        paths += [settings.backups_dir, *settings.backups_dir.iterdir()]
    for path in paths:
        os.chown(path, st.st_uid, st.st_gid, follow_symlinks=False)
