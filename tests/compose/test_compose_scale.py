"""`docker compose up --scale tracking=3` with compose.scale.yaml: PostgreSQL, SeaweedFS, three
tracking replicas behind one nginx. Runs, a registered model and artifacts go in through the
proxy, land in the bucket and come back; every replica serves calls; a replica killed under load
costs no call; a replica refuses anyone but the proxy; the client has no route to the store."""

from __future__ import annotations

import json
import os
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from ..support import patched_environ
from .harness import COMPOSE_DIR, ComposeStack, docker, docker_env, start

pytestmark = pytest.mark.compose

REPLICAS = 3

LIST_BUCKET = """
import boto3, dotenv, json
keys = dotenv.dotenv_values("/run/trackgate-s3/credentials")
s3 = boto3.client("s3", endpoint_url="http://seaweedfs:8333", region_name="us-east-1",
                  aws_access_key_id=keys["AWS_ACCESS_KEY_ID"],
                  aws_secret_access_key=keys["AWS_SECRET_ACCESS_KEY"])
pages = s3.get_paginator("list_objects_v2").paginate(Bucket="mlflow", Prefix="artifacts/")
print(json.dumps({o["Key"]: o["Size"] for p in pages for o in p.get("Contents", [])}))
"""

DIRECT_CALL = """
import urllib.request, urllib.error
req = urllib.request.Request("http://tracking:5000/api/2.0/mlflow/experiments/search?max_results=1",
                             headers={"X-Trackgate-User": "admin", "X-Trackgate-Role": "admin"})
try:
    print(urllib.request.urlopen(req, timeout=10).status)
except urllib.error.HTTPError as exc:
    print(exc.code)
"""


@pytest.fixture(scope="module")
def scaled(compose_images: None, tmp_path_factory: pytest.TempPathFactory
           ) -> Iterator[ComposeStack]:
    started = time.monotonic()
    running = start("scale", tmp_path_factory.mktemp("compose-scale"),
                    up_args=("--scale", f"tracking={REPLICAS}"))
    print(f"\ncompose scale stack healthy in {time.monotonic() - started:.0f} s")
    try:
        yield running
    finally:
        running.project.down(volumes=True)


def _replicas(stack: ComposeStack) -> list[str]:
    return stack.project.run("ps", "--quiet", "tracking").stdout.split()


def _calls_per_replica(stack: ComposeStack, marker: str) -> list[int]:
    """How many access-log lines with MARKER each replica wrote (its log goes to stderr)."""
    counts = []
    for container in _replicas(stack):
        result = subprocess.run(["docker", "logs", container], capture_output=True, text=True,
                                timeout=60, env=docker_env())
        counts.append((result.stdout + result.stderr).count(marker))
    return counts


def test_runs_a_model_and_artifacts_go_through_every_replica_into_the_bucket(
        scaled: ComposeStack, tmp_path: Path) -> None:
    assert len(_replicas(scaled)) == REPLICAS
    notes = tmp_path / "notes.txt"
    notes.write_text("in the bucket")

    class Doubler(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):  # type: ignore[no-untyped-def]
            return model_input * 2

    with patched_environ(scaled.client_env()):
        mlflow.set_experiment("scaled")
        with mlflow.start_run() as run:
            mlflow.log_param("lr", "0.1")
            for step in range(30):
                mlflow.log_metric("loss", 1 / (step + 1), step=step)
            mlflow.log_artifact(str(notes), artifact_path="notes")
            mlflow.pyfunc.log_model(name="model", python_model=Doubler(),
                                    registered_model_name="scaled-doubler")
        client = MlflowClient()
        assert len(client.get_metric_history(run.info.run_id, "loss")) == 30
        fetched = mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="notes/notes.txt", dst_path=str(tmp_path / "d"))
        assert Path(fetched).read_text() == "in the bucket"
        model = mlflow.pyfunc.load_model("models:/scaled-doubler/1")
        import pandas as pd

        assert model.predict(pd.DataFrame({"x": [2]}))["x"].tolist() == [4]
    listed = json.loads(scaled.project.exec("tracking", "python3", "-c", LIST_BUCKET).stdout)
    assert any(k.endswith(f"{run.info.run_id}/artifacts/notes/notes.txt") for k in listed), listed
    assert any(k.endswith("MLmodel") for k in listed), listed
    served = _calls_per_replica(scaled, "/runs/log-metric")
    assert all(n > 0 for n in served), f"log-metric calls per replica: {served}"


