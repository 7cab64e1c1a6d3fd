"""`trackgate backup`, `restore` and `backup --verify`: one archive holds everything a stack
needs to come back identical, and a backup proves itself by being restored and served.

The archive is a plain tar (artifacts are mostly compressed already; only the sqlite database is
gzipped, where it pays). Members:

- ``database/mlflow.db.gz`` (sqlite online backup, see database.backup) or
  ``database/mlflow.pgdump`` (``pg_dump -Fc`` from an exported snapshot);
- ``artifacts/...``: the local artifact store, file by file; or ``bucket/...``: every object
  under an S3 destination's prefix (key relative to the prefix), streamed from the store;
- ``users/htpasswd``, ``tls/...`` (the local CA and keys), ``tls-custom/{cert,key}.pem`` (an
  operator's certificate), ``data/...`` (any other file in the data dir, e.g. secret keys);
- ``settings.env``: the ``TRACKGATE_*`` values, database password redacted;
- ``manifest.json`` (versions, schema revision, size and sha256 of every member, and a count and
  content hash of every database table), then ``manifest.json.sha256``.

Restore checks every checksum before it writes anything. Verify restores into a scratch dir,
starts a real stack there on free ports and compares what it serves with the manifest and with
the live database.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import hashlib
import io
import json
import os
import secrets
import shutil
import sqlite3
import subprocess
import tarfile
import tempfile
import time
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from importlib.metadata import version as _dist_version
from pathlib import Path, PurePosixPath
from typing import IO, Any

from . import __version__, accounts, database
from .processes import any_free_port
from .server import objectstore
from .settings import ENV_PREFIX, Settings, _redact

FORMAT = "trackgate-backup"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MANIFEST_SUM = "manifest.json.sha256"
SQLITE_MEMBER = "database/mlflow.db.gz"
BUCKET_TREE = "bucket"  # objects of an s3:// destination; "artifacts" holds a local store's files
PG_MEMBER = "database/mlflow.pgdump"
SETTINGS_MEMBER = "settings.env"
RESTORED_SETTINGS = "backup-settings.env"  # where restore leaves the archived settings
PROGRESS_EVERY_S = 3.0
_CHUNK = 1 << 20
# Entries of the data dir that are runtime state or have their own member.
_NOT_DATA = {"run", "logs", "backups", "serving", "artifacts", "tls", RESTORED_SETTINGS,
             "artifacts.uploads"}  # nginx's upload bodies in flight (server/uploads.py)
# MLflow writes an artifact to a hidden temp file, then renames it: temp files are not data.
_UPLOADING_PREFIX = ".artifact.uploading."
_SETTINGS_FILE = "trackgate.env"  # settings.SETTINGS_FILE_NAME: restored as data/trackgate.env

Say = Callable[[str], None]


class BackupError(RuntimeError):
    """A backup, restore or verify problem, with a message that says what to do."""


# --- small helpers --------------------------------------------------------------------------


def _quiet(_message: str) -> None:
    pass


def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


class _Progress:
    """Bytes done of a known total, said every few seconds (never for short runs)."""

    def __init__(self, verb: str, total: int, say: Say) -> None:
        self.verb, self.total, self.say = verb, total, say
        self.done = 0
        self.started = time.monotonic()
        self._last = self.started

    def add(self, n: int) -> None:
        self.done += n
        now = time.monotonic()
        if now - self._last >= PROGRESS_EVERY_S:
            self._last = now
            pct = 100.0 * self.done / self.total if self.total else 100.0
            self.say(
                f"{self.verb}: {human(self.done)} of {human(self.total)} ({pct:.0f} %), "
                f"{now - self.started:.0f} s"
            )


@contextlib.contextmanager
def _disk_errors(action: str) -> Iterator[None]:
    """OS errors as one clear sentence: disk full, permission denied, missing files."""
    try:
        yield
    except BackupError:
        raise
    except (database.DatabaseError, accounts.AccountError) as exc:
        raise BackupError(str(exc)) from exc
    except sqlite3.Error as exc:
        raise BackupError(f"{action} failed: sqlite: {exc}") from exc
    except OSError as exc:
        where = f" ({exc.filename})" if getattr(exc, "filename", None) else ""
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise BackupError(f"no space left on the device while {action}{where}") from exc
        if exc.errno in (errno.EACCES, errno.EPERM):
            raise BackupError(
                f"permission denied while {action}{where}: run as the user that owns the "
                "data dir, or root"
            ) from exc
        raise BackupError(f"{action} failed: {exc.strerror or exc}{where}") from exc


def _local_artifacts(settings: Settings) -> Path | None:
    """The local artifact directory; None for an s3:// destination (see _Bucket)."""
    uri = settings.artifacts_uri
    if objectstore.is_s3(uri):
        return None
    if uri.startswith("file://"):
        return Path(uri.removeprefix("file://"))
    if "://" in uri:
        raise BackupError(
            f"artifacts live in {uri}: trackgate backs up a local directory or an s3:// "
            "destination only; copy this store with its own tools"
        )
    return Path(uri)


