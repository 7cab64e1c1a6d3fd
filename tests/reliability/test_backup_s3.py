"""Backup, verify and restore of a stack on PostgreSQL + an S3 bucket (a real SeaweedFS): the
database dump and every object under the destination's prefix in one archive, checked member by
member, restored into an empty database and an empty prefix, and read back through the MLflow
client identical (every metric step, every artifact byte). One PostgreSQL cluster, one
SeaweedFS and one live stack for the module."""

from __future__ import annotations

import hashlib
import os
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from click.testing import CliRunner
from trackgate import backup
from trackgate.cli import cli
from trackgate.local import stack as stack_module

from ..infra.postgres import Cluster, postgres_cluster
from ..infra.seaweedfs import ObjectStore, seaweedfs
from ..support import RunningStack, free_port, running_stack, stack_settings
from .archives import tampered_copy
from .mlflow_content import content, mlflow_env, populate

pytestmark = pytest.mark.reliability


@dataclass
class Live:
    stack: RunningStack
    cluster: Cluster
    store: ObjectStore
    keys: Path  # the S3 credentials file (mode 600)
    archive: backup.BackupResult


def _keys_file(path: Path, values: dict[str, str]) -> Path:
    path.write_text("".join(f"{k}={v}\n" for k, v in values.items()))
    path.chmod(0o600)
    if os.geteuid() == 0:  # the tracking server runs as the service account and reads it
        import pwd

        account = pwd.getpwnam("trackgate")
        os.chown(path, account.pw_uid, account.pw_gid)
    return path


def _objects(store: ObjectStore, prefix: str) -> dict[str, bytes]:
    """Every object under PREFIX/, by key relative to it, with its bytes."""
    client = store.client()
    found = {}
    for page in client.get_paginator("list_objects_v2").paginate(
        Bucket=store.bucket, Prefix=f"{prefix}/"
    ):
        for obj in page.get("Contents", []):
            body = client.get_object(Bucket=store.bucket, Key=obj["Key"])["Body"].read()
            found[obj["Key"].removeprefix(f"{prefix}/")] = body
    return found


def _s3(store: ObjectStore, keys: Path, prefix: str) -> dict[str, object]:
    return {
        "artifacts_destination": f"s3://{store.bucket}/{prefix}",
        "s3_endpoint_url": store.endpoint,
        "s3_credentials_file": keys,
    }


def _more_artifacts(run_id: str, work: Path) -> None:
    """Objects a bucket copy can get wrong: empty, deep, spaces and non-ASCII names, and one
    larger than a restore part (written back in several parts)."""
    from mlflow import MlflowClient

    client = MlflowClient()
    big = work / "big.bin"
    big.write_bytes(os.urandom(backup._PART + 1024 * 1024))
    client.log_artifact(run_id, str(big), artifact_path="parts")
    client.log_text(run_id, "", "empty.txt")
    client.log_dict(run_id, {"depth": 4}, "deep/a/b/c.json")
    client.log_text(run_id, "grüße\n", "notes/ünïcode name.txt")


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("s3-backup")
    os.chmod(root, 0o711)  # as root, the service account passes through to the data dirs
    with (
        postgres_cluster("mlflow", "restored", "spare") as cluster,
        seaweedfs(root / "seaweedfs") as store,
    ):
        keys = _keys_file(root / "s3-credentials", store.keys_env)
        with running_stack(
            root / "live", backend_store_uri=cluster.uri("mlflow"), **_s3(store, keys, "live")
        ) as running:
            work = root / "populate"
            work.mkdir()
            with mlflow_env(running.client_env()):
                ids = populate(work)
                _more_artifacts(ids["run-1"], work)
            archive = backup.backup(running.settings, root / "s3.tar")
            yield Live(running, cluster, store, keys, archive)


def test_bucket_objects_are_archived_with_size_and_sha256(live: Live) -> None:
    in_bucket = _objects(live.store, "live")
    assert len(in_bucket) == 6, in_bucket.keys()  # populate's two and _more_artifacts' four
    members = live.archive.manifest["members"]
    archived = {n.removeprefix("bucket/"): m for n, m in members.items() if n.startswith("bucket/")}
    assert archived.keys() == in_bucket.keys()
    for rel, data in in_bucket.items():
        assert archived[rel]["size"] == len(data)
        assert archived[rel]["sha256"] == hashlib.sha256(data).hexdigest()
        assert archived[rel]["role"] == "artifact"
    assert live.archive.manifest["artifacts"]["store"] == f"s3://{live.store.bucket}/live/"
    assert live.archive.manifest["database"]["kind"] == "postgresql"
    # The tar holds the objects' bytes, not the keys that read them.
    raw = live.archive.path.read_bytes()
    assert live.store.secret_key.encode() not in raw
    assert live.cluster.password.encode() not in raw
    with tarfile.open(live.archive.path) as tar:
        names = tar.getnames()
    assert names.index(backup.PG_MEMBER) < min(names.index(f"bucket/{r}") for r in in_bucket), (
        "the database snapshot comes first, the objects after it"
    )


def test_restore_into_an_empty_database_and_prefix_reads_back_identical(
    live: Live, tmp_path: Path
) -> None:
    with mlflow_env(live.stack.client_env()):
        expected = content(tmp_path / "live")
    assert any(r["artifacts"] for r in expected["runs"].values())

    target = stack_settings(
        tmp_path / "restored",
        backend_store_uri=live.cluster.uri("restored"),
        **_s3(live.store, live.keys, "restored"),
    )
    result = backup.restore(target, live.archive.path)
    assert "every checksum matched" in result.summary()
    assert _objects(live.store, "restored") == _objects(live.store, "live")
    assert (
        backup.content_summary(target.database_uri) == live.archive.manifest["database"]["tables"]
    )
    stack_module.up(target)
    try:
        restored = RunningStack(target, live.stack.admin_password)
        with mlflow_env(restored.client_env()):
            assert content(tmp_path / "restored-download") == expected
    finally:
        stack_module.down(target)


