"""Several tracking servers on one PostgreSQL store behind one nginx: nginx balances over all of
them, a server killed under load costs no call and no metric (buffered API bodies are resent to
another server), and only the proxy may call a tracking server (the shared proxy secret).

The servers listen on TCP as they would on separate hosts: `trackgate up`'s own, plus two more
started as `trackgate serve tracking` (what a tracking host's unit runs)."""

from __future__ import annotations

import os
import pwd
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import requests
from mlflow import MlflowClient

from ..infra.postgres import postgres_cluster
from ..infra.tracking_servers import TrackingServer, start_tracking_server
from ..support import RunningStack, free_port, patched_environ, running_stack

pytestmark = pytest.mark.reliability

WRITERS = 6
CALLS = 120  # per writer


@dataclass
class Farm:
    stack: RunningStack
    servers: list[TrackingServer]  # [0] is `trackgate up`'s own


def _secret(stack: RunningStack) -> Path:  # where `up` keeps it by default
    return stack.settings.data_dir / "secrets" / "proxy-secret"


@pytest.fixture(scope="module")
def farm(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Farm]:
    if os.geteuid() != 0:
        pytest.skip("needs root (servers run as the service account)")
    root = tmp_path_factory.mktemp("farm")
    os.chmod(root, 0o711)
    ports = [free_port() for _ in range(3)]
    with postgres_cluster("mlflow") as cluster, running_stack(
            root / "data", backend_store_uri=cluster.uri("mlflow"), internal_transport="tcp",
            tracking_port=ports[0],
            tracking_upstream=",".join(f"127.0.0.1:{p}" for p in ports)) as stack:
        assert stack.settings.logs is not None
        servers = [TrackingServer(ports[0], stack.settings.logs)]
        # `up` on TCP made and uses a proxy secret by default; the other hosts get a copy.
        others = stack.settings.model_copy(update={"proxy_secret_file": _secret(stack)})
        try:
            for port in ports[1:]:
                servers.append(start_tracking_server(others, port, root / f"logs-{port}"))
            _until_nginx_uses_each(stack, servers)
            yield Farm(stack, servers)
        finally:
            for server in servers:
                server.stop()


def _until_nginx_uses_each(stack: RunningStack, servers: list[TrackingServer],
                           seconds: float = 60.0) -> None:
    """nginx skips a server that refused a connection for fail_timeout (10 s), and `up` polled
    /health through it before the other servers were started. Until nginx tries them again, every
    call would go to `up`'s own server and the kill test would prove nothing: wait (bounded)
    until a call through the proxy has reached each server."""
    probe = "/api/2.0/mlflow/experiments/get-by-name"
    deadline = time.monotonic() + seconds
    while not all(probe in s.access_log() for s in servers):
        if time.monotonic() > deadline:
            reached = [probe in s.access_log() for s in servers]
            raise AssertionError(f"nginx did not reach every tracking server in {seconds:.0f} s "
                                 f"(reached: {reached}); its errors:\n{_nginx_errors(stack)}")
        stack.request("GET", probe, auth=("admin", stack.admin_password),
                      params={"experiment_name": "Default"})
        time.sleep(0.2)


def _nginx_errors(stack: RunningStack) -> str:
    assert stack.settings.logs is not None
    log = stack.settings.logs / "nginx-error.log"
    return "\n".join(log.read_text(errors="replace").splitlines()[-15:]) if log.exists() else ""


def _direct(port: int, **headers: str) -> requests.Response:
    return requests.post(
        f"http://127.0.0.1:{port}/api/2.0/mlflow/experiments/create",
        json={"name": f"direct-{time.monotonic_ns()}"}, timeout=10,
        headers={"X-Trackgate-User": "admin", "X-Trackgate-Role": "admin", **headers})


def test_only_the_proxy_may_call_a_tracking_server(farm: Farm) -> None:
    """Another host or a local account reaching a tracking port claims to be the admin: refused
    without the proxy's secret (which `trackgate up` on TCP makes and uses unasked), and a
    local account cannot read that secret."""
    for server in farm.servers:
        assert _direct(server.port).status_code == 403
        assert _direct(server.port, **{"X-Trackgate-Proxy-Secret": "0" * 64}).status_code == 403
        assert requests.get(f"http://127.0.0.1:{server.port}/health", timeout=5).text == "OK"
    secret_file = _secret(farm.stack)
    assert secret_file.is_file()
    nobody = pwd.getpwnam("nobody")
    peek = subprocess.run(["setpriv", f"--reuid={nobody.pw_uid}", f"--regid={nobody.pw_gid}",
                           "--clear-groups", "cat", str(secret_file)], capture_output=True)
    assert peek.returncode != 0 and not peek.stdout
    # Through nginx, the same call works (it adds the secret).
    answer = farm.stack.request("POST", "/api/2.0/mlflow/experiments/create",
                                auth=("admin", farm.stack.admin_password),
                                json={"name": "through-the-proxy"})
    assert answer.status_code == 200, answer.text


def test_a_server_killed_under_load_costs_no_call_and_no_metric(farm: Farm) -> None:
    # No client retries: any failed call nginx did not absorb is counted here.
    env = {**farm.stack.client_env(), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    victim = farm.servers[2]
    done = 0
    lock = threading.Lock()
    halfway = threading.Event()
    failures: list[str] = []
    with patched_environ(env):
        client = MlflowClient()
        experiment = client.create_experiment(f"failover-{time.monotonic_ns()}")
        runs = [client.create_run(experiment).info.run_id for _ in range(WRITERS)]

        def write(run_id: str) -> None:
            nonlocal done
            for step in range(CALLS):
                try:
                    client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step)
                except Exception as exc:  # counted, not raised: the test reports them all
                    failures.append(f"{run_id} step {step}: {exc}"[:300])
                with lock:
                    done += 1
                    if done >= WRITERS * CALLS // 3:
                        halfway.set()

        threads = [threading.Thread(target=write, args=(r,)) for r in runs]
        for thread in threads:
            thread.start()
        assert halfway.wait(300), "the writers did not get a third of the way"
        victim.kill()  # the whole server, as if its host died
        for thread in threads:
            thread.join(timeout=600)
        assert failures == [], f"{len(failures)} failed calls, e.g. {failures[:3]}"
        for run_id in runs:
            steps = {m.step for m in client.get_metric_history(run_id, "loss")}
            assert steps == set(range(CALLS)), f"{run_id} lost {CALLS - len(steps)} metrics"
    served = [s.access_log().count("/runs/log-metric") for s in farm.servers]
    assert all(n > 0 for n in served), \
        f"log-metric calls per server: {served}; nginx's errors:\n{_nginx_errors(farm.stack)}"
