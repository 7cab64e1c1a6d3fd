"""Artifacts in an S3 object store (a real SeaweedFS), every byte still through trackgate's proxy
and auth: the server advertises no multipart/presigned transfers, so clients need no S3 keys and
no route to the store; a bad endpoint, wrong keys or a missing bucket stop the start with one
clear line. One stack for the module."""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from .infra.seaweedfs import ObjectStore, seaweedfs
from .support import RunningStack, free_port, patched_environ, running_stack, trackgate

PREFIX = "team-a/artifacts"
MIB = 1024**2
GIB = 1024**3


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ObjectStore]:
    with seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as running:
        yield running


@pytest.fixture(scope="module")
def s3_stack(store: ObjectStore, tmp_path_factory: pytest.TempPathFactory
             ) -> Iterator[RunningStack]:
    root = tmp_path_factory.mktemp("s3-stack")
    os.chmod(root, 0o711)
    # The keys from a secrets file (mode 600), not the environment: the client side of this
    # process has none.
    keys = store.write_credentials_file(root / "s3-credentials")
    with running_stack(root / "data", artifacts_destination=f"s3://{store.bucket}/{PREFIX}",
                       s3_endpoint_url=store.endpoint, s3_credentials_file=keys) as running:
        yield running


@pytest.fixture
def as_admin(s3_stack: RunningStack) -> Iterator[None]:
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(os.environ), "no S3 keys"
    with patched_environ(s3_stack.client_env()):
        yield


def _bucket_keys(store: ObjectStore) -> dict[str, int]:
    client = store.client()
    found: dict[str, int] = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=store.bucket,
                                                                  Prefix=PREFIX):
        found.update({o["Key"]: o["Size"] for o in page.get("Contents", [])})
    return found


def _nginx_log(stack: RunningStack) -> str:
    assert stack.settings.logs is not None
    return (stack.settings.logs / "nginx-access.log").read_text(errors="replace")


def test_server_advertises_no_direct_transfers_to_the_store(s3_stack: RunningStack) -> None:
    auth = ("admin", s3_stack.admin_password)
    info = s3_stack.get("/api/3.0/mlflow/server-info", auth=auth).json()
    assert info["multipart_uploads_enabled"] is False
    assert info["multipart_downloads_enabled"] is False
    # Asked anyway (an old or hostile client), every presigned/multipart endpoint declines and
    # no answer names the store.
    asks = [
        ("POST", "/api/2.0/mlflow-artifacts/mpu/create/1/x/big.bin",
         {"json": {"path": "big.bin", "num_parts": 2}}),
        ("GET", "/api/2.0/mlflow-artifacts/presigned/1/x/big.bin", {}),
        ("POST", "/api/2.0/mlflow/artifacts/presigned-download-url",
         {"json": {"path": "x/big.bin"}}),
    ]
    for method, path, kwargs in asks:
        answer = s3_stack.request(method, path, auth=auth, **kwargs)
        assert answer.status_code >= 400, (path, answer.status_code, answer.text)
        assert "127.0.0.1" not in answer.text and "X-Amz" not in answer.text, answer.text


def test_artifacts_land_in_the_bucket_and_come_back_through_the_proxy(
        s3_stack: RunningStack, store: ObjectStore, as_admin: None, tmp_path: Path) -> None:
    blob = tmp_path / "weights.bin"
    blob.write_bytes(os.urandom(3 * MIB))
    # A client that insists on multipart/presigned transfers still gets the proxy.
    greedy = {"MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD": "true",
              "MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE": str(MIB),
              "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "true"}
    with patched_environ(greedy), mlflow.start_run() as run:
        mlflow.log_artifact(str(blob), artifact_path="model")
        mlflow.log_text("hello", "notes/readme.txt")
    keys = _bucket_keys(store)
    stored = [k for k in keys if k.endswith(f"{run.info.run_id}/artifacts/model/weights.bin")]
    assert stored and keys[stored[0]] == 3 * MIB, keys
    with patched_environ(greedy):
        fetched = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="model/weights.bin", dst_path=str(tmp_path / "d"))
    assert Path(fetched).read_bytes() == blob.read_bytes()
    names = {f.path for f in MlflowClient().list_artifacts(run.info.run_id)}
    assert names == {"model", "notes"}
    log = _nginx_log(s3_stack)
    path = f"{run.info.run_id}/artifacts/model/weights.bin"
    assert re.search(rf'"PUT /api/2.0/mlflow-artifacts/artifacts/\S*{path} HTTP/[\d.]+" 200', log)
    assert re.search(rf'"GET /api/2.0/mlflow-artifacts/artifacts/\S*{path} HTTP/[\d.]+" 200 '
                     rf'{3 * MIB} ', log), "the download came through nginx, whole"


def test_artifacts_need_a_login(s3_stack: RunningStack, as_admin: None) -> None:
    with mlflow.start_run() as run:
        mlflow.log_text("secret", "private.txt")
    path = f"/api/2.0/mlflow-artifacts/artifacts/0/{run.info.run_id}/artifacts/private.txt"
    assert s3_stack.get(path).status_code == 401
    answer = s3_stack.get(path, auth=("admin", s3_stack.admin_password))
    assert answer.status_code == 200 and answer.text == "secret"
    assert answer.headers["Content-Disposition"].startswith("attachment")


