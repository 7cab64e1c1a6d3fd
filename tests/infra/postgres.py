"""A throwaway PostgreSQL cluster for tests: Debian's postgresql 15 binaries on a free loopback
port, scram-sha-256 over TCP, a login role and the databases asked for. Stopped on exit."""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from ..support import free_port

PG_BIN = Path("/usr/lib/postgresql/15/bin")


@dataclass
class Cluster:
    port: int
    user: str
    password: str
    data: Path | None = None  # the cluster's data directory (postmaster.pid is there)

    def uri(self, database: str) -> str:
        return f"postgresql+psycopg2://{self.user}:{self.password}@127.0.0.1:{self.port}/{database}"


def _as_postgres(*argv: str) -> None:
    subprocess.run(["su", "postgres", "-c", " ".join(argv)], check=True, capture_output=True)


@contextmanager
def postgres_cluster(*databases: str) -> Iterator[Cluster]:
    if not (PG_BIN / "initdb").exists() or os.geteuid() != 0:
        pytest.skip("needs root and Debian's postgresql 15 (apt-get install postgresql)")
    root = Path(tempfile.mkdtemp(prefix="trackgate-pg-"))
    os.chmod(root, 0o755)
    shutil.chown(root, "postgres", "postgres")
    port = free_port()
    data, sock = root / "data", root / "sock"
    _as_postgres(f"{PG_BIN}/initdb -D {data} -E UTF8 --auth-local=peer --auth-host=scram-sha-256")
    _as_postgres("mkdir", str(sock))
    options = f"-p {port} -k {sock} -c listen_addresses=127.0.0.1"
    _as_postgres(f"{PG_BIN}/pg_ctl -D {data} -l {root / 'pg.log'} -w -o '{options}' start")
    try:
        found = Cluster(port, "trackgate", secrets.token_hex(12), data)
        psql = f"{PG_BIN}/psql -h {sock} -p {port} -d postgres -v ON_ERROR_STOP=1"
        _as_postgres(
            psql, "-c", f"\"CREATE ROLE {found.user} LOGIN CREATEDB PASSWORD '{found.password}'\""
        )
        for name in databases:
            _as_postgres(psql, "-c", f'"CREATE DATABASE {name} OWNER {found.user}"')
        yield found
    finally:
        _as_postgres(f"{PG_BIN}/pg_ctl", "-D", str(data), "-m", "fast", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)