class _Bucket:
    """The objects under an s3:// destination's prefix, through the tracking server's own boto3
    client setup (endpoint, region, keys); every S3 error becomes one BackupError sentence."""

    def __init__(self, settings: Settings) -> None:
        self.uri = settings.artifacts_uri
        self.bucket, prefix = objectstore.split_s3(self.uri)
        # With a trailing slash: s3://b/team must not take in s3://b/team-b's objects.
        self.prefix = f"{prefix}/" if prefix else ""
        with self.errors():
            self.where = objectstore.endpoint_name(settings)
            self.client = objectstore.client_for(settings)

    @contextlib.contextmanager
    def errors(self) -> Iterator[None]:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            yield
        except objectstore.ObjectStoreError as exc:
            raise BackupError(str(exc)) from None
        except (BotoCoreError, ClientError, ValueError) as exc:
            raise BackupError(
                str(objectstore.explain(exc, self.uri, getattr(self, "where", "S3")))
            ) from None

    def check(self) -> None:
        with self.errors():
            self.client.head_bucket(Bucket=self.bucket)

    def _listing(self) -> Iterator[dict[str, Any]]:
        with self.errors():
            pages = self.client.get_paginator("list_objects_v2").paginate(
                Bucket=self.bucket, Prefix=self.prefix
            )
            for page in pages:
                yield from page.get("Contents", [])

    def objects(self, say: Say = _quiet) -> Iterator[tuple[str, str, int]]:
        """(path relative to the prefix, key, size) of every artifact object, in key order."""
        for obj in self._listing():
            rel = obj["Key"][len(self.prefix) :]
            # `up`'s write probe (deleted at once) and "directory" markers are no artifacts.
            if not rel or rel.endswith("/") or rel == objectstore.PROBE_KEY:
                continue
            parts = rel.split("/")
            if any(part in ("", ".", "..") for part in parts):
                # MLflow never makes such a key; a restore could not put it back where it was.
                say(f"backup: skipped object {obj['Key']!r}: not a plain path under the prefix")
                continue
            yield rel, obj["Key"], obj["Size"]

    def occupied(self) -> int:
        with self.errors():
            found = self.client.list_objects_v2(Bucket=self.bucket, Prefix=self.prefix, MaxKeys=1)
        return int(found.get("KeyCount", len(found.get("Contents", []))))

    def key(self, rel: PurePosixPath) -> str:
        return self.prefix + rel.as_posix()

    def where_text(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def delete_all(self) -> None:
        """Every object under the prefix (--force, or undoing a failed restore)."""
        with self.errors():
            keys = [obj["Key"] for obj in self._listing()]
            for i in range(0, len(keys), 1000):
                self.client.delete_objects(
                    Bucket=self.bucket,
                    Delete={"Objects": [{"Key": k} for k in keys[i : i + 1000]], "Quiet": True},
                )


def _bucket(settings: Settings) -> _Bucket | None:
    return _Bucket(settings) if objectstore.is_s3(settings.artifacts_uri) else None


def _artifact_path(member: str) -> str:
    """An artifact member's path under the artifact root, whichever tree holds it."""
    return member.split("/", 1)[1]


def _safe_name(name: str) -> PurePosixPath:
    path = PurePosixPath(name)
    if path.is_absolute() or ".." in path.parts or not path.parts:
        raise BackupError(f"refusing archive member {name!r}: it points outside the target")
    return path


# --- database content: counts and content hashes of every table -------------------------------


def _encode_row(row: Any) -> bytes:
    values = [v.hex() if isinstance(v, bytes | memoryview) else v for v in row]
    return (json.dumps(values, default=str, separators=(",", ":")) + "\n").encode()


class _Db:
    """Read every table of a database inside one transaction (a consistent view)."""

    def __init__(self, uri: str, *, snapshot: str | None = None) -> None:
        self.uri = uri
        self._snapshot = snapshot
        self._sqlite: sqlite3.Connection | None = None
        self._engine: Any = None
        self._conn: Any = None

    def __enter__(self) -> _Db:
        if self.uri.startswith("sqlite:///"):
            path = self.uri.removeprefix("sqlite:///")
            if not Path(path).is_file():
                raise BackupError(f"no database at {path}")
            self._sqlite = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, timeout=30, isolation_level=None
            )
            self._sqlite.execute("BEGIN")
        else:
            import sqlalchemy

            self._engine = sqlalchemy.create_engine(self.uri, isolation_level="REPEATABLE READ")
            self._conn = self._engine.connect()
            self._conn.begin()
            if self._snapshot:
                self._conn.exec_driver_sql(f"SET TRANSACTION SNAPSHOT '{self._snapshot}'")
        return self

    def __exit__(self, *exc: object) -> None:
        if self._sqlite is not None:
            self._sqlite.close()
        if self._conn is not None:
            self._conn.close()
            self._engine.dispose()

    def scalar(self, sql: str) -> Any:
        if self._sqlite is not None:
            row = self._sqlite.execute(sql).fetchone()
            return row[0] if row else None
        return self._conn.exec_driver_sql(sql).scalar()

    def tables(self) -> list[str]:
        if self._sqlite is not None:
            rows = self._sqlite.execute(
                "SELECT name FROM sqlite_master WHERE type='table' AND name NOT LIKE 'sqlite_%'"
            )
            return sorted(r[0] for r in rows)
        import sqlalchemy

        return sorted(sqlalchemy.inspect(self._conn).get_table_names())

    def rows(self, table: str) -> Iterator[Any]:
        if self._sqlite is not None:
            ncols = len(self._sqlite.execute(f'PRAGMA table_info("{table}")').fetchall())
            order = ", ".join(str(i + 1) for i in range(ncols))
            yield from self._sqlite.execute(f'SELECT * FROM "{table}" ORDER BY {order}')
            return
        quote = self._conn.dialect.identifier_preparer.quote
        result = self._conn.exec_driver_sql(f"SELECT * FROM {quote(table)} LIMIT 0")
        columns = list(result.keys())
        result.close()
        # As text: some types (json) have no ordering operator in PostgreSQL.
        order = ", ".join(f"CAST({quote(c)} AS TEXT)" for c in columns)
        yield from self._conn.exec_driver_sql(f"SELECT * FROM {quote(table)} ORDER BY {order}")

    def content(self) -> dict[str, dict[str, Any]]:
        summary = {}
        for table in self.tables():
            digest, count = hashlib.sha256(), 0
            for row in self.rows(table):
                digest.update(_encode_row(row))
                count += 1
            summary[table] = {"count": count, "sha256": digest.hexdigest()}
        return summary

    def row_set(self, table: str) -> Counter[bytes]:
        return Counter(_encode_row(row) for row in self.rows(table))

    def schema_revision(self) -> str | None:
        try:
            return self.scalar("SELECT version_num FROM alembic_version")
        except Exception:
            return None


def content_summary(uri: str) -> dict[str, dict[str, Any]]:
    """{table: {count, sha256}} for every table of the database at `uri`."""
    with _Db(uri) as db:
        return db.content()


def _libpq(uri: str) -> str:
    for driver in ("postgresql+psycopg2://", "postgresql+psycopg://"):
        uri = uri.replace(driver, "postgresql://", 1)
    return uri


def _need(tool: str) -> None:
    if shutil.which(tool) is None:
        raise BackupError(
            f"{tool} not found: install the PostgreSQL client "
            "(Debian: `apt-get install postgresql-client`)"
        )


# --- backup --------------------------------------------------------------------------------


@dataclass
class BackupResult:
    path: Path
    size: int
    seconds: float
    database_bytes: int
    artifact_files: int
    artifact_bytes: int
    other_files: int
    manifest: dict[str, Any]

    def summary(self) -> str:
        tables = self.manifest["database"]["tables"]
        runs = tables.get("runs", {}).get("count", 0)
        return (
            f"backup: wrote {self.path} ({human(self.size)} in {self.seconds:.1f} s): "
            f"database {human(self.database_bytes)} ({runs} runs), "
            f"{self.artifact_files} artifact files ({human(self.artifact_bytes)}), "
            f"users, TLS and {self.other_files} other files"
        )


@dataclass
class _Source:
    member: str
    path: Path
    role: str


def _check_source(settings: Settings) -> None:
    data_dir = settings.data_dir
    if not data_dir.is_dir():
        raise BackupError(f"no data dir at {data_dir}: nothing to back up")
    if not os.access(data_dir, os.R_OK | os.X_OK):
        raise BackupError(f"cannot read the data dir {data_dir}: permission denied")
    _local_artifacts(settings)
    bucket = _bucket(settings)
    if bucket is not None:
        bucket.check()  # before the database dump: a wrong key fails in a second


