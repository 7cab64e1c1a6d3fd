"""The benchmark, side by side in one run on loopback (issues 4 and 18).

    .venv/bin/python -m bench.run            # full: >= 24 alternated blocks, 1 GiB transfers
    .venv/bin/python -m bench.run --quick    # smoke: 20 short blocks, 64 MiB transfers
    .venv/bin/python -m bench.run --transfers-only --transfer-rounds 6   # uploads/downloads
    .venv/bin/python -m bench.run --flood    # also issue 4's windows under a password flood
    .venv/bin/python -m bench.run --output bench/RESULTS.md

Starts the servers (see bench/targets.py): bare gunicorn+MLflow (the baseline: same workers, no
nginx, no TLS, no auth), trackgate as shipped, trackgate with its gateway under gunicorn (as
before issue 18), trackgate with nginx caching the gateway's answers (bench-only, see
targets.cache_auth_answers), trackgate with no auth subrequest at all (bench-only, the upper
bound of verifying without a gateway round trip: targets.skip_auth_hop), trackgate without its
Prometheus metrics, textbook nginx
`auth_basic`, the same nginx and TLS with no auth at all (tls-proxy: the floor for any proxy)
and MLflow's basic-auth app. Then:

1. `log_metric` throughput by alternated calls (bench/alternated.py) at 1 and 4 clients per
   variant: ratio to bare per block, median of >= 20 blocks, spread, CPU per call from /proc;
2. artifact transfers with curl (bench/transfers.py): a 1 GiB download through trackgate vs
   nginx serving the same file over TLS without auth, uploads through trackgate (as shipped:
   nginx writes the file, the tracking server links it; and a second stack with the body
   through MLflow) vs straight to bare gunicorn, interleaved; then the MLflow client's upload
   and download, bare vs trackgate (both stacks);
3. revocation latency: from `trackgate users passwd` returning to the first refusal of the old
   password, while a client repeats it.

Prints Markdown with the issue's targets. Every process it starts is stopped by PID; every loop
is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime as dt
import http.client
import json
import os
import queue
import secrets
import shlex
import signal
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests
from trackgate.users import HtpasswdStore, hash_password

from tests.support import clean_env

from . import alternated, cpu, report
from . import targets as tg
from . import transfers as transfers_mod

REPO = Path(__file__).resolve().parent.parent
HEALTH_INTERVAL = 0.05
HEALTH_TIMEOUT = 5.0


@dataclass(frozen=True)
class Plan:
    blocks: int  # alternated blocks per client count (>= 20)
    calls: int  # log_metric calls per block at 1 client (textbook: textbook_calls)
    calls_each: int  # per client and block at `concurrency` clients
    textbook_calls: int
    block_seconds: float  # stop adding blocks (past 20) after this many seconds
    transfer_rounds: int  # interleaved curl transfers per path
    seconds: float  # measured window of each cell (--flood)
    rounds: int  # interleaved rounds of the no-flood cells (the median is reported)
    artifact_rounds: int  # interleaved transfers per path (the fastest is reported)
    max_calls: int  # per client and window, a second bound besides time
    artifact_bytes: int
    concurrency: int = 4
    flood_threads: int = 8
    flood_rate: float = 25.0  # guesses/s per flood thread, at most
    flood_users: int = 100
    # Seconds the flood runs before the window opens: a real attack lasts minutes, so measure
    # its steady state, not the first guesses before any throttle has seen a failure.
    flood_ramp: float = 5.0


FULL = Plan(blocks=24, calls=30, calls_each=10, textbook_calls=2, block_seconds=600,
            transfer_rounds=5,
            seconds=12, rounds=3, artifact_rounds=2, max_calls=20_000, artifact_bytes=1 << 30)
QUICK = Plan(blocks=20, calls=10, calls_each=4, textbook_calls=1, block_seconds=120,
             transfer_rounds=2,
             seconds=4, rounds=1, artifact_rounds=1, max_calls=5_000, artifact_bytes=64 << 20,
             flood_ramp=2.0)
LABELS = {
    "bare": "bare gunicorn + MLflow (no nginx, TLS, auth)",
    "trackgate": "**trackgate** (lean gateway)",
    "trackgate-gunicorn": "trackgate, gateway under gunicorn (before)",
    "trackgate-nginx-cache": "trackgate + nginx caching the gateway's 204 (bench-only)",
    "trackgate-no-metrics": "trackgate with TRACKGATE_METRICS=false",
    "trackgate-no-auth-hop": "trackgate with no auth subrequest (bench-only upper bound)",
    "textbook": "textbook nginx auth_basic (bcrypt per call)",
    "tls-proxy": "nginx TLS proxy, no auth at all (the floor for any proxy)",
    "mlflow-auth": "MLflow basic-auth app (cache on)",
}


@dataclass
class Cell:
    target: str
    clients: int
    flood: str | None
    rate: float = 0.0  # log_metric calls/s, all clients together
    calls: int = 0
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)
    p50_ms: float = 0.0
    p95_ms: float = 0.0
    health_p50_ms: float = 0.0
    health_p95_ms: float = 0.0
    health_failed: int = 0
    health_probes: int = 0
    flood_rate: float = 0.0
    flood_by_status: dict[str, int] = field(default_factory=dict)
    flood_p50_ms: float = float("nan")  # how long the attacker waited for an answer
    kind: str = "round"  # "round" (interleaved, for cross-server ratios), "paired", "flood"
    baseline_rate: float = float("nan")  # flood cells: the paired no-flood window just before
    load1: float = 0.0  # the machine's 1-min load average as the window started
    cpu_s: dict[str, float] = field(default_factory=dict)  # CPU seconds by component


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(pct / 100 * len(ordered) + 0.5) - 1))]


class _Lines:
    """Lines a child prints, readable with a timeout (a reader thread per child)."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self._queue: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._pump, args=(proc,), daemon=True).start()

    def _pump(self, proc: subprocess.Popen[str]) -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            self._queue.put(line.strip())
        self._queue.put(None)

    def next(self, timeout: float, what: str) -> str:
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"{what}: no answer in {timeout:.0f} s") from None
        if line is None:
            raise RuntimeError(f"{what}: exited early (see bench logs)")
        return line