def test_verify_restores_the_bucket_members_and_serves_them(live: Live, tmp_path: Path) -> None:
    result = backup.verify(live.stack.settings, live.archive.path, scratch_root=tmp_path)
    assert result.ok, result.differences
    assert any("artifacts downloaded through nginx" in c for c in result.checked), result.checked
    assert not list(tmp_path.glob("trackgate-verify-*")), "the scratch dir is removed"


def test_a_changed_byte_in_a_bucket_member_is_caught_before_anything_is_written(
    live: Live, tmp_path: Path
) -> None:
    name = max(
        (n for n in live.archive.manifest["members"] if n.startswith("bucket/")),
        key=lambda n: live.archive.manifest["members"][n]["size"],
    )
    bad = tampered_copy(live.archive.path, name, tmp_path / "tampered.tar")
    _manifest, problems = backup.check_archive(bad)
    assert problems == [f"{name}: sha256 differs from the manifest (damaged)"]
    checked = CliRunner().invoke(
        cli, ["backup", "--verify", str(bad), "--data-dir", str(live.stack.settings.data_dir)]
    )
    assert checked.exit_code == 1 and name in checked.stderr, checked.output

    target = stack_settings(
        tmp_path / "never",
        backend_store_uri=live.cluster.uri("spare"),
        **_s3(live.store, live.keys, "never"),
    )
    with pytest.raises(backup.BackupError, match="nothing was restored"):
        backup.restore(target, bad)
    assert _objects(live.store, "never") == {}
    assert not target.data_dir.exists()


def test_restore_refuses_a_prefix_that_holds_objects(live: Live, tmp_path: Path) -> None:
    """An empty data dir and database, but the live stack's prefix: nothing may be written."""
    before = _objects(live.store, "live")
    data = tmp_path / "data"
    refused = CliRunner().invoke(
        cli,
        [
            "restore", str(live.archive.path), "--data-dir", str(data),
            "--backend-store-uri", live.cluster.uri("spare"),
            "--artifacts-destination", f"s3://{live.store.bucket}/live",
            "--s3-endpoint-url", live.store.endpoint,
            "--s3-credentials-file", str(live.keys),
        ],
    )  # fmt: skip
    assert refused.exit_code == 1, refused.output
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
    assert f"objects under s3://{live.store.bucket}/live/" in refused.stderr
    assert "not empty" in refused.stderr and "--force" in refused.stderr
    assert _objects(live.store, "live") == before
    assert backup.content_summary(live.cluster.uri("spare")) == {}
    assert not data.exists()


@pytest.mark.parametrize(
    ("problem", "said"),
    [
        ("wrong keys", "refused the S3 keys"),
        ("missing bucket", "does not exist"),
        ("unreachable endpoint", "cannot reach the S3 endpoint"),
    ],
)
def test_store_problems_are_one_clear_line(
    live: Live, tmp_path: Path, problem: str, said: str
) -> None:
    keys, bucket, endpoint = live.keys, live.store.bucket, live.store.endpoint
    if problem == "wrong keys":
        keys = _keys_file(
            tmp_path / "wrong",
            {"AWS_ACCESS_KEY_ID": live.store.access_key, "AWS_SECRET_ACCESS_KEY": "x" * 40},
        )
    elif problem == "missing bucket":
        bucket = "no-such-bucket"
    else:
        endpoint = f"http://127.0.0.1:{free_port()}"
    store = [
        "--artifacts-destination", f"s3://{bucket}/elsewhere",
        "--s3-endpoint-url", endpoint,
        "--s3-credentials-file", str(keys),
    ]  # fmt: skip
    data = tmp_path / "data"
    data.mkdir()
    runner = CliRunner()
    made = runner.invoke(
        cli, ["backup", "--output", str(tmp_path / "x.tar"), "--data-dir", str(data), *store]
    )
    restored = runner.invoke(
        cli,
        ["restore", str(live.archive.path), "--data-dir", str(tmp_path / "new"),
         "--backend-store-uri", live.cluster.uri("spare"), *store],
    )  # fmt: skip
    for result in (made, restored):
        assert result.exit_code == 1, result.output
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and said in lines[0], result.stderr
        assert "Traceback" not in result.output
    assert not (tmp_path / "x.tar").exists()
    assert not (tmp_path / "new").exists()


def test_force_replaces_every_object_under_the_prefix(live: Live, tmp_path: Path) -> None:
    """--force: the prefix ends up holding the archive's objects and nothing else."""
    stray = "1/not-in-the-backup/artifacts/old.txt"
    live.store.client().put_object(Bucket=live.store.bucket, Key=f"forced/{stray}", Body=b"old")
    target = stack_settings(
        tmp_path / "forced",
        backend_store_uri=live.cluster.uri("spare"),
        **_s3(live.store, live.keys, "forced"),
    )
    with pytest.raises(backup.BackupError, match="not empty"):
        backup.restore(target, live.archive.path)
    backup.restore(target, live.archive.path, force=True)
    assert _objects(live.store, "forced") == _objects(live.store, "live")
    assert (
        backup.content_summary(target.database_uri) == live.archive.manifest["database"]["tables"]
    )