def _size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def _collect(settings: Settings) -> list[_Source]:
    """Every file to archive but the database."""
    data_dir = settings.data_dir
    sources: list[_Source] = []
    artifacts = _local_artifacts(settings)
    if artifacts is not None and artifacts.is_dir():
        for path in sorted(_walk(artifacts)):
            rel = path.relative_to(artifacts).as_posix()
            if not path.name.startswith(_UPLOADING_PREFIX):
                sources.append(_Source(f"artifacts/{rel}", path, "artifact"))
    if settings.htpasswd.is_file():
        sources.append(_Source("users/htpasswd", settings.htpasswd, "users"))
    if settings.tls_dir.is_dir():
        for path in sorted(_walk(settings.tls_dir)):
            sources.append(_Source(f"tls/{path.relative_to(settings.tls_dir)}", path, "tls"))
    if not settings.uses_local_ca:
        for name, path in (("cert.pem", settings.tls_cert), ("key.pem", settings.tls_key)):
            if path is not None and Path(path).is_file():
                sources.append(_Source(f"tls-custom/{name}", Path(path), "tls"))
    skip = set(_NOT_DATA)
    sqlite_file = settings.sqlite_path
    if sqlite_file is not None and sqlite_file.parent == data_dir:
        skip |= {sqlite_file.name + s for s in ("", "-wal", "-shm", "-journal")}
    if settings.htpasswd.parent == data_dir:
        skip.add(settings.htpasswd.name)
    for entry in sorted(data_dir.iterdir()):
        name = entry.name
        if name in skip or name.startswith(f".{settings.htpasswd.name}.") or name.endswith(".lock"):
            continue
        if artifacts is not None and (
            entry == artifacts or (entry.is_dir() and artifacts.is_relative_to(entry))
        ):
            continue
        files = sorted(_walk(entry)) if entry.is_dir() else [entry] if entry.is_file() else []
        for path in files:
            sources.append(_Source(f"data/{path.relative_to(data_dir).as_posix()}", path, "data"))
    return sources


def _walk(root: Path) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames.sort()
        for name in filenames:
            path = Path(dirpath) / name
            if path.is_file() and not path.is_symlink():
                yield path


class _HashingReader:
    """Feeds exactly `size` bytes of an open file to tarfile, hashing them on the way."""

    def __init__(self, f: IO[bytes], size: int, progress: _Progress) -> None:
        self.f, self.left, self.progress = f, size, progress
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.f.read(n)
        if len(data) < n:
            raise BackupError(f"{self.f.name} shrank while it was read; run the backup again")
        self.left -= len(data)
        self.digest.update(data)
        self.progress.add(len(data))
        return data


def _add_file(tar: tarfile.TarFile, member: str, path: Path, progress: _Progress) -> dict[str, Any]:
    with open(path, "rb") as f:
        st = os.fstat(f.fileno())  # the open file: a rename during the read cannot change it
        info = tarfile.TarInfo(member)
        info.size, info.mtime, info.mode = st.st_size, int(st.st_mtime), st.st_mode & 0o777
        reader = _HashingReader(f, st.st_size, progress)
        tar.addfile(info, reader)  # type: ignore[arg-type]
    return {"size": st.st_size, "sha256": reader.digest.hexdigest()}


class _ObjectReader:
    """Feeds one S3 object to tarfile as it arrives (never whole in memory), hashing it."""

    def __init__(self, body: Any, size: int, name: str, progress: _Progress) -> None:
        self.body, self.left, self.name, self.progress = body, size, name, progress
        self.digest = hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        n = self.left if n < 0 else min(n, self.left)
        data = self.body.read(n)
        while 0 < len(data) < n:  # a socket read may return less than asked
            more = self.body.read(n - len(data))
            if not more:
                break
            data += more
        if len(data) < n:
            raise BackupError(
                f"object {self.name} ended early while it was read; run the backup again"
            )
        self.left -= len(data)
        self.digest.update(data)
        self.progress.add(len(data))
        return data


def _add_object(
    tar: tarfile.TarFile, bucket: _Bucket, rel: str, key: str, progress: _Progress
) -> dict[str, Any] | None:
    """One object as member bucket/REL; None if it was deleted since it was listed."""
    from botocore.exceptions import ClientError

    with bucket.errors():
        try:
            obj = bucket.client.get_object(Bucket=bucket.bucket, Key=key)
        except ClientError as exc:
            if exc.response.get("Error", {}).get("Code") in ("NoSuchKey", "404"):
                return None  # deleted since the listing (a deleted run's artifacts)
            raise
        size = int(obj["ContentLength"])  # this version's size, not the listing's
        info = tarfile.TarInfo(f"{BUCKET_TREE}/{rel}")
        info.size, info.mode = size, 0o600
        info.mtime = int(obj["LastModified"].timestamp()) if obj.get("LastModified") else 0
        reader = _ObjectReader(obj["Body"], size, key, progress)
        try:
            tar.addfile(info, reader)  # type: ignore[arg-type]
        finally:
            obj["Body"].close()
    entry: dict[str, Any] = {"size": size, "sha256": reader.digest.hexdigest()}
    if obj.get("ContentType"):
        entry["content_type"] = obj["ContentType"]
    return entry