@contextlib.contextmanager
def _child(argv: list[str], env: dict[str, str],
           log: Path) -> Iterator[tuple[subprocess.Popen[str], _Lines]]:
    with open(log, "a") as err:
        proc = subprocess.Popen(argv, env=env, cwd=REPO, stdin=subprocess.PIPE,
                                stdout=subprocess.PIPE, stderr=err, text=True)
    try:
        yield proc, _Lines(proc)
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)


def _connection(target: tg.Target) -> http.client.HTTPConnection:
    if target.tls:
        context = ssl.create_default_context(cafile=str(target.ca_file))
        return http.client.HTTPSConnection(target.host, target.port, timeout=HEALTH_TIMEOUT,
                                           context=context)
    return http.client.HTTPConnection(target.host, target.port, timeout=HEALTH_TIMEOUT)


class HealthProber(threading.Thread):
    """GET /health every 50 ms on one keep-alive connection, like a load balancer's check."""

    def __init__(self, target: tg.Target) -> None:
        super().__init__(daemon=True)
        self.target = target
        self.stopped = threading.Event()
        self.latencies: list[float] = []
        self.failed = 0

    def run(self) -> None:
        conn: http.client.HTTPConnection | None = None
        while not self.stopped.wait(HEALTH_INTERVAL):
            began = time.monotonic()
            try:
                conn = conn or _connection(self.target)
                conn.request("GET", "/health")
                answer = conn.getresponse()
                answer.read()
                ok = answer.status == 200
            except (OSError, http.client.HTTPException):
                ok = False
                if conn is not None:
                    conn.close()
                conn = None
            if ok:
                self.latencies.append(time.monotonic() - began)
            else:
                self.failed += 1
                self.latencies.append(HEALTH_TIMEOUT)  # a failed check counts as the worst case
        if conn is not None:
            conn.close()

    def stop(self) -> None:
        self.stopped.set()
        self.join(HEALTH_TIMEOUT + 5)


def _client_env(target: tg.Target, timeout: int) -> dict[str, str]:
    # A few retries (the client retries 429/5xx with backoff) and a timeout keep each call bounded.
    return clean_env(**target.client_env(), MLFLOW_HTTP_REQUEST_MAX_RETRIES="2",
                     MLFLOW_HTTP_REQUEST_TIMEOUT=str(timeout), PYTHONWARNINGS="ignore")