@pytest.mark.parametrize("problem", ["missing bucket", "wrong keys", "no store there"])
def test_a_bad_object_store_stops_the_start_with_one_line(
        problem: str, store: ObjectStore, tmp_path: Path) -> None:
    env = {"TRACKGATE_DATA_DIR": str(tmp_path / "data"), "TRACKGATE_HTTPS_PORT": str(free_port()),
           "TRACKGATE_HTTP_PORT": str(free_port()), "TRACKGATE_LISTEN_ADDRESS": "127.0.0.1",
           "TRACKGATE_ARTIFACTS_DESTINATION": f"s3://{store.bucket}/x",
           "TRACKGATE_S3_ENDPOINT_URL": store.endpoint, **store.keys_env}
    expected = {"missing bucket": "bucket 'nosuch' does not exist",
                "wrong keys": "refused the S3 keys",
                "no store there": "cannot reach the S3 endpoint"}[problem]
    if problem == "missing bucket":
        env["TRACKGATE_ARTIFACTS_DESTINATION"] = "s3://nosuch/x"
    elif problem == "wrong keys":
        env["AWS_SECRET_ACCESS_KEY"] = "not-" + store.secret_key
    else:
        env["TRACKGATE_S3_ENDPOINT_URL"] = f"http://127.0.0.1:{free_port()}"
    for command in (["up"], ["serve", "tracking"]):
        result = trackgate(*command, env=env, timeout=120)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr, result.stderr
    assert not (tmp_path / "data" / "run" / "supervisor.pid").exists()


def test_malformed_s3_settings_are_refused(tmp_path: Path) -> None:
    for name, value in (("TRACKGATE_ARTIFACTS_DESTINATION", "s3:/bucket"),
                        ("TRACKGATE_S3_ENDPOINT_URL", "127.0.0.1:8333")):
        result = trackgate("config", env={"TRACKGATE_DATA_DIR": str(tmp_path), name: value})
        assert result.returncode == 2 and name in result.stderr, result.stderr


def test_a_credentials_file_others_can_read_is_refused(store: ObjectStore,
                                                       tmp_path: Path) -> None:
    keys = tmp_path / "keys"
    keys.write_text("".join(f"{k}={v}\n" for k, v in store.keys_env.items()))
    keys.chmod(0o644)
    env = {"TRACKGATE_DATA_DIR": str(tmp_path / "data"),
           "TRACKGATE_ARTIFACTS_DESTINATION": f"s3://{store.bucket}/x",
           "TRACKGATE_S3_ENDPOINT_URL": store.endpoint,
           "TRACKGATE_S3_CREDENTIALS_FILE": str(keys)}
    result = trackgate("serve", "tracking", env=env, timeout=120)
    assert result.returncode == 1 and "chmod 600" in result.stderr, result.stderr


def _numbered_blocks(path: Path, size: int) -> str:
    base = os.urandom(MIB - 8)
    digest = hashlib.sha256()
    with open(path, "wb") as out:
        for i in range(size // MIB):
            block = base + i.to_bytes(8, "big")
            out.write(block)
            digest.update(block)
    return digest.hexdigest()


@pytest.mark.slow
def test_one_gigabyte_artifact_goes_through_the_proxy_into_the_bucket_and_back(
        s3_stack: RunningStack, store: ObjectStore, as_admin: None, tmp_path: Path) -> None:
    """MLflow's client defaults: it asks the server which transfers it offers (above 500 MB it
    would upload in presigned parts straight to S3, and download every file from S3)."""
    source = tmp_path / "big.bin"
    expected = _numbered_blocks(source, GIB)
    try:
        with mlflow.start_run() as run:
            mlflow.log_artifact(str(source), artifact_path="big")
        source.unlink()
        keys = _bucket_keys(store)
        assert [k for k, size in keys.items() if k.endswith("big/big.bin") and size == GIB]
        fetched = Path(mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="big/big.bin", dst_path=str(tmp_path)))
        digest = hashlib.sha256()
        with open(fetched, "rb") as f:
            while chunk := f.read(8 * MIB):
                digest.update(chunk)
        assert digest.hexdigest() == expected
        log = _nginx_log(s3_stack)
        path = f"{run.info.run_id}/artifacts/big/big.bin"
        assert re.search(rf'"PUT /api/2.0/mlflow-artifacts/artifacts/\S*{path} HTTP/[\d.]+" 200',
                         log), "the upload went through nginx"
        assert re.search(rf'"GET /api/2.0/mlflow-artifacts/artifacts/\S*{path} HTTP/[\d.]+" 200 '
                         rf'{GIB} ', log), "the whole download went through nginx"
    finally:
        for path in tmp_path.rglob("big.bin"):
            path.unlink()
        for key in _bucket_keys(store):
            if key.endswith("big/big.bin"):
                store.client().delete_object(Bucket=store.bucket, Key=key)