def _add_bytes(tar: tarfile.TarFile, member: str, data: bytes, mode: int = 0o600) -> dict[str, Any]:
    info = tarfile.TarInfo(member)
    info.size, info.mtime, info.mode = len(data), int(time.time()), mode
    tar.addfile(info, io.BytesIO(data))
    return {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


def _settings_text(settings: Settings) -> str:
    env = settings.to_env()
    key = ENV_PREFIX + "BACKEND_STORE_URI"
    if key in env:
        env[key] = _redact(env[key])  # the password stays out of the archive
    return "".join(f"{k}={v}\n" for k, v in sorted(env.items()))


def _snapshot_database(
    settings: Settings, workdir: Path, say: Say
) -> tuple[Path, str, dict[str, Any], str | None, float]:
    """(file, member, table summary, schema revision, snapshot start time)."""
    started = time.time()
    sqlite_file = settings.sqlite_path
    if sqlite_file is not None:
        raw = database.backup(settings, workdir / "mlflow.db")
        if time.time() - started > PROGRESS_EVERY_S:
            say(f"backup: database snapshot ({human(raw.stat().st_size)}) taken")
        with _Db(f"sqlite:///{raw}") as db:
            tables, revision = db.content(), db.schema_revision()
        packed = workdir / "mlflow.db.gz"
        with open(raw, "rb") as src, gzip.open(packed, "wb", compresslevel=1) as dst:
            shutil.copyfileobj(src, dst, _CHUNK)
        raw.unlink()
        os.chmod(packed, 0o600)
        return packed, SQLITE_MEMBER, tables, revision, started
    # PostgreSQL: pg_dump reads the snapshot this transaction exported, so the manifest's
    # table hashes describe exactly what the dump holds.
    _need("pg_dump")
    dump = workdir / "mlflow.pgdump"
    import sqlalchemy

    engine = sqlalchemy.create_engine(settings.database_uri, isolation_level="REPEATABLE READ")
    try:
        with engine.connect() as conn:
            conn.begin()
            snapshot = conn.exec_driver_sql("SELECT pg_export_snapshot()").scalar()
            result = subprocess.run(
                [
                    "pg_dump",
                    "--format=custom",
                    f"--snapshot={snapshot}",
                    f"--file={dump}",
                    f"--dbname={_libpq(settings.database_uri)}",
                ],
                capture_output=True,
                text=True,
            )
            if result.returncode != 0:
                raise BackupError(f"pg_dump failed: {result.stderr.strip()}")
            with _Db(settings.database_uri, snapshot=snapshot) as db:
                tables, revision = db.content(), db.schema_revision()
    except sqlalchemy.exc.OperationalError as exc:
        raise BackupError(f"cannot reach the database: {exc.orig}") from exc
    finally:
        engine.dispose()
    return dump, PG_MEMBER, tables, revision, started


def default_archive(settings: Settings) -> Path:
    return settings.backups_dir / f"trackgate-{time.strftime('%Y%m%d-%H%M%S')}.tar"


def prune(directory: Path, keep: int) -> list[Path]:
    """Delete all but the newest `keep` archives named trackgate-*.tar in `directory` (by
    modification time); return what was deleted. Scheduled backups use it as their retention."""
    if keep < 1:
        raise BackupError(f"--keep must be at least 1, not {keep}")
    archives = sorted(
        (p for p in Path(directory).glob("trackgate-*.tar") if p.is_file() and not p.is_symlink()),
        key=lambda p: (p.stat().st_mtime, p.name),
        reverse=True,
    )
    for old in archives[keep:]:
        old.unlink(missing_ok=True)
    return archives[keep:]


def backup(settings: Settings, output: Path | None = None, *, say: Say = _quiet) -> BackupResult:
    """Write one archive of the whole stack while clients keep writing; mode 0600."""
    started = time.monotonic()
    output = Path(output) if output is not None else default_archive(settings)
    with _disk_errors("collecting the files"):
        _check_source(settings)
        output.parent.mkdir(parents=True, exist_ok=True)
        workdir = Path(tempfile.mkdtemp(prefix=".trackgate-backup-", dir=output.parent))
    tmp = output.with_name(f".{output.name}.partial")
    try:
        with _disk_errors(f"writing {output}"):
            # The database first, as one snapshot.
            db_file, db_member, tables, revision, snap_started = _snapshot_database(
                settings, workdir, say
            )
            snap_done = time.time()
            # Then the files, listed after the snapshot: an artifact acknowledged before it is
            # on disk by now (MLflow publishes each one by renaming a finished temp file).
            sources = _collect(settings)
            # Likewise the bucket's objects, listed after the snapshot (README "Backup and
            # restore" says why none the snapshot refers to can be missing).
            bucket = _bucket(settings)
            objects = list(bucket.objects(say)) if bucket is not None else []
            if bucket is not None:
                say(f"backup: {len(objects)} objects under {bucket.where_text()} to copy")
            total = (
                sum(_size(s.path) for s in sources)
                + sum(size for _rel, _key, size in objects)
                + db_file.stat().st_size
            )
            progress = _Progress("backup", total, say)
            members: dict[str, dict[str, Any]] = {}
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with (
                os.fdopen(fd, "wb") as raw,
                tarfile.open(
                    fileobj=raw, mode="w", format=tarfile.PAX_FORMAT, copybufsize=_CHUNK
                ) as tar,
            ):
                members[db_member] = {**_add_file(tar, db_member, db_file, progress), "role": "db"}
                artifact_bytes = 0
                for rel, key, _listed in objects:
                    assert bucket is not None
                    entry = _add_object(tar, bucket, rel, key, progress)
                    if entry is not None:
                        members[f"{BUCKET_TREE}/{rel}"] = {**entry, "role": "artifact"}
                        artifact_bytes += entry["size"]
                for source in sources:
                    try:
                        entry = _add_file(tar, source.member, source.path, progress)
                    except FileNotFoundError:
                        continue  # deleted since we listed it (MLflow's garbage collection)
                    members[source.member] = {**entry, "role": source.role}
                    if source.role == "artifact":
                        artifact_bytes += entry["size"]
                settings_text = _settings_text(settings).encode()
                members[SETTINGS_MEMBER] = {
                    **_add_bytes(tar, SETTINGS_MEMBER, settings_text),
                    "role": "settings",
                }
                manifest = {
                    "format": FORMAT,
                    "format_version": FORMAT_VERSION,
                    "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                    "trackgate_version": __version__,
                    "mlflow_version": _dist_version("mlflow"),
                    "hostname": settings.hostname,
                    "database": {
                        "kind": "sqlite" if db_member == SQLITE_MEMBER else "postgresql",
                        "member": db_member,
                        "schema_revision": revision,
                        "snapshot_started": snap_started,
                        "snapshot_done": snap_done,
                        "tables": tables,
                    },
                    "artifacts": {
                        "files": sum(1 for m in members.values() if m["role"] == "artifact"),
                        "bytes": artifact_bytes,
                        # Where they came from (no secret in it): s3://BUCKET/PREFIX or "local".
                        "store": bucket.where_text() if bucket is not None else "local",
                    },
                    "members": members,
                }
                text = json.dumps(manifest, indent=1, sort_keys=True).encode()
                _add_bytes(tar, MANIFEST, text)
                _add_bytes(tar, MANIFEST_SUM, hashlib.sha256(text).hexdigest().encode() + b"\n")
                raw.flush()
                os.fsync(raw.fileno())
            os.replace(tmp, output)
    finally:
        tmp.unlink(missing_ok=True)
        shutil.rmtree(workdir, ignore_errors=True)
    others = sum(1 for m in members.values() if m["role"] == "data")
    size = output.stat().st_size
    from .server.metrics import write_backup_status

    write_backup_status(settings, size)  # the backup-age metric and its alert
    return BackupResult(
        path=output,
        size=size,
        seconds=time.monotonic() - started,
        database_bytes=members[db_member]["size"],
        artifact_files=manifest["artifacts"]["files"],
        artifact_bytes=artifact_bytes,
        other_files=others,
        manifest=manifest,
    )


# --- reading an archive ----------------------------------------------------------------------


@contextlib.contextmanager
def _open_archive(archive: Path) -> Iterator[tuple[tarfile.TarFile, dict[str, Any]]]:
    archive = Path(archive)
    if not archive.exists():
        raise BackupError(f"no archive at {archive}")
    if archive.is_dir():
        raise BackupError(f"{archive} is a directory, not a backup archive")
    try:
        tar = tarfile.open(archive, mode="r:*", copybufsize=_CHUNK)  # noqa: SIM115 - closed below
    except PermissionError as exc:
        raise BackupError(f"cannot read {archive}: permission denied") from exc
    except (tarfile.TarError, EOFError, zlib.error) as exc:
        raise BackupError(f"{archive} is not a trackgate backup (not a tar archive)") from exc
    try:
        try:
            names = tar.getnames()
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            raise BackupError(f"{archive} is damaged ({exc}): it cannot be read") from exc
        if MANIFEST not in names:
            raise BackupError(f"{archive} is not a trackgate backup (it has no {MANIFEST})")
        text = _read_member(tar, MANIFEST)
        if MANIFEST_SUM in names:
            recorded = _read_member(tar, MANIFEST_SUM).decode(errors="replace").strip()
            if recorded != hashlib.sha256(text).hexdigest():
                raise BackupError(f"{archive}: {MANIFEST} does not match its checksum (tampered?)")
        try:
            manifest = json.loads(text)
        except ValueError as exc:
            raise BackupError(f"{archive}: {MANIFEST} is not valid JSON ({exc})") from exc
        if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
            raise BackupError(f"{archive} is not a trackgate backup (unknown manifest format)")
        got = manifest.get("format_version")
        if got != FORMAT_VERSION:
            newer = isinstance(got, int) and got > FORMAT_VERSION
            raise BackupError(
                f"{archive} has backup format version {got}; this trackgate ({__version__}) "
                f"reads version {FORMAT_VERSION}"
                + (": upgrade trackgate to restore it" if newer else "")
            )
        yield tar, manifest
    finally:
        tar.close()


def _read_member(tar: tarfile.TarFile, name: str) -> bytes:
    f = tar.extractfile(name)
    if f is None:
        raise BackupError(f"archive member {name} is not a file")
    return f.read()


def check_archive(archive: Path, *, say: Say = _quiet) -> tuple[dict[str, Any], list[str]]:
    """Read every member and compare its size and sha256 with the manifest.

    Returns (manifest, problems); an empty list means every checksum matched."""
    problems: list[str] = []
    with _open_archive(archive) as (tar, manifest), _disk_errors(f"reading {archive}"):
        expected: dict[str, dict[str, Any]] = manifest["members"]
        progress = _Progress("check", sum(m["size"] for m in expected.values()), say)
        seen = set()
        try:
            for info in tar.getmembers():
                if info.name in (MANIFEST, MANIFEST_SUM):
                    continue
                want = expected.get(info.name)
                if want is None:
                    problems.append(f"{info.name}: in the archive but not in the manifest")
                    continue
                seen.add(info.name)
                digest, size = _hash_member(tar, info, progress)
                if size != want["size"]:
                    problems.append(f"{info.name}: {size} bytes, the manifest says {want['size']}")
                elif digest != want["sha256"]:
                    problems.append(f"{info.name}: sha256 differs from the manifest (damaged)")
        except (tarfile.TarError, EOFError, zlib.error) as exc:
            problems.append(f"the archive is damaged: {exc}")
        for name in sorted(set(expected) - seen):
            problems.append(f"{name}: in the manifest but missing from the archive")
    return manifest, problems


def _hash_member(
    tar: tarfile.TarFile, info: tarfile.TarInfo, progress: _Progress
) -> tuple[str, int]:
    f = tar.extractfile(info)
    if f is None:
        return "", -1
    digest, size = hashlib.sha256(), 0
    while chunk := f.read(_CHUNK):
        digest.update(chunk)
        size += len(chunk)
        progress.add(len(chunk))
    return digest.hexdigest(), size


# --- restore ---------------------------------------------------------------------------------


@dataclass
class RestoreResult:
    data_dir: Path
    seconds: float
    bytes: int
    members: int
    manifest: dict[str, Any]
    notes: list[str] = field(default_factory=list)

    def summary(self) -> str:
        db = self.manifest["database"]
        runs = db["tables"].get("runs", {}).get("count", 0)
        arts = self.manifest["artifacts"]
        return (
            f"restore: {self.members} files ({human(self.bytes)}) into {self.data_dir} in "
            f"{self.seconds:.1f} s: {db['kind']} database ({runs} runs), {arts['files']} "
            f"artifact files ({human(arts['bytes'])}), users, TLS, settings; every checksum "
            "matched"
        )


@dataclass(frozen=True)
class _ObjectTarget:
    key: str  # in the target settings' bucket


def _targets(
    settings: Settings, manifest: dict[str, Any], bucket: _Bucket | None
) -> dict[str, Path | _ObjectTarget | None]:
    """Where each member goes (None: a member this target does not use). Artifacts go to the
    target's store whichever store they came from: a bucket's objects can land in a local
    directory (that is how verify serves them) and a directory's files in a bucket."""
    artifacts = _local_artifacts(settings)
    where: dict[str, Path | _ObjectTarget | None] = {}
    for name in manifest["members"]:
        rel = _safe_name(name)
        top, rest = rel.parts[0], PurePosixPath(*rel.parts[1:]) if len(rel.parts) > 1 else None
        if name == SQLITE_MEMBER:
            where[name] = settings.sqlite_path
        elif name == PG_MEMBER:
            where[name] = None  # pg_restore reads it from a temp file
        elif top in ("artifacts", BUCKET_TREE) and rest is not None:
            if bucket is not None:
                where[name] = _ObjectTarget(bucket.key(rest))
            else:
                assert artifacts is not None
                where[name] = artifacts / rest
        elif name == "users/htpasswd":
            where[name] = settings.htpasswd
        elif top == "tls" and rest is not None:
            where[name] = settings.tls_dir / rest
        elif name == "tls-custom/cert.pem":
            where[name] = settings.tls_cert
        elif name == "tls-custom/key.pem":
            where[name] = settings.tls_key
        elif top == "data" and rest is not None:
            where[name] = settings.data_dir / rest
        elif name == SETTINGS_MEMBER:
            where[name] = settings.data_dir / RESTORED_SETTINGS
        else:
            raise BackupError(f"unknown archive member {name!r}")
    return where


def _occupied(settings: Settings, manifest: dict[str, Any], bucket: _Bucket | None) -> list[str]:
    """What already exists where the restore would write."""
    found = []
    if settings.data_dir.is_dir():
        found += [p.name for p in sorted(settings.data_dir.iterdir())]
    elif settings.data_dir.exists():
        found.append(str(settings.data_dir))
    artifacts = _local_artifacts(settings)
    outside = artifacts is not None and not artifacts.is_relative_to(settings.data_dir)
    if outside and artifacts is not None and artifacts.is_dir() and any(artifacts.iterdir()):
        found.append(str(artifacts))
    if bucket is not None and bucket.occupied():
        found.append(f"objects under {bucket.where_text()}")
    if not settings.htpasswd.is_relative_to(settings.data_dir) and settings.htpasswd.exists():
        found.append(str(settings.htpasswd))
    if manifest["database"]["kind"] == "postgresql" and _pg_has_tables(settings):
        found.append(f"tables in {_redact(settings.database_uri)}")
    return found


def _pg_has_tables(settings: Settings) -> bool:
    import sqlalchemy

    engine = sqlalchemy.create_engine(settings.database_uri)
    try:
        with engine.connect() as conn:
            return bool(sqlalchemy.inspect(conn).get_table_names())
    except sqlalchemy.exc.OperationalError as exc:
        raise BackupError(f"cannot reach the database: {exc.orig}") from exc
    finally:
        engine.dispose()


def _check_compatible(settings: Settings, manifest: dict[str, Any]) -> None:
    kind = manifest["database"]["kind"]
    target = "sqlite" if settings.sqlite_path is not None else "postgresql"
    if kind != target:
        raise BackupError(
            f"the backup holds a {kind} database but these settings use {target} "
            f"({ENV_PREFIX}BACKEND_STORE_URI): restore into a {kind} store"
        )
    revision = manifest["database"].get("schema_revision")
    if revision:
        from alembic.script import ScriptDirectory
        from alembic.util.exc import CommandError
        from mlflow.store.db.utils import _get_alembic_config

        script = ScriptDirectory.from_config(_get_alembic_config(settings.database_uri))
        try:
            known = script.get_revision(revision) is not None
        except CommandError:
            known = False
        if not known:
            raise BackupError(
                f"the backup's database schema ({revision}) comes from a newer MLflow "
                f"({manifest.get('mlflow_version')}) than this one ({_dist_version('mlflow')}): "
                f"install mlflow=={manifest.get('mlflow_version')} to restore it"
            )


def restore(
    settings: Settings,
    archive: Path,
    *,
    force: bool = False,
    say: Say = _quiet,
    _checked: dict[str, Any] | None = None,
) -> RestoreResult:
    """Lay the archive down into the settings' data dir (and database), after checking every
    checksum. Refuses a non-empty target unless `force`, and a running stack always."""
    from .local import stack

    started = time.monotonic()
    archive = Path(archive)
    if _checked is None:
        manifest, problems = check_archive(archive, say=say)
        if problems:
            raise BackupError(
                f"{archive} failed its checks, nothing was restored: "
                + "; ".join(problems[:5])
                + (f" (and {len(problems) - 5} more)" if len(problems) > 5 else "")
            )
    else:
        manifest = _checked
    _check_compatible(settings, manifest)
    if stack.running_pid(settings) is not None:
        raise BackupError(
            f"trackgate is running in {settings.data_dir}: stop it first (`trackgate down`)"
        )
    bucket = _bucket(settings)
    with _disk_errors(f"inspecting {settings.data_dir}"):
        occupied = _occupied(settings, manifest, bucket)
    if occupied and not force:
        shown = ", ".join(occupied[:4]) + (" ..." if len(occupied) > 4 else "")
        if bucket is None:
            raise BackupError(
                f"{settings.data_dir} is not empty ({shown}): restore into an empty data dir, "
                "or add --force to replace its database, artifacts, users, TLS files and settings"
            )
        raise BackupError(
            f"the restore target is not empty ({shown}): restore into an empty data dir "
            f"({settings.data_dir}), database and bucket prefix, or add --force to replace its "
            "database, users, TLS files, settings and every object under the prefix"
        )
    where = _targets(settings, manifest, bucket)
    notes: list[str] = []
    total = sum(m["size"] for m in manifest["members"].values())
    progress = _Progress("restore", total, say)
    try:
        with _disk_errors(f"restoring into {settings.data_dir}"):
            _lay_down(settings, archive, manifest, where, bucket, progress, notes, force=force)
    except BaseException:
        if not occupied:  # it was empty: leave it empty, so a second try needs no --force
            _empty(settings, bucket)
        raise
    notes += _settings_notes(settings, manifest, settings.data_dir / RESTORED_SETTINGS)
    return RestoreResult(
        settings.data_dir,
        time.monotonic() - started,
        total,
        len(manifest["members"]),
        manifest,
        notes,
    )


def _empty(settings: Settings, bucket: _Bucket | None) -> None:
    if settings.data_dir.is_dir():
        for entry in settings.data_dir.iterdir():
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)
    artifacts = _local_artifacts(settings)
    if (
        artifacts is not None
        and not artifacts.is_relative_to(settings.data_dir)
        and artifacts.is_dir()
    ):
        shutil.rmtree(artifacts, ignore_errors=True)
    if bucket is not None:
        with contextlib.suppress(BackupError):  # the store may be what failed
            bucket.delete_all()
    if not settings.htpasswd.is_relative_to(settings.data_dir):
        settings.htpasswd.unlink(missing_ok=True)