class ClientPool:
    """`size` MLflow client processes for one server, started once and reused for every
    window (importing mlflow takes seconds; a training script pays that once too)."""

    def __init__(self, stack: contextlib.ExitStack, target: tg.Target, plan: Plan,
                 logs: Path) -> None:
        argv = [sys.executable, "-m", "bench.client", "metrics", "--max-calls",
                str(plan.max_calls)]
        env = _client_env(target, 60)
        self.kids = [stack.enter_context(_child(argv, env, logs / f"{target.name}.clients.log"))
                     for _ in range(plan.concurrency)]
        for _proc, lines in self.kids:
            line = lines.next(300, f"{target.name} client setup")
            if line != "ready":
                raise RuntimeError(f"{target.name} client: {line}")

    def pids(self, n: int) -> list[int]:
        return [proc.pid for proc, _ in self.kids[:n]]

    def window(self, n: int, seconds: float) -> list[dict[str, Any]]:
        for proc, _lines in self.kids[:n]:
            assert proc.stdin is not None
            proc.stdin.write(f"go {seconds}\n")
            proc.stdin.flush()
        return [json.loads(lines.next(seconds + 180, "client window"))
                for _proc, lines in self.kids[:n]]


def run_cell(target: tg.Target, pool: ClientPool, plan: Plan, clients: int, flood: str | None,
             logs: Path, flood_users: list[str], kind: str) -> Cell:
    """`clients` concurrent MLflow clients for plan.seconds, with an optional flood."""
    cell = Cell(target.name, clients, flood, kind=kind)
    with contextlib.ExitStack() as stack:
        flooder = None
        if flood is not None:
            flooder = stack.enter_context(_child(_flood_argv(target, plan, flood, flood_users),
                                                 clean_env(), logs / f"{target.name}.flood.log"))
            flooder[1].next(60, "flood start")
            time.sleep(plan.flood_ramp)
        cell.load1 = os.getloadavg()[0]
        prober = HealthProber(target)
        prober.start()
        attacker = flooder[0].pid if flooder else None
        before = cpu.snapshot(target.root_pid, pool.pids(clients), attacker)
        try:
            results = pool.window(clients, plan.seconds)
        finally:
            prober.stop()
        cell.cpu_s = cpu.delta(before, cpu.snapshot(target.root_pid, pool.pids(clients), attacker))
        if flooder is not None:
            proc, lines = flooder
            assert proc.stdin is not None
            proc.stdin.write("stop\n")
            proc.stdin.flush()
            report = json.loads(lines.next(60, "flood report"))
            cell.flood_rate = report["requests"] / max(report["elapsed"], 1e-9)
            cell.flood_by_status = report["by_status"]
            cell.flood_p50_ms = report["p50_ms"]
    latencies = [x for r in results for x in r["latencies"]]
    cell.calls = sum(r["calls"] for r in results)
    cell.errors = sum(r["errors"] for r in results)
    cell.first_errors = [e for r in results for e in r["first_errors"]][:3]
    cell.rate = sum(r["calls"] / r["elapsed"] for r in results if r["elapsed"] > 0)
    cell.p50_ms = 1000 * percentile(latencies, 50)
    cell.p95_ms = 1000 * percentile(latencies, 95)
    cell.health_probes = len(prober.latencies)
    cell.health_failed = prober.failed
    cell.health_p50_ms = 1000 * percentile(prober.latencies, 50)
    cell.health_p95_ms = 1000 * percentile(prober.latencies, 95)
    return cell


def _flood_argv(target: tg.Target, plan: Plan, variant: str, users: list[str]) -> list[str]:
    argv = [sys.executable, "-m", "bench.flood", "--host", target.host, "--port",
            str(target.port), "--variant", variant, "--threads", str(plan.flood_threads),
            "--rate", str(plan.flood_rate), "--seconds", str(plan.seconds + 120),
            "--users", tg.USER if variant == "single" else ",".join(users)]
    if target.tls:
        argv += ["--tls", "--ca", str(target.ca_file)]
    return argv


