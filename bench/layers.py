"""What each layer trackgate puts in front of MLflow's handlers costs per call, in one process.

    .venv/bin/python -m bench.layers [--blocks 40] [--calls 25]

Three WSGI apps over the same `mlflow.server:app`, the same sqlite store and the same run:
plain MLflow, + the policy layer (artifact roots; issue 12), + the access layer (roles, owners,
authors, audit log; issue 14). `log_metric` calls go to each in turn, block by block (A, B, C,
A, B, C ...), so load from other processes hits all three alike; each block's CPU time per call
(this process only: no nginx, no network) is divided by plain MLflow's in the same round.
Prints the median and spread of those ratios. Bounded: blocks x calls x 3 requests.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

HEADERS = {"Host": "localhost", "X-Trackgate-User": "alice", "X-Trackgate-Role": "editor"}


def _stores(work: Path) -> None:
    """What `trackgate serve tracking` sets, before mlflow.server is imported."""
    db = f"sqlite:///{work / 'mlflow.db'}"
    os.environ.update({
        "_MLFLOW_SERVER_FILE_STORE": db, "_MLFLOW_SERVER_REGISTRY_STORE": db,
        "_MLFLOW_SERVER_ARTIFACT_ROOT": "mlflow-artifacts:/",
        "_MLFLOW_SERVER_ARTIFACT_DESTINATION": str(work / "artifacts"),
        "_MLFLOW_SERVER_SERVE_ARTIFACTS": "true", "MLFLOW_SERVER_ALLOWED_HOSTS": "localhost",
    })


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--calls", type=int, default=25)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="trackgate-bench-layers-"))
    _stores(work)
    from trackgate import database
    from trackgate.settings import Settings

    settings = Settings(data_dir=work)
    settings.logs.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
    database.ensure_schema(settings)
    from mlflow.server import app
    from trackgate.audit import AuditLog
    from trackgate.server.access import Access
    from trackgate.server.policy import Policy
    from werkzeug.test import Client

    access = Access(AuditLog(settings.audit_log))
    access.install(app)  # its Flask hooks only act on requests the access layer vouched for
    apps: dict[str, Any] = {
        "plain MLflow": app,
        "+ policy (issue 12)": Policy(app, artifact_root="mlflow-artifacts:/"),
        "+ policy + access (issue 14)": Policy(app, artifact_root="mlflow-artifacts:/",
                                                access=access),
    }
    full = Client(apps["+ policy + access (issue 14)"])
    experiment = full.post("/api/2.0/mlflow/experiments/create", json={"name": "layers"},
                           headers=HEADERS).json["experiment_id"]  # type: ignore[index]
    run = full.post("/api/2.0/mlflow/runs/create", json={"experiment_id": experiment},
                    headers=HEADERS).json["run"]["info"]["run_id"]  # type: ignore[index]
    clients = {name: Client(wsgi) for name, wsgi in apps.items()}
    per_call: dict[str, list[float]] = {name: [] for name in apps}
    step = 0
    for _ in range(args.blocks):
        for name, client in clients.items():
            started = time.process_time()
            for _ in range(args.calls):
                step += 1
                answer = client.post("/api/2.0/mlflow/runs/log-metric", headers=HEADERS,
                                     json={"run_id": run, "key": "m", "value": step,
                                           "timestamp": 0, "step": step})
                assert answer.status_code == 200, answer.data
            per_call[name].append((time.process_time() - started) / args.calls * 1000)
    base = per_call["plain MLflow"]
    print(f"log_metric, CPU ms per call in this process ({args.blocks} blocks x {args.calls} "
          f"calls each, interleaved; load {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)\n")
    print("| app | CPU ms/call (median) | / plain MLflow (median of blocks) | spread |")
    print("|---|---:|---:|---:|")
    for name, values in per_call.items():
        ratios = [v / b for v, b in zip(values, base, strict=True)]
        print(f"| {name} | {statistics.median(values):.2f} | {statistics.median(ratios):.3f}x | "
              f"{min(ratios):.2f}-{max(ratios):.2f} |")


if __name__ == "__main__":
    main()