def _lay_down(
    settings: Settings,
    archive: Path,
    manifest: dict[str, Any],
    where: dict[str, Path | _ObjectTarget | None],
    bucket: _Bucket | None,
    progress: _Progress,
    notes: list[str],
    *,
    force: bool,
) -> None:
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    os.chmod(settings.data_dir, 0o700)
    if force:
        _clear_for_restore(settings, manifest, bucket)
    pg_dump_file: Path | None = None
    with _open_archive(archive) as (tar, _manifest):
        for info in tar.getmembers():
            if info.name in (MANIFEST, MANIFEST_SUM):
                continue
            want = manifest["members"][info.name]
            dest = where[info.name]
            if info.name == PG_MEMBER:
                pg_dump_file = settings.data_dir / ".restore.pgdump"
                dest = pg_dump_file
            if dest is None:
                notes.append(f"{info.name} not restored: these settings do not use it")
                continue
            if isinstance(dest, _ObjectTarget):
                assert bucket is not None
                _upload(tar, info, bucket, dest.key, want, progress)
                continue
            _extract(tar, info, dest, want, progress, gunzip=info.name == SQLITE_MEMBER)
    if pg_dump_file is not None:
        try:
            _pg_restore(settings, pg_dump_file, clean=force)
        finally:
            pg_dump_file.unlink(missing_ok=True)
    _give_to_service_account(settings)


