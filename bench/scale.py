"""log_metric through 1, 2 and 3 tracking servers on PostgreSQL, side by side with sqlite on one
(issue 16), the CPU each component spends per call, and a model of more cores.

    .venv/bin/python -m bench.scale [--blocks 20] [--calls 20] [--threads 6] [--max-seconds 300]

Four real stacks (`trackgate up`: nginx + TLS + gateway + gunicorn/MLflow), one PostgreSQL
cluster (a database per stack):

- **sqlite-1**: the default, one server on a Unix socket;
- **pg-1 / pg-2 / pg-3**: PostgreSQL, TCP with the proxy secret, `TRACKGATE_TRACKING_UPSTREAM`
  listing 1, 2 or 3 servers (the stack's own plus `trackgate serve tracking` processes).

Per block, each variant in turn (order rotating) gets `--threads` concurrent MlflowClients
logging `--calls` metrics each; the block gives calls/s and every call's latency. The table
shows the median of the blocks, p99 over all calls, and the CPU per call of each component read
from /proc (nginx, gateway, tracking servers, PostgreSQL, this client process).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import shlex
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from trackgate.local.stack import running_pid

from tests.infra.postgres import Cluster, postgres_cluster
from tests.infra.tracking_servers import TrackingServer, start_tracking_server
from tests.support import RunningStack, free_port, running_stack

from . import cpu, report
from . import targets as tg

VARIANTS = ("sqlite-1", "pg-1", "pg-2", "pg-3")
COMPONENTS = ("nginx", "gateway", "tracking", "postgres", "client")


def _postmaster(cluster: Cluster) -> int | None:
    """The PostgreSQL server's PID (its backends are its children)."""
    if cluster.data is None:
        return None
    return int((cluster.data / "postmaster.pid").read_text().split()[0])


class Variant:
    def __init__(self, name: str, stack: RunningStack, extras: list[TrackingServer]) -> None:
        self.name, self.stack, self.extras = name, stack, extras
        self.rates: list[float] = []
        self.latencies: list[float] = []
        self.cpu: dict[str, float] = dict.fromkeys(COMPONENTS, 0.0)
        self.calls = 0


def _cpu(variant: Variant, pg_pid: int | None) -> dict[str, float]:
    used = cpu.snapshot(running_pid(variant.stack.settings), [], None)
    out = {"nginx": used.get("nginx", 0.0), "gateway": used.get("gateway", 0.0),
           "tracking": used.get("gunicorn", 0.0), "postgres": 0.0,
           "client": sum(os.times()[:2])}
    for server in variant.extras:
        if server.proc is not None:
            extra = cpu.snapshot(server.proc.pid, [], None)
            out["tracking"] += sum(v for k, v in extra.items() if k != "machine")
    if pg_pid is not None and variant.name.startswith("pg"):
        pg = cpu.snapshot(pg_pid, [], None)
        out["postgres"] = sum(v for k, v in pg.items() if k != "machine")
    return out


def _block(variant: Variant, clients: list[tuple[Any, str]], calls: int, step: int) -> None:
    latencies: list[float] = []
    lock = threading.Lock()

    def write(client: Any, run_id: str) -> None:
        mine = []
        for i in range(calls):
            began = time.perf_counter()
            client.log_metric(run_id, "loss", 1.0 / (step + i + 1), step=step + i)
            mine.append(time.perf_counter() - began)
        with lock:
            latencies.extend(mine)

    threads = [threading.Thread(target=write, args=c) for c in clients]
    began = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - began
    variant.rates.append(len(clients) * calls / elapsed)
    variant.latencies.extend(latencies)
    variant.calls += len(clients) * calls


def _model(per_call: dict[str, float], workers: int) -> list[str]:
    """What N servers reach on C cores, from the measured CPU per call: each server can use at
    most `workers` cores (its gunicorn worker processes), the whole machine C; the client runs
    elsewhere. A MODEL from the measured costs, not a measurement."""
    server_side = sum(per_call[k] for k in ("nginx", "gateway", "tracking", "postgres"))
    lines = ["| cores | 1 server | 2 servers | 3 servers | 4 servers |",
             "| ---: | ---: | ---: | ---: | ---: |"]
    for cores in (2, 4, 8, 16):
        cells = []
        for n in (1, 2, 3, 4):
            by_servers = n * workers / per_call["tracking"] if per_call["tracking"] else 0
            by_cores = cores / server_side if server_side else 0
            cells.append(f"{min(by_servers, by_cores):.0f}/s")
        lines.append(f"| {cores} | " + " | ".join(cells) + " |")
    return lines


