"""Checks of a deployed host, shared by the sqlite and PostgreSQL variants.

Host-side checks use testinfra over `docker://NAME`; client-side checks use the real MLflow
client, in a subprocess with only the environment a user would export.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from typing import Any

import testinfra
from cryptography import x509

from ..support import clean_env
from .harness import ALICE, Deployment

# Logs a run with a param, a metric and a 2 MB artifact (over nginx's default 1 MB body limit),
# or reads one back; prints JSON. Runs in its own process: the MLflow client reads its
# configuration from the environment.
CLIENT_SCRIPT = r"""
import json, os, sys, tempfile
import mlflow
from mlflow.tracking import MlflowClient

if sys.argv[1] == "log":
    payload = os.urandom(2 * 1024 * 1024)
    mlflow.set_experiment("deploy-test")
    with mlflow.start_run() as run:
        mlflow.log_param("alpha", "0.5")
        mlflow.log_metric("rmse", 0.25)
        path = os.path.join(tempfile.mkdtemp(), "weights.bin")
        with open(path, "wb") as f:
            f.write(payload)
        mlflow.log_artifact(path)
    print(json.dumps({"run_id": run.info.run_id, "size": len(payload),
                      "sha": __import__("hashlib").sha256(payload).hexdigest()}))
else:
    run = MlflowClient().get_run(sys.argv[2])
    local = mlflow.artifacts.download_artifacts(run_id=sys.argv[2], artifact_path="weights.bin")
    data = open(local, "rb").read()
    print(json.dumps({"metrics": run.data.metrics, "params": run.data.params,
                      "sha": __import__("hashlib").sha256(data).hexdigest()}))
