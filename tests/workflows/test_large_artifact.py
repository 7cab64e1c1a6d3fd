"""A 1 GB artifact round-trips through the proxy (nginx streams it; no size cap, no buffering)."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import mlflow
import pytest

from ..support import RunningStack

GIB = 1024**3
BLOCK = 1024**2


def _write_numbered_blocks(path: Path, size: int) -> str:
    """`size` bytes of random data whose 1 MB blocks all differ (a reorder changes the hash)."""
    base = os.urandom(BLOCK - 8)
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for i in range(size // BLOCK):
            block = base + i.to_bytes(8, "big")
            out.write(block)
            digest.update(block)
    return digest.hexdigest()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(8 * BLOCK):
            digest.update(chunk)
    return digest.hexdigest()


@pytest.mark.slow
def test_one_gigabyte_artifact_round_trips_through_the_proxy(
        stack: RunningStack, exported_credentials: None, tmp_path: Path) -> None:
    source = tmp_path / "weights.bin"
    expected = _write_numbered_blocks(source, GIB)
    with mlflow.start_run() as run:
        mlflow.log_artifact(str(source), artifact_path="big")
    stored = Path(stack.settings.artifacts_uri)
    try:
        source.unlink()  # keep at most two copies on disk at once
        fetched = Path(mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="big/weights.bin", dst_path=str(tmp_path)))
        assert fetched.stat().st_size == GIB
        assert _sha256(fetched) == expected
    finally:
        # A GB per copy is too much to leave behind in the server's store and pytest's tmp.
        for path in [*stored.rglob("weights.bin"), *tmp_path.rglob("weights.bin")]:
            path.unlink()
