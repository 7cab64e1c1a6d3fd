"""What roles, owner checks, author stamping and the audit log cost per MLflow call (issue 14).

In one process, MLflow's real Flask app on a fresh sqlite store is called through trackgate's
policy layer without (`off`) and with (`on`) the access layer, alternating in blocks (the
machine is shared: one window per variant is noise). Each block's ratio is on/off; the median of
the blocks and their spread are printed. nginx and the gateway are left out: their part of a
role check is one more header (the gateway already stats the roles file next to htpasswd).

    .venv/bin/python -m bench.roles_cost [--blocks 30] [--calls 30]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def _apps(data: Path) -> tuple[Any, Any]:
    os.environ.update({
        "_MLFLOW_SERVER_FILE_STORE": f"sqlite:///{data / 'mlflow.db'}",
        "_MLFLOW_SERVER_REGISTRY_STORE": f"sqlite:///{data / 'mlflow.db'}",
        "_MLFLOW_SERVER_ARTIFACT_ROOT": "mlflow-artifacts:/",
        "_MLFLOW_SERVER_ARTIFACT_DESTINATION": str(data / "artifacts"),
        "_MLFLOW_SERVER_SERVE_ARTIFACTS": "true",
    })
    from mlflow.server import app
    from trackgate.audit import AuditLog
    from trackgate.server.access import Access
    from trackgate.server.policy import Policy
    from werkzeug.test import Client

    off = Client(Policy(app))
    on = Client(Policy(app, access=Access(AuditLog(data / "audit.log"))))
    return off, on


HEADERS = {"X-Trackgate-User": "bench", "X-Trackgate-Role": "editor"}


def _post(client: Any, path: str, body: dict[str, Any]) -> Any:
    answer = client.post(f"/api/2.0/mlflow/{path}", json=body, headers=HEADERS)
    assert answer.status_code == 200, answer.get_data(as_text=True)
    return answer.get_json()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--blocks", type=int, default=30)
    parser.add_argument("--calls", type=int, default=30)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        off, on = _apps(Path(tmp))
        experiment = _post(on, "experiments/create", {"name": "bench"})["experiment_id"]
        run_id = _post(on, "runs/create", {"experiment_id": experiment})["run"]["info"]["run_id"]
        step = 0

        def block(client: Any) -> float:
            nonlocal step
            started = time.perf_counter()
            for _ in range(args.calls):
                step += 1
                _post(client, "runs/log-metric",
                      {"run_id": run_id, "key": "m", "value": 1.0, "timestamp": 0, "step": step})
            return (time.perf_counter() - started) / args.calls

        block(off), block(on)  # warm up
        ratios, off_ms, on_ms = [], [], []
        for _ in range(args.blocks):
            a, b = block(off), block(on)
            off_ms.append(a * 1000)
            on_ms.append(b * 1000)
            ratios.append(b / a)
        ratios.sort()
        print(f"log_metric through MLflow's app, {args.blocks} blocks of {args.calls} calls each")
        print(f"  off: median {statistics.median(off_ms):.2f} ms/call")
        print(f"  on:  median {statistics.median(on_ms):.2f} ms/call")
        print(f"  on/off per block: median {statistics.median(ratios):.3f}x, "
              f"p10 {ratios[len(ratios) // 10]:.3f}x, p90 {ratios[len(ratios) * 9 // 10]:.3f}x")
        lines = (Path(tmp) / "audit.log").read_text().count("\n")
        print(f"  audit lines written: {lines}")
        _overhead(Path(tmp), run_id)


def _overhead(data: Path, run_id: str, calls: int = 5000) -> None:
    """The access layer alone: the same request to an app that does nothing, without and with."""
    import io
    import json

    from mlflow.server import app
    from trackgate.audit import AuditLog
    from trackgate.server.access import Access
    from trackgate.server.policy import Policy

    def nothing(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        start_response("200 OK", [("Content-Type", "application/json")])
        return [b"{}"]

    body = json.dumps({"run_id": run_id, "key": "m", "value": 1.0, "timestamp": 0}).encode()

    def environ() -> dict[str, Any]:
        return {"REQUEST_METHOD": "POST", "PATH_INFO": "/api/2.0/mlflow/runs/log-metric",
                "SERVER_NAME": "localhost", "SERVER_PORT": "80", "wsgi.url_scheme": "http",
                "CONTENT_LENGTH": str(len(body)), "CONTENT_TYPE": "application/json",
                "wsgi.input": io.BytesIO(body), "HTTP_X_TRACKGATE_USER": "bench",
                "HTTP_X_TRACKGATE_ROLE": "editor", "HTTP_X_REAL_IP": "127.0.0.1"}

    variants = {
        "policy only": Policy(nothing, url_map=app.url_map),
        "policy + access": Policy(nothing, url_map=app.url_map,
                                  access=Access(AuditLog(data / "audit-overhead.log"))),
    }
    results: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(10):
        for name, wrapped in variants.items():
            started = time.perf_counter()
            for _ in range(calls // 10):
                list(wrapped(environ(), lambda *a: None))
            results[name].append((time.perf_counter() - started) / (calls // 10) * 1e6)
    for name, values in results.items():
        print(f"  {name}: median {statistics.median(values):.1f} us/call (log-metric request)")
    extra = statistics.median(results["policy + access"]) - statistics.median(
        results["policy only"])
    print(f"  access layer adds {extra:.1f} us per log-metric call (owner cached, one audit line)")


if __name__ == "__main__":
    main()