def _give_to_service_account(settings: Settings) -> None:
    """As root, the restored files belong to the account the servers run as (as after `up`)."""
    name = getattr(settings, "service_user", None)
    if not name or not accounts.running_as_root():
        return
    account = accounts.ensure_system_account(name)
    accounts.give_to(account, settings.data_dir)
    # The data dir's settings file is trusted only when root (or the caller) owns it.
    own = settings.data_dir / _SETTINGS_FILE
    if own.is_file():
        os.chown(own, os.geteuid(), os.getegid())
    artifacts = _local_artifacts(settings)
    if (
        artifacts is not None
        and artifacts.is_dir()
        and not artifacts.is_relative_to(settings.data_dir)
    ):
        accounts.give_to(account, artifacts)


def _clear_for_restore(
    settings: Settings, manifest: dict[str, Any], bucket: _Bucket | None
) -> None:
    """--force: remove what the archive replaces, so the result is the archive, not a mix."""
    artifacts = _local_artifacts(settings)
    if artifacts is not None:
        shutil.rmtree(artifacts, ignore_errors=True)
    if bucket is not None:
        bucket.delete_all()
    shutil.rmtree(settings.tls_dir, ignore_errors=True)
    sqlite_file = settings.sqlite_path
    if sqlite_file is not None:
        for suffix in ("", "-wal", "-shm", "-journal"):
            Path(f"{sqlite_file}{suffix}").unlink(missing_ok=True)
    settings.htpasswd.unlink(missing_ok=True)


_PART = 16 * _CHUNK  # S3 multipart part size: the most of one object held in memory


def _upload(
    tar: tarfile.TarFile,
    info: tarfile.TarInfo,
    bucket: _Bucket,
    key: str,
    want: dict[str, Any],
    progress: _Progress,
) -> None:
    """Stream one member into the target bucket, one part at a time (bounded memory: boto3's
    own uploader buffers several parts of a non-seekable stream), hashing it on the way."""
    src = tar.extractfile(info)
    if src is None:
        raise BackupError(f"archive member {info.name} is not a file")
    client, name = bucket.client, bucket.bucket
    extra = {"ContentType": want["content_type"]} if want.get("content_type") else {}
    digest = hashlib.sha256()

    def part() -> bytes:
        data = src.read(_PART)
        digest.update(data)
        progress.add(len(data))
        return data

    with bucket.errors():
        first = part()
        if len(first) < _PART:  # one request
            client.put_object(Bucket=name, Key=key, Body=first, **extra)
        else:
            upload = client.create_multipart_upload(Bucket=name, Key=key, **extra)["UploadId"]
            try:
                parts, data, number = [], first, 1
                while data:
                    tag = client.upload_part(
                        Bucket=name, Key=key, UploadId=upload, PartNumber=number, Body=data
                    )["ETag"]
                    parts.append({"ETag": tag, "PartNumber": number})
                    data, number = part(), number + 1
                client.complete_multipart_upload(
                    Bucket=name, Key=key, UploadId=upload, MultipartUpload={"Parts": parts}
                )
            except BaseException:
                with contextlib.suppress(Exception):
                    client.abort_multipart_upload(Bucket=name, Key=key, UploadId=upload)
                raise
        if digest.hexdigest() != want["sha256"]:
            client.delete_object(Bucket=name, Key=key)
            raise BackupError(f"{info.name} changed since it was checked; nothing more restored")