def add_flood_users(target: tg.Target, names: list[str]) -> None:
    """Existing accounts for the spread flood to guess at (nginx and MLflow skip the hash
    check for unknown names, so guessing only unknown names would cost them nothing)."""
    if target.htpasswd is not None:
        # One bcrypt-12 hash for every name: setting up 100 users stays fast, and a check
        # against it costs exactly what a check against a unique hash costs.
        hashed = hash_password(secrets.token_urlsafe(12), tg.BCRYPT_ROUNDS)
        with HtpasswdStore(target.htpasswd)._editing() as users:
            users.update(dict.fromkeys(names, hashed))
        return
    assert target.username and target.password
    with requests.Session() as session:
        session.auth = (target.username, target.password)
        for name in names:
            answer = session.post(f"{target.url}/api/2.0/mlflow/users/create", timeout=30,
                                  json={"username": name, "password": secrets.token_urlsafe(12)})
            answer.raise_for_status()


def run_artifacts(target: tg.Target, path: Path, logs: Path, work: Path) -> dict[str, Any]:
    """Upload then download `path` with the MLflow client; time and CPU seconds of each."""
    down = work / f"download-{target.name}"
    down.mkdir(exist_ok=True)
    argv = [sys.executable, "-m", "bench.client", "artifacts", "--file", str(path),
            "--download-dir", str(down)]
    result: dict[str, Any] = {}
    with _child(argv, _client_env(target, 900), logs / f"{target.name}.artifacts.log") as kid:
        proc, lines = kid
        assert proc.stdin is not None
        lines.next(300, f"{target.name} artifact client setup")
        for phase in ("upload", "download"):
            before = cpu.snapshot(target.root_pid, [proc.pid], None)
            proc.stdin.write(phase + "\n")
            proc.stdin.flush()
            result.update(json.loads(lines.next(1800, f"{target.name} artifact {phase}")))
            result[f"{phase}_cpu"] = cpu.delta(before, cpu.snapshot(target.root_pid, [proc.pid],
                                                                    None))
    tg.remove_tree(down)
    return result