def render(variants: dict[str, Variant], threads: int, workers: int) -> str:
    lines = ["| variant | log_metric calls/s (median of blocks) | ratio to sqlite-1 (median) "
             "| p99 latency | CPU per call: " + " / ".join(COMPONENTS) + " |",
             "| --- | ---: | ---: | ---: | ---: |"]
    base = variants["sqlite-1"]
    per_call_pg3: dict[str, float] = {}
    for name in VARIANTS:
        v = variants[name]
        ratios = [a / b for a, b in zip(v.rates, base.rates, strict=True)]
        p99 = statistics.quantiles(v.latencies, n=100)[98] * 1000
        per_call = {k: 1e3 * v.cpu[k] / max(v.calls, 1) for k in COMPONENTS}
        if name == "pg-3":
            per_call_pg3 = per_call
        lines.append(f"| {name} | {statistics.median(v.rates):.0f} | "
                     f"{statistics.median(ratios):.2f} | {p99:.0f} ms | "
                     + " / ".join(f"{per_call[k]:.2f}" for k in COMPONENTS) + " ms |")
    lines += ["", f"{len(base.rates)} blocks; {threads} client threads per variant; CPU in ms "
              "per call (client = this process, all its threads).", "",
              "Model (from pg-3's CPU per call, NOT measured): calls/s that N servers of "
              f"{workers} workers would reach on a machine with C cores, client elsewhere:", ""]
    per_call_s = {k: v / 1e3 for k, v in per_call_pg3.items()}
    lines += _model(per_call_s, workers)
    return "\n".join(lines) + "\n"


def _stacks(stack: contextlib.ExitStack, work: Path, cluster: Cluster) -> dict[str, Variant]:
    variants: dict[str, Variant] = {}
    variants["sqlite-1"] = Variant("sqlite-1", stack.enter_context(
        running_stack(work / "sqlite-1", bcrypt_rounds=tg.BCRYPT_ROUNDS)), [])
    for n in (1, 2, 3):
        name = f"pg-{n}"
        ports = [free_port() for _ in range(n)]
        running = stack.enter_context(running_stack(
            work / name, bcrypt_rounds=tg.BCRYPT_ROUNDS, backend_store_uri=cluster.uri(
                name.replace("-", "")), internal_transport="tcp", tracking_port=ports[0],
            tracking_upstream=",".join(f"127.0.0.1:{p}" for p in ports),
            proxy_secret_file=work / name / "secrets" / "proxy-secret"))
        extras = []
        for port in ports[1:]:
            server = start_tracking_server(running.settings, port, work / f"{name}-logs-{port}")
            stack.callback(server.stop)
            extras.append(server)
        variants[name] = Variant(name, running, extras)
    return variants


def _clients(variants: dict[str, Variant], work: Path, threads: int) -> dict[str, list[Any]]:
    password = os.urandom(12).hex()
    bundle = work / "ca-bundle.pem"
    bundle.write_text("".join(v.stack.ca.read_text() for v in variants.values()))
    for v in variants.values():
        v.stack.users.add(tg.USER, password)
    os.environ.update(MLFLOW_TRACKING_USERNAME=tg.USER, MLFLOW_TRACKING_PASSWORD=password,
                      MLFLOW_TRACKING_SERVER_CERT_PATH=str(bundle),
                      MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="60")
    from mlflow import MlflowClient

    out: dict[str, list[Any]] = {}
    for name, v in variants.items():
        client = MlflowClient(tracking_uri=v.stack.url)
        experiment = client.create_experiment(f"bench-{name}")
        runs = []
        for _ in range(threads):
            run_id = client.create_run(experiment).info.run_id
            for step in range(5):
                client.log_metric(run_id, "warmup", 0.0, step=step)
            runs.append((client, run_id))
        out[name] = runs
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=20)
    parser.add_argument("--calls", type=int, default=20, help="calls per thread per block")
    parser.add_argument("--threads", type=int, default=6)
    parser.add_argument("--max-seconds", type=float, default=300)
    args = parser.parse_args()
    started = dt.datetime.now(dt.UTC)
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="trackgate-bench-scale-"))
    work.chmod(0o711)
    with contextlib.ExitStack() as stack:
        cluster = stack.enter_context(postgres_cluster("pg1", "pg2", "pg3"))
        pg_pid = _postmaster(cluster)
        variants = _stacks(stack, work, cluster)
        clients = _clients(variants, work, args.threads)
        print(f"stacks and clients up after {time.monotonic() - began:.0f} s", flush=True)
        deadline = time.monotonic() + args.max_seconds
        step = 0
        for block in range(args.blocks):
            if block >= 5 and time.monotonic() > deadline:
                break
            order = VARIANTS[block % 4:] + VARIANTS[:block % 4]
            for name in order:
                v = variants[name]
                before = _cpu(v, pg_pid)
                _block(v, clients[name], args.calls, step)
                after = _cpu(v, pg_pid)
                for k in COMPONENTS:
                    v.cpu[k] += after[k] - before[k]
            step += args.calls
    for name in VARIANTS:
        tg.remove_tree(work / name)
    workers = variants["pg-1"].stack.settings.workers
    command = shlex.join([".venv/bin/python", "-m", "bench.scale", *sys.argv[1:]])
    print(f"\n- Date: {started:%Y-%m-%d %H:%M} UTC; run time "
          f"{(time.monotonic() - began) / 60:.1f} min\n- Command: `{command}`\n"
          f"{report.machine()}\n{render(variants, args.threads, workers)}")


if __name__ == "__main__":
    main()