def _extract(
    tar: tarfile.TarFile,
    info: tarfile.TarInfo,
    dest: Path,
    want: dict[str, Any],
    progress: _Progress,
    *,
    gunzip: bool,
) -> None:
    src = tar.extractfile(info)
    if src is None:
        raise BackupError(f"archive member {info.name} is not a file")
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.restoring")
    digest = hashlib.sha256()
    inflate = zlib.decompressobj(wbits=31) if gunzip else None
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                progress.add(len(chunk))
                out.write(inflate.decompress(chunk) if inflate else chunk)
            if inflate is not None:
                out.write(inflate.flush())
        if digest.hexdigest() != want["sha256"]:
            raise BackupError(f"{info.name} changed since it was checked; nothing more restored")
        os.chmod(tmp, info.mode & 0o777 or 0o600)
        os.replace(tmp, dest)
    finally:
        tmp.unlink(missing_ok=True)
    if gunzip:  # a stale WAL beside a new database file would be replayed into it
        for suffix in ("-wal", "-shm", "-journal"):
            Path(f"{dest}{suffix}").unlink(missing_ok=True)


def _pg_restore(settings: Settings, dump: Path, *, clean: bool) -> None:
    _need("pg_restore")
    argv = ["pg_restore", "--no-owner", "--exit-on-error"]
    if clean:
        argv += ["--clean", "--if-exists"]
    argv += [f"--dbname={_libpq(settings.database_uri)}", str(dump)]
    result = subprocess.run(argv, capture_output=True, text=True)
    if result.returncode != 0:
        raise BackupError(f"pg_restore failed: {result.stderr.strip()}")


_SETTINGS_THAT_MATTER = ("HOSTNAME", "EXTRA_HOSTNAMES", "HTTPS_PORT", "TLS_CERT", "TLS_KEY")


def _settings_notes(settings: Settings, manifest: dict[str, Any], path: Path) -> list[str]:
    try:
        archived = dict(line.split("=", 1) for line in path.read_text().splitlines() if "=" in line)
    except OSError:
        return []
    current = settings.to_env()
    notes = []
    for name in _SETTINGS_THAT_MATTER:
        key = ENV_PREFIX + name
        if archived.get(key, "") != current.get(key, ""):
            notes.append(
                f"the backup was made with {key}={archived.get(key, '(unset)')}; these settings "
                f"have {current.get(key, '(unset)')} (the archived values are in {path})"
            )
    return notes


# --- verify ----------------------------------------------------------------------------------


@dataclass
class VerifyResult:
    archive: Path
    differences: list[str]
    checked: list[str]
    seconds: float
    compared_live: bool

    @property
    def ok(self) -> bool:
        return not self.differences

    def summary(self) -> str:
        what = "manifest and live server" if self.compared_live else "manifest"
        if self.ok:
            return (
                f"verify: {self.archive} is good: restored, served and identical to the {what} "
                f"({'; '.join(self.checked)}) in {self.seconds:.1f} s"
            )
        return (
            f"verify: {self.archive}: {len(self.differences)} differences "
            f"(compared with the {what}) in {self.seconds:.1f} s"
        )


def _scratch_settings(
    settings: Settings, root: Path, sockets: Path, database_uri: str | None
) -> Settings:
    """Every path and port explicit, so nothing of the live stack's environment leaks in."""
    data = root / "data"
    values: dict[str, Any] = {
        "data_dir": data,
        "hostname": "localhost",
        "extra_hostnames": [],
        "listen_address": "127.0.0.1",
        "listen_ipv6": False,
        "internal_host": "127.0.0.1",
        "internal_transport": "unix",
        "socket_dir": sockets,
        "http_port": any_free_port(),
        "https_port": any_free_port(),
        "tracking_port": any_free_port(),
        "gateway_port": any_free_port(),
        # Not the live stack's metrics ports (by default 9180/9181, taken while it runs).
        "metrics_port": any_free_port(),
        "nginx_exporter_port": any_free_port(),
        "tracking_upstream": None,
        "gateway_upstream": None,
        # Every path derived from the scratch data dir (None: the settings' own default).
        "backend_store_uri": database_uri,
        "artifacts_destination": None,
        "htpasswd_path": None,
        "tls_cert": None,
        "tls_key": None,
        "log_dir": None,
        "nginx_run_dir": None,
        "serving_locations_dir": None,
        "nginx_binary": settings.nginx_binary,
        "service_user": getattr(settings, "service_user", None),
        "trusted_proxies": [],
        "workers": 1,
        "bcrypt_rounds": 4,
    }
    known = Settings.model_fields
    return Settings(**{k: v for k, v in values.items() if k in known})


@contextlib.contextmanager
def _isolated_environment(cwd: Path) -> Iterator[None]:
    """No TRACKGATE_* variable of the caller reaches the scratch stack's processes (which get
    every setting that matters explicitly), and they run from the scratch dir."""
    saved = {k: v for k, v in os.environ.items() if k.startswith(ENV_PREFIX)}
    old_cwd = Path.cwd()
    for key in saved:
        del os.environ[key]
    os.chdir(cwd)
    try:
        yield
    finally:
        os.chdir(old_cwd)
        os.environ.update(saved)


