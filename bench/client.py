"""A legitimate MLflow user, as its own process: the real `MlflowClient`, credentials from the
MLFLOW_TRACKING_* environment, exactly as a training script runs.

    python -m bench.client metrics --max-calls 20000
    python -m bench.client artifacts --file PATH --download-dir DIR

`metrics` sets up an experiment and a run (which also warms any credential cache), prints
`ready`, then for each `go SECONDS` line on stdin calls `log_metric` until the time or count
bound (for each `n COUNT` line, exactly COUNT times) and prints one JSON line; any other line
or EOF ends it. `artifacts` uploads one file
with `log_artifact` on `upload` and downloads it again on `download`.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from mlflow import MlflowClient


def _run(client: MlflowClient) -> str:
    experiment = client.create_experiment(f"bench-{uuid.uuid4().hex[:12]}")
    return client.create_run(experiment).info.run_id


def metrics(max_calls: int) -> None:
    """Log metrics in windows: each `go SECONDS` line on stdin runs one, answered by a JSON line."""
    from mlflow import MlflowClient

    client = MlflowClient()
    run_id = _run(client)
    client.log_metric(run_id, "warmup", 0.0)
    print("ready", flush=True)
    step = 0
    for line in sys.stdin:
        command, _, amount = line.strip().partition(" ")
        if command not in ("go", "n"):
            break
        latencies: list[float] = []
        errors: list[str] = []
        start = time.monotonic()
        # `go SECONDS`: a window of time; `n COUNT`: exactly COUNT calls (alternated blocks).
        deadline = start + float(amount) if command == "go" else float("inf")
        limit = max_calls if command == "go" else int(amount)
        calls = 0
        while time.monotonic() < deadline and calls < limit:
            began = time.monotonic()
            try:
                client.log_metric(run_id, "loss", 1.0 / (step + 1), step=step)
                latencies.append(time.monotonic() - began)
            except Exception as exc:  # counted and reported, never hidden
                errors.append(f"{type(exc).__name__}: {str(exc)[:200]}")
            calls += 1
            step += 1
        print(json.dumps({"calls": len(latencies), "errors": len(errors),
                          "first_errors": errors[:3], "elapsed": time.monotonic() - start,
                          "latencies": latencies}), flush=True)


def artifacts(path: Path, download_dir: Path) -> None:
    """Upload on `upload`, download on `download` (stdin), one JSON line each; phases are
    separate so the caller can account the CPU time of each."""
    from mlflow import MlflowClient

    client = MlflowClient()
    run_id = _run(client)
    print("ready", flush=True)
    if sys.stdin.readline().strip() != "upload":
        return
    began = time.monotonic()
    client.log_artifact(run_id, str(path))
    print(json.dumps({"upload_s": time.monotonic() - began}), flush=True)
    if sys.stdin.readline().strip() != "download":
        return
    began = time.monotonic()
    local = Path(client.download_artifacts(run_id, path.name, str(download_dir)))
    elapsed = time.monotonic() - began
    size = local.stat().st_size
    local.unlink()
    if size != path.stat().st_size:
        raise SystemExit(f"downloaded {size} bytes, uploaded {path.stat().st_size}")
    print(json.dumps({"download_s": elapsed, "bytes": size}), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="mode", required=True)
    m = sub.add_parser("metrics")
    m.add_argument("--max-calls", type=int, required=True, help="per window, at most")
    a = sub.add_parser("artifacts")
    a.add_argument("--file", type=Path, required=True)
    a.add_argument("--download-dir", type=Path, required=True)
    args = parser.parse_args()
    if args.mode == "metrics":
        metrics(args.max_calls)
    else:
        artifacts(args.file, args.download_dir)


if __name__ == "__main__":
    main()