def test_a_replica_killed_under_load_costs_no_call(scaled: ComposeStack) -> None:
    env = {**scaled.client_env(), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    failures: list[str] = []
    calls = 80
    with patched_environ(env):
        client = MlflowClient()
        experiment = client.create_experiment(f"scale-kill-{time.monotonic_ns()}")
        runs = [client.create_run(experiment).info.run_id for _ in range(4)]
        started = threading.Event()

        def write(run_id: str) -> None:
            for step in range(calls):
                try:
                    client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step)
                except Exception as exc:
                    failures.append(str(exc)[:300])
                if step == 10:
                    started.set()

        threads = [threading.Thread(target=write, args=(r,)) for r in runs]
        for thread in threads:
            thread.start()
        assert started.wait(120)
        victim = _replicas(scaled)[-1]
        docker("kill", victim)  # SIGKILL; a deliberate stop, so it stays down
        for thread in threads:
            thread.join(timeout=600)
        assert failures == [], f"{len(failures)} failed calls, e.g. {failures[:3]}"
        for run_id in runs:
            assert {m.step for m in client.get_metric_history(run_id, "loss")} == set(range(calls))
    docker("start", victim)


def test_a_replica_refuses_anyone_but_the_proxy(scaled: ComposeStack) -> None:
    """Another container on the network claims to be the admin without the proxy's secret."""
    answer = scaled.project.exec("gateway", "python3", "-c", DIRECT_CALL).stdout.strip()
    assert answer == "403"


def test_the_object_store_is_not_published_and_clients_hold_no_keys(
        scaled: ComposeStack) -> None:
    config = json.loads(scaled.project.run("config", "--format", "json").stdout)
    assert not config["services"]["seaweedfs"].get("ports")
    assert not {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"} & set(os.environ)
    info = scaled.get("/api/3.0/mlflow/server-info",
                      auth=("admin", scaled.admin_password)).json()
    assert info["multipart_uploads_enabled"] is False
    assert info["multipart_downloads_enabled"] is False


def test_the_backup_line_archives_every_object_of_the_bucket_beside_the_database(
        scaled: ComposeStack, tmp_path: Path) -> None:
    """README's compose backup line on the scaled stack: the PostgreSQL dump, then every object
    under the S3 prefix (the artifacts volume is empty here), each with its size and sha256."""
    project = scaled.project
    env = {**docker_env(), "COMPOSE_PROJECT_NAME": project.name,
           "COMPOSE_FILE": os.pathsep.join(str(COMPOSE_DIR / name) for name in project.files),
           "COMPOSE_ENV_FILES": str(project.env_file),
           "TRACKGATE_ENV_FILE": str(project.env_file)}
    line = "(umask 077 && docker compose run --rm -T backup > trackgate-backup.tar)"
    proc = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    listed = json.loads(project.exec("tracking", "python3", "-c", LIST_BUCKET).stdout)
    listed = {k: size for k, size in listed.items() if not k.endswith(".trackgate-write-check")}
    with tarfile.open(tmp_path / "trackgate-backup.tar") as tar:
        names = tar.getnames()
        manifest = json.load(tar.extractfile("manifest.json"))  # type: ignore[arg-type]
    assert names[0] == "database/mlflow.pgdump", names[:3]
    archived = {"artifacts/" + name.removeprefix("bucket/"): entry["size"]
                for name, entry in manifest["members"].items() if name.startswith("bucket/")}
    assert listed and archived == listed
    assert manifest["artifacts"]["store"] == "s3://mlflow/artifacts/"