@contextlib.contextmanager
def _scratch_database(settings: Settings, kind: str) -> Iterator[str | None]:
    """sqlite: None (a file in the scratch dir); PostgreSQL: a new database beside the live
    one, dropped afterwards."""
    if kind == "sqlite":
        yield None
        return
    if settings.sqlite_path is not None:
        raise BackupError(
            "verifying a PostgreSQL backup needs a PostgreSQL server: set "
            f"{ENV_PREFIX}BACKEND_STORE_URI to one (a scratch database is created beside it)"
        )
    import sqlalchemy
    from sqlalchemy.engine import make_url

    url = make_url(settings.database_uri)
    name = f"{url.database}_verify_{secrets.token_hex(4)}"
    admin = sqlalchemy.create_engine(url, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as conn:
            conn.exec_driver_sql(f'CREATE DATABASE "{name}"')
    except sqlalchemy.exc.SQLAlchemyError as exc:
        admin.dispose()
        raise BackupError(
            f"cannot create a scratch database for the check ({exc}): the database user "
            "needs CREATEDB"
        ) from exc
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        with contextlib.suppress(sqlalchemy.exc.SQLAlchemyError), admin.connect() as conn:
            conn.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.dispose()


def _compare_tables(
    label: str, expected: dict[str, dict[str, Any]], got: dict[str, dict[str, Any]]
) -> list[str]:
    out = []
    for table in sorted(set(expected) | set(got)):
        e, g = expected.get(table), got.get(table)
        if e is None or g is None:
            out.append(f"table {table}: only in the {'restored' if e is None else label} copy")
        elif e["count"] != g["count"]:
            out.append(f"table {table}: {g['count']} rows restored, {label} has {e['count']}")
        elif e["sha256"] != g["sha256"]:
            out.append(f"table {table}: same {e['count']} rows counted, different content")
    return out


def _row_differences(restored_uri: str, live_uri: str, tables: list[str]) -> list[str]:
    """For tables that differ: how many rows only one side has, with a few examples."""
    out = []
    with _Db(restored_uri) as restored, _Db(live_uri) as live:
        for table in tables:
            try:
                a, b = restored.row_set(table), live.row_set(table)
            except Exception:
                continue
            only_backup, only_live = a - b, b - a
            for side, rows in (("backup", only_backup), ("live server", only_live)):
                if rows:
                    shown = [r.decode().strip()[:160] for r in list(rows.elements())[:3]]
                    out.append(
                        f"table {table}: {sum(rows.values())} rows only in the {side}, e.g. "
                        + " | ".join(shown)
                    )
    return out


class _Api:
    """The restored stack's REST API, through nginx, as a throwaway user."""

    def __init__(self, settings: Settings, user: str, password: str) -> None:
        import requests

        self.base = settings.public_url
        self.session = requests.Session()
        self.session.auth = (user, password)
        # Per request: a session-level `verify` loses to REQUESTS_CA_BUNDLE in requests.
        self.verify = str(settings.ca_cert)

    def call(self, method: str, path: str, **kwargs: Any) -> Any:
        answer = self.session.request(
            method, self.base + path, timeout=60, verify=self.verify, **kwargs
        )
        if answer.status_code != 200:
            raise BackupError(f"the restored server answered {answer.status_code} to {path}")
        return answer

    def pages(self, method: str, path: str, key: str, body: dict[str, Any]) -> list[Any]:
        items, token = [], None
        while True:
            query = {**body, **({"page_token": token} if token else {})}
            if method == "GET":
                data = self.call("GET", path, params=query).json()
            else:
                data = self.call("POST", path, json=query).json()
            items += data.get(key, [])
            token = data.get("next_page_token")
            if not token:
                return items


def _check_served(
    scratch: Settings, manifest: dict[str, Any], user: str, password: str
) -> tuple[list[str], list[str]]:
    """Counts through the API and artifact bytes through nginx, against the manifest."""
    api = _Api(scratch, user, password)
    tables = manifest["database"]["tables"]
    problems, checked = [], []
    experiments = api.pages(
        "POST",
        "/api/2.0/mlflow/experiments/search",
        "experiments",
        {"max_results": 1000, "view_type": "ALL"},
    )
    runs = 0
    ids = [e["experiment_id"] for e in experiments]
    for i in range(0, len(ids), 100):
        runs += len(
            api.pages(
                "POST",
                "/api/2.0/mlflow/runs/search",
                "runs",
                {"experiment_ids": ids[i : i + 100], "max_results": 1000, "run_view_type": "ALL"},
            )
        )
    models = api.pages(
        "GET",
        "/api/2.0/mlflow/registered-models/search",
        "registered_models",
        {"max_results": 1000},
    )
    served = {"experiments": len(experiments), "runs": runs, "registered_models": len(models)}
    for table, count in served.items():
        want = tables.get(table, {}).get("count", 0)
        if count != want:
            problems.append(f"the restored server lists {count} {table}, the manifest {want}")
    checked.append(
        f"{served['experiments']} experiments, {runs} runs, {len(models)} registered models "
        "listed through the API"
    )
    artifacts = sorted(
        (name, m) for name, m in manifest["members"].items() if m["role"] == "artifact"
    )
    step = max(1, len(artifacts) // 25)
    sample = artifacts[::step][:25]
    for name, want in sample:
        rel = _artifact_path(name)
        answer = api.session.get(
            f"{api.base}/api/2.0/mlflow-artifacts/artifacts/{rel}",
            stream=True,
            timeout=600,
            verify=api.verify,
        )
        digest = hashlib.sha256()
        if answer.status_code == 200:
            for chunk in answer.iter_content(_CHUNK):
                digest.update(chunk)
        answer.close()
        if answer.status_code != 200:
            problems.append(f"artifact {rel}: the restored server answered {answer.status_code}")
        elif digest.hexdigest() != want["sha256"]:
            problems.append(f"artifact {rel}: the restored server sent different bytes")
    if sample:
        checked.append(f"{len(sample)} artifacts downloaded through nginx, same sha256")
    return problems, checked


def verify(
    settings: Settings,
    archive: Path,
    *,
    say: Say = _quiet,
    scratch_root: Path | None = None,
    compare_live: bool = True,
) -> VerifyResult:
    """Check the archive, restore it into a scratch dir, serve it on free ports, and compare
    what it serves with the manifest and (when the stack runs) with the live database."""
    with _disk_errors(f"verifying {archive}"):
        return _verify(settings, Path(archive), say, scratch_root, compare_live)


def _verify(
    settings: Settings,
    archive: Path,
    say: Say,
    scratch_root: Path | None,
    compare_live: bool,
) -> VerifyResult:
    from .local import stack
    from .users import HtpasswdStore

    started = time.monotonic()
    archive = Path(archive)
    manifest, problems = check_archive(archive, say=say)
    if problems:
        return VerifyResult(archive, problems, [], time.monotonic() - started, False)
    checked = [f"{len(manifest['members'])} member checksums"]
    differences: list[str] = []
    live = stack.recorded_settings(settings) if stack.running_pid(settings) else None
    kind = manifest["database"]["kind"]
    root = Path(tempfile.mkdtemp(prefix="trackgate-verify-", dir=scratch_root))
    # Unix socket paths are short (107 bytes): the scratch stack's sockets live in /tmp.
    sockets = Path(tempfile.mkdtemp(prefix="trackgate-verify-"))
    for path in (root, sockets):
        os.chmod(path, 0o711)  # as root, the service account must pass through (x only)
    try:
        with _scratch_database(live or settings, kind) as scratch_uri:
            scratch = _scratch_settings(settings, root, sockets / "s", scratch_uri)
            say(f"verify: restoring into {root} ...")
            restore(scratch, archive, say=say, _checked=manifest)
            restored = content_summary(scratch.database_uri)
            differences += _compare_tables("manifest", manifest["database"]["tables"], restored)
            checked.append(f"{len(restored)} tables against the manifest")
            user, password = "trackgate-verify", secrets.token_urlsafe(18)
            HtpasswdStore(scratch.htpasswd, scratch.bcrypt_rounds).ensure(user, password)
            say(f"verify: starting the restored stack at {scratch.public_url} ...")
            try:
                with _isolated_environment(root):
                    stack.up(scratch)
                served, served_checked = _check_served(scratch, manifest, user, password)
                differences += served
                checked += served_checked
            except Exception as exc:  # any reason it cannot serve is a failed verify
                differences.append(f"the restored stack did not start or answer: {exc}")
            finally:
                stack.down(scratch)
            if live is not None and compare_live:
                say("verify: comparing with the live database ...")
                live_uri = live.database_uri
                if live.sqlite_path is not None:
                    # Read an online copy: a long read of the live file could hold up writers.
                    live_uri = f"sqlite:///{database.backup(live, root / 'live.db')}"
                live_tables = content_summary(live_uri)
                table_diffs = _compare_tables("live server", live_tables, restored)
                differences += table_diffs
                differing = [d.split(":")[0].removeprefix("table ") for d in table_diffs]
                differences += _row_differences(scratch.database_uri, live_uri, differing)
                checked.append("the live database")
    finally:
        shutil.rmtree(root, ignore_errors=True)
        shutil.rmtree(sockets, ignore_errors=True)
    return VerifyResult(
        archive, differences, checked, time.monotonic() - started, live is not None and compare_live
    )