def _sparse_file(path: Path, size: int) -> Path:
    """A file of `size` bytes that takes no disk space (zeros; nothing on the path compresses)."""
    with open(path, "wb") as f:
        f.truncate(size)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="short blocks, 64 MiB transfers")
    parser.add_argument("--flood", action="store_true",
                        help="also issue 4's windows under a flood of wrong passwords")
    parser.add_argument("--output", type=Path, help="also write the report (Markdown) here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (data, logs)")
    parser.add_argument("--blocks", type=int, help="alternated blocks per client count (>= 20)")
    parser.add_argument("--throughput-only", action="store_true",
                        help="only the alternated throughput (no transfers, no revocation)")
    parser.add_argument("--variants", help="comma-separated servers besides bare (default: all)")
    parser.add_argument("--transfers-only", action="store_true",
                        help="only the artifact transfers (curl and MLflow client), bare and "
                        "trackgate")
    parser.add_argument("--transfer-rounds", type=int,
                        help="interleaved rounds of the curl and MLflow-client transfers")
    args = parser.parse_args()
    # `kill PID` unwinds like Ctrl-C, so every server and client is stopped in `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = QUICK if args.quick else FULL
    if args.blocks:
        plan = dataclasses.replace(plan, blocks=max(20, args.blocks), block_seconds=3600)
    if args.transfer_rounds:
        plan = dataclasses.replace(plan, transfer_rounds=args.transfer_rounds,
                                   artifact_rounds=args.transfer_rounds)
    wanted = set(args.variants.split(",")) if args.variants else set(LABELS)
    unknown = wanted - set(LABELS)
    if unknown:
        parser.error(f"unknown variants {sorted(unknown)}; known: {', '.join(LABELS)}")
    if args.transfers_only:
        wanted = {"trackgate"}
    elif not args.throughput_only:
        wanted |= {"trackgate", "trackgate-nginx-cache"}  # transfers and revocation use them
    began = time.monotonic()
    started_at = dt.datetime.now(dt.UTC)
    work = Path(tempfile.mkdtemp(prefix="trackgate-bench-"))
    work.chmod(0o711)  # as root, the stack's service account must pass through to its data dir
    logs = work / "logs"
    logs.mkdir()
    print(f"work dir: {work}", flush=True)
    cells: list[Cell] = []
    transfers: dict[str, list[dict[str, Any]]] = {}
    results: list[alternated.Alternated] = []
    curl: dict[str, Any] = {}
    revoked: dict[str, dict[str, Any]] = {}
    flood_names = [f"flood-{i:03d}" for i in range(plan.flood_users)]
    try:
        with contextlib.ExitStack() as stack:
            bare = stack.enter_context(tg.bare_gunicorn(work))
            servers = [bare]
            starters = {
                "trackgate": lambda: tg.trackgate_stack(work),
                "trackgate-gunicorn": lambda: tg.trackgate_stack(
                    work, "trackgate-gunicorn", gateway_server="gunicorn"),
                "trackgate-nginx-cache": lambda: tg.trackgate_stack(work,
                                                                    "trackgate-nginx-cache"),
                "trackgate-no-auth-hop": lambda: tg.trackgate_stack(work,
                                                                    "trackgate-no-auth-hop"),
                "trackgate-no-metrics": lambda: tg.trackgate_stack(
                    work, "trackgate-no-metrics", metrics="false"),
                "textbook": lambda: tg.textbook_nginx(work, bare.port),
                "tls-proxy": lambda: tg.textbook_nginx(work, bare.port, auth=False),
                "mlflow-auth": lambda: tg.mlflow_basic_auth(work),
            }
            for name, start in starters.items():
                if name in wanted:
                    servers.append(stack.enter_context(start()))
                    if name == "trackgate-nginx-cache":
                        tg.cache_auth_answers(servers[-1])
                    if name == "trackgate-no-auth-hop":
                        tg.skip_auth_hop(servers[-1])
            by_name = {s.name: s for s in servers}
            pools = {s.name: ClientPool(stack, s, plan, logs) for s in servers}
            print(f"servers and clients up after {time.monotonic() - began:.0f} s", flush=True)
            for clients in () if args.transfers_only else (1, plan.concurrency):
                each = plan.calls if clients == 1 else plan.calls_each
                calls = {s.name: plan.textbook_calls if s.name == "textbook" else each
                         for s in servers}
                results.append(alternated.run(servers, pools, clients, plan.blocks, calls,
                                              plan.block_seconds))
            if not args.throughput_only:
                trackgate = by_name["trackgate"]
                # Uploads with the body through MLflow: S3 stores, nginx on another host.
                via_mlflow = stack.enter_context(tg.trackgate_stack(
                    work, "trackgate-mlflow-uploads", artifact_uploads="tracking"))
                curl = transfers_mod.measure(bare, trackgate, work, plan.artifact_bytes,
                                             plan.transfer_rounds, via_mlflow)
                source = _sparse_file(work / "artifact.bin", plan.artifact_bytes)
                for _ in range(plan.artifact_rounds):
                    for server in (bare, trackgate, via_mlflow):
                        result = run_artifacts(server, source, logs, work)
                        transfers.setdefault(server.name, []).append(result)
                        print(f"  artifacts {server.name}: {result}", flush=True)
                source.unlink()
                for target in () if args.transfers_only else (trackgate, by_name[
                        "trackgate-nginx-cache"]):
                    revoked[target.name] = transfers_mod.revocation(target)
                    print(f"  revocation {target.name}: {revoked[target.name]}", flush=True)
            if args.flood:
                _flood_cells(servers, pools, plan, logs, flood_names, cells)
    finally:
        (work / "cells.json").write_text(json.dumps({
            "alternated": [asdict(r) for r in results], "curl": curl, "revocation": revoked,
            "cells": [asdict(c) for c in cells], "transfers": transfers}, indent=1))
        if not args.keep:
            for name in ("bare", "trackgate", "trackgate-gunicorn", "trackgate-nginx-cache",
                         "trackgate-no-metrics", "trackgate-no-auth-hop", "textbook", "tls-proxy",
                         "mlflow-auth", "static",
                         "trackgate-mlflow-uploads"):
                tg.remove_tree(work / name)
    elapsed = time.monotonic() - began
    command = shlex.join([".venv/bin/python", "-m", "bench.run", *sys.argv[1:]])
    header = (f"# trackgate benchmark (issues 4 and 18)\n\n"
              f"- Date: {started_at:%Y-%m-%d %H:%M} UTC; run time {elapsed / 60:.1f} min\n"
              f"- Command: `{command}`\n"
              f"{report.machine()}"
              "- Servers, clients and curl all on this machine, over loopback. **The machine is "
              "shared** with other sessions' test suites: see the load figures.\n\n")
    text = header + render(plan, results, curl, transfers, revoked,
                           throughput_only=args.throughput_only)
    if cells:
        text += "\n" + report.render(cells, {}, plan)
    print("\n" + text)
    if args.output:
        args.output.write_text(text)
    print(f"raw results and logs: {work}")