"""


def host(deployment: Deployment) -> Any:
    return testinfra.get_host(f"docker://{deployment.name}")


def mlflow_client(deployment: Deployment, *args: str, user: str = ALICE) -> dict[str, Any]:
    env = clean_env(**deployment.client_env(user), MLFLOW_HTTP_REQUEST_MAX_RETRIES="2")
    proc = subprocess.run([sys.executable, "-c", CLIENT_SCRIPT, *args], env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def log_and_read_back(deployment: Deployment) -> str:
    """Log a run with an artifact through the deployed proxy, read it back; return its id."""
    logged = mlflow_client(deployment, "log")
    read = mlflow_client(deployment, "read", logged["run_id"])
    assert read["metrics"] == {"rmse": 0.25}
    assert read["params"] == {"alpha": "0.5"}
    assert read["sha"] == logged["sha"]
    return str(logged["run_id"])


def services_running(deployment: Deployment, *extra: str) -> None:
    h = host(deployment)
    for name in ("trackgate-tracking", "trackgate-gateway", "nginx", *extra):
        service = h.service(name)
        assert service.is_enabled, f"{name} is not enabled"
        assert service.is_running, f"{name} is not running"


def listeners(deployment: Deployment) -> list[tuple[str, int, set[str]]]:
    """Listening TCP sockets as (address:port, owner uid, process names).

    The container shares the machine's network, so `ss` lists every socket of the machine. The
    deployment's are those of processes visible in its PID namespace (root in the container
    sees the names only of root's and nginx's processes: no CAP_SYS_PTRACE) and those owned by
    its service users.
    """
    out = host(deployment).check_output("ss -Htlnpe")
    found = []
    for line in out.splitlines():
        fields = line.split()
        if len(fields) < 5:
            continue
        uid = re.search(r"\buid:(\d+)", line)
        names = set(re.findall(r'\(\("([^"]+)"', line))
        found.append((fields[3], int(uid.group(1)) if uid else 0, names))
    return found


LOOPBACK = ("127.", "[::1]", "[::ffff:127.")


def only_nginx_listens_publicly(deployment: Deployment, *service_users: str) -> None:
    h = host(deployment)
    trackgate = int(h.check_output("id -u trackgate"))
    others = {int(h.check_output(f"id -u {u}")) for u in service_users}
    sockets = listeners(deployment)
    public = [(a, n) for a, _, n in sockets if n and not a.startswith(LOOPBACK)]
    assert {name for _, names in public for name in names} == {"nginx"}, public
    assert {a for a, _ in public} == {f"0.0.0.0:{deployment.ports['http']}",
                                      f"0.0.0.0:{deployment.ports['https']}"}, public
    # trackgate's servers listen on no TCP port at all, loopback included: Unix sockets only.
    ours = [a for a, uid, _ in sockets if uid == trackgate]
    assert ours == [], ours
    # Other services of the deployment (PostgreSQL) on loopback only.
    theirs = [a for a, uid, _ in sockets if uid in others]
    assert all(a.startswith(LOOPBACK) for a in theirs), theirs


def internal_servers_only_reachable_by_nginx(deployment: Deployment) -> None:
    """Issue 12, attack 3 on an Ansible host: the sockets live in a directory that only the
    service group (trackgate and nginx's workers) may enter; any other local account is
    refused, so it can neither call MLflow without a login nor forge the identity header."""
    h = host(deployment)
    sockets = h.file("/run/trackgate")
    assert (sockets.user, sockets.group, sockets.mode) == ("trackgate", "trackgate", 0o750)
    for name in ("tracking", "gateway"):
        assert h.file(f"/run/trackgate/{name}.sock").is_socket, name
        probe = (f"import socket; s = socket.socket(socket.AF_UNIX); "
                 f"s.connect('/run/trackgate/{name}.sock'); print('connected')")
        other = h.run(f"runuser -u nobody -- python3 -c \"{probe}\"")
        assert other.rc != 0 and "PermissionError" in other.stderr, (other.stdout, other.stderr)
        mine = h.run(f"runuser -u www-data -- python3 -c \"{probe}\"")
        assert mine.rc == 0 and "connected" in mine.stdout, (mine.stdout, mine.stderr)


def files_have_strict_modes(deployment: Deployment) -> None:
    h = host(deployment)
    expected = {
        "/etc/trackgate/trackgate.env": ("root", "trackgate", 0o640),
        "/var/lib/trackgate/htpasswd": ("trackgate", "trackgate", 0o640),
        "/var/lib/trackgate/tls/server.key": ("trackgate", "trackgate", 0o600),
        "/var/lib/trackgate/tls/ca-key/ca.key": ("trackgate", "trackgate", 0o600),
        "/var/lib/trackgate": ("trackgate", "trackgate", 0o750),
        # It holds the proxy secret: root's alone (nginx's master reads it as root).
        "/etc/nginx/conf.d/trackgate.conf": ("root", "root", 0o600),
    }
    for path, (user, group, mode) in expected.items():
        f = h.file(path)
        assert f.exists, path
        found = (f.user, f.group, f.mode)
        assert found == (user, group, mode), (path, found)


def nginx_config_valid(deployment: Deployment) -> None:
    h = host(deployment)
    result = h.run("nginx -t")
    assert result.rc == 0, result.stderr
    assert not h.file("/etc/nginx/sites-enabled/default").exists
    site = h.file("/etc/nginx/conf.d/trackgate.conf").content_string
    assert "auth_request /_trackgate/auth;" in site
    assert "server unix:/run/trackgate/tracking.sock;" in site


def certificate_names_host(deployment: Deployment) -> None:
    pem = host(deployment).file("/var/lib/trackgate/tls/server.pem").content
    cert = x509.load_pem_x509_certificate(pem)
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    ca = x509.load_pem_x509_certificate(deployment.ca.read_bytes())
    cert.verify_directly_issued_by(ca)  # the fetched CA is the one clients need


def units_hardened(deployment: Deployment) -> None:
    h = host(deployment)
    for name in ("trackgate-tracking", "trackgate-gateway"):
        props = dict(
            line.split("=", 1)
            for line in h.check_output(
                f"systemctl show {name} -p User -p NoNewPrivileges -p ProtectSystem "
                "-p ProtectHome -p PrivateTmp -p ReadWritePaths -p Restart -p MainPID "
                "-p EnvironmentFiles"
            ).splitlines()
        )
        assert props["User"] == "trackgate", props
        assert props["NoNewPrivileges"] == "yes", props
        assert props["ProtectSystem"] == "strict", props
        assert props["ProtectHome"] == "yes", props
        assert props["PrivateTmp"] == "yes", props
        assert props["ReadWritePaths"] == "/var/lib/trackgate", props
        assert props["Restart"] == "on-failure", props
        assert props["EnvironmentFiles"].startswith("/etc/trackgate/trackgate.env"), props
        # The running process really has them: no privilege gain, runs as trackgate.
        status = h.file(f"/proc/{props['MainPID']}/status").content_string
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
        uid = h.check_output("id -u trackgate")
        assert re.search(rf"^Uid:\s+{uid}\s", status, re.M), status


def auth_enforced(deployment: Deployment) -> None:
    api = f"{deployment.url}/api/2.0/mlflow/experiments/search?max_results=1"
    assert deployment.session().get(f"{deployment.url}/health", timeout=10).status_code == 200
    assert deployment.session().get(api, timeout=10).status_code == 401
    assert deployment.session(ALICE).get(api, timeout=10).status_code == 200