def _flood_cells(servers: list[tg.Target], pools: dict[str, ClientPool], plan: Plan,
                 logs: Path, flood_names: list[str], cells: list[Cell]) -> None:
    """Issue 4's measurement: each password-protected server with and without a flood."""
    protected = [s for s in servers if s.name in ("trackgate", "textbook", "mlflow-auth")]
    for server in protected:
        add_flood_users(server, flood_names)
    for clients in (1, plan.concurrency):
        for variant in ("single", "spread"):
            for server in protected:
                before = run_cell(server, pools[server.name], plan, clients, None, logs,
                                  flood_names, "paired")
                flooded = run_cell(server, pools[server.name], plan, clients, variant, logs,
                                   flood_names, "flood")
                flooded.baseline_rate = before.rate
                cells += [before, flooded]
                _progress(before)
                _progress(flooded)


def _client_upload_ratio(transfers: dict[str, list[dict[str, Any]]]) -> float:
    """Speed through trackgate / speed direct, of the MLflow client's fastest uploads."""
    if not transfers.get("bare") or not transfers.get("trackgate"):
        return float("nan")
    return (min(r["upload_s"] for r in transfers["bare"])
            / min(r["upload_s"] for r in transfers["trackgate"]))


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**MISSED**"


def render(plan: Plan, results: list[alternated.Alternated], curl: dict[str, Any],
           transfers: dict[str, list[dict[str, Any]]],
           revoked: dict[str, dict[str, Any]], throughput_only: bool = False) -> str:
    out = [] if not results else ["## Throughput: `log_metric` by alternated calls", "",
           f"One MLflow client process per variant ({plan.concurrency} at {plan.concurrency} "
           f"clients); blocks of {plan.calls} calls (at {plan.concurrency} clients "
           f"{plan.calls_each} per client, {plan.calls_each * plan.concurrency} in all; "
           f"textbook {plan.textbook_calls} per client: it spends ~200 ms of "
           "bcrypt per call) to each variant in turn, the order rotated each block; ratio to "
           "bare per block. Server CPU: every process of the variant's tree (textbook and "
           "tls-proxy: their nginx only; the bare gunicorn behind them is not counted).", "",
           alternated.render(results, LABELS)]
    if throughput_only:
        out += ["", *_target_table(_throughput_targets(results)), *_floor_rows(results)]
        return "\n".join(out) + "\n"
    size = curl.get("bytes", 0) / 2**30
    down, up = curl.get("download", {}), curl.get("upload", {})
    med = transfers_mod.median
    out += [f"## Artifact transfers with curl: {size:.2f} GiB, interleaved, "
            f"{len(down.get('trackgate', []))} rounds", "",
            "| path | seconds (median) | all rounds | ratio (median of rounds) |",
            "| --- | ---: | --- | ---: |"]

    def row(label: str, values: list[float], ratio: str) -> None:
        out.append(f"| {label} | {med(values):.2f} | "
                   f"{' / '.join(f'{v:.2f}' for v in values)} | {ratio} |")

    dr = curl.get("download_ratios", [])
    row("download: nginx serves the file over TLS, no auth (the limit)",
        down.get("static", []), "1")
    row("download: through trackgate (auth, tracking server decides, nginx sends)",
        down.get("trackgate", []), f"{med(dr):.3f}x the time (min {min(dr, default=0):.3f}, "
        f"max {max(dr, default=0):.3f})")
    row("upload: straight to bare gunicorn (no TLS)", up.get("direct", []), "1")
    for variant, label in (
            ("shipped", "through trackgate as shipped (nginx writes the file, the tracking "
             "server links it into place)"),
            ("mlflow", "through trackgate, body through MLflow (`artifact_uploads=tracking`: "
             "S3 stores, nginx on another host)")):
        if variant not in up:
            continue
        ratios = curl.get(f"upload_ratio_{variant}", [])
        row(f"upload: {label}", up.get(variant, []),
            f"{med(ratios):.3f}x direct speed (min {min(ratios, default=0):.3f})")
    if transfers:
        out += ["", "MLflow client, same file size (`log_artifact` / `download_artifacts`, "
                "fastest of the runs):", "", "| path | upload s | download s |",
                "| --- | ---: | ---: |"]
        for name, runs in transfers.items():
            out.append(f"| {name} | {min(r['upload_s'] for r in runs):.2f} | "
                       f"{min(r['download_s'] for r in runs):.2f} |")
    out += [] if not revoked else ["", "## Revocation latency", "",
            "A client repeats a cached password as fast as it can while `trackgate users "
            "passwd` changes it; every request that starts after the command returned must be "
            "refused.", "",
            "| variant | `passwd` took | 200s before the return | requests after it | of them "
            "200 | first refusal after the return | last 200 started (relative to the return) |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for name, r in revoked.items():
        out.append(f"| {LABELS.get(name, name)} | {r['command_s']:.2f} s | {r['before_ok']} | "
                   f"{r['after']} | {r['after_ok']} | {r['first_refusal_ms']:.1f} ms | "
                   f"{r['last_ok_ms']:.1f} ms |")
    out.append("")
    targets = _throughput_targets(results)
    targets += [
        ("1 GiB download through trackgate <= 1.1x nginx-serves-file (time)", med(dr),
         lambda v: v <= 1.1, "{:.3f}x"),
        ("upload through trackgate >= 0.8x direct, MLflow client `log_artifact` (fastest "
         "runs)", _client_upload_ratio(transfers), lambda v: v >= 0.8, "{:.3f}x"),
        ("upload through trackgate >= 0.8x direct, curl (as shipped)",
         med(curl.get("upload_ratio_shipped", [])), lambda v: v >= 0.8, "{:.3f}x"),
    ]
    if revoked:
        targets.append(("revocation latency 0: no old-password success after `passwd` returned",
                        float(revoked.get("trackgate", {}).get("after_ok", 1)), lambda v: v == 0,
                        "{:.0f} successes"))
    out += [*_target_table(targets), *_floor_rows(results)]
    return "\n".join(out) + "\n"


TargetRow = tuple[str, float, Callable[[float], bool], str]  # label, value, test, format


def _clients(one: alternated.Alternated) -> str:
    return "1 client" if one.clients == 1 else f"{one.clients} clients"


def _throughput_targets(results: list[alternated.Alternated]) -> list[TargetRow]:
    return [(f"trackgate >= 0.95x bare, {_clients(one)} ({one.blocks} blocks)",
             alternated.ratio(one, "trackgate")[0], lambda v: v >= 0.95, "{:.3f}x")
            for one in results if "trackgate" in one.series]  # 1 client, then `concurrency`


def _target_table(targets: list[TargetRow]) -> list[str]:
    out = ["## Targets (issue 18)", "", "| target | measured | verdict |", "| --- | ---: | --- |"]
    return out + [f"| {label} | {fmt.format(value)} | {_verdict(ok(value))} |"
                  for label, value, ok, fmt in targets]


def _floor_rows(results: list[alternated.Alternated]) -> list[str]:
    """The throughput targets beside what no auth at all reaches in the same run: no proxy that
    terminates TLS here can do better, and trackgate's own share of the gap is the rest."""
    out: list[str] = []
    for one in results:
        if "tls-proxy" not in one.series:
            continue
        out.append(f"| (the floor: nginx TLS proxy, no auth, {_clients(one)}) | "
                   f"{alternated.ratio(one, 'tls-proxy')[0]:.3f}x | – |")
        if "trackgate" in one.series:
            own = [t / f for t, f in zip(one.series["trackgate"].rates,
                                         one.series["tls-proxy"].rates, strict=True) if f]
            out.append(f"| (trackgate / the floor, {_clients(one)}, median of blocks) | "
                       f"{transfers_mod.median(own):.3f}x | – |")
    return out


def _progress(cell: Cell) -> None:
    print(f"  {cell.kind:6s} {cell.target:12s} clients={cell.clients} flood={cell.flood or '-':6s}"
          f" {cell.rate:7.1f} calls/s  p95 {cell.p95_ms:7.1f} ms  /health p95 "
          f"{cell.health_p95_ms:7.1f} ms  err {cell.errors}  load {cell.load1:.1f}  "
          f"cpu {cell.cpu_s}"
          + (f"  flood {cell.flood_rate:.0f}/s {cell.flood_by_status}" if cell.flood else ""),
          flush=True)


if __name__ == "__main__":
    main()
