"""The benchmark of issue 4, side by side in one run on loopback.

    .venv/bin/python -m bench.run            # full: 20 s per cell, 1 GiB artifact (~15 min)
    .venv/bin/python -m bench.run --quick    # smoke: 4 s per cell, 64 MiB artifact
    .venv/bin/python -m bench.run --output bench/RESULTS.md

Starts the four servers (see bench/targets.py), then for 1 and 4 concurrent MLflow clients
measures `log_metric` calls/s against each, then the same against each password-protected
server while a flood of wrong passwords runs (bench/flood.py) and `/health` is probed every
50 ms; then a 1 GiB artifact upload and download through trackgate vs straight to gunicorn.
Prints Markdown tables with the ratios the issue sets as targets. Every process it starts is
stopped by PID; every loop is bounded in count and time.
"""

from __future__ import annotations

import argparse
import contextlib
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
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import requests
from trackgate.users import HtpasswdStore, hash_password

from tests.support import clean_env

from . import cpu, report
from . import targets as tg

REPO = Path(__file__).resolve().parent.parent
HEALTH_INTERVAL = 0.05
HEALTH_TIMEOUT = 5.0


@dataclass(frozen=True)
class Plan:
    seconds: float  # measured window of each cell
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


FULL = Plan(seconds=12, rounds=3, artifact_rounds=2, max_calls=20_000, artifact_bytes=1 << 30)
QUICK = Plan(seconds=4, rounds=1, artifact_rounds=1, max_calls=5_000, artifact_bytes=64 << 20,
             flood_ramp=2.0)


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
    parser.add_argument("--quick", action="store_true", help="short windows, 64 MiB artifact")
    parser.add_argument("--output", type=Path, help="also write the report (Markdown) here")
    parser.add_argument("--keep", action="store_true", help="keep the work dir (data, logs)")
    args = parser.parse_args()
    # `kill PID` unwinds like Ctrl-C, so every server and client is stopped in `finally`.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    plan = QUICK if args.quick else FULL
    began = time.monotonic()
    started_at = dt.datetime.now(dt.UTC)
    work = Path(tempfile.mkdtemp(prefix="trackgate-bench-"))
    work.chmod(0o711)  # as root, the stack's service account must pass through to its data dir
    logs = work / "logs"
    logs.mkdir()
    print(f"work dir: {work}", flush=True)
    cells: list[Cell] = []
    transfers: dict[str, list[dict[str, Any]]] = {}
    flood_names = [f"flood-{i:03d}" for i in range(plan.flood_users)]
    try:
        with contextlib.ExitStack() as stack:
            bare = stack.enter_context(tg.bare_gunicorn(work))
            servers = [bare, stack.enter_context(tg.trackgate_stack(work)),
                       stack.enter_context(tg.textbook_nginx(work, bare.port)),
                       stack.enter_context(tg.mlflow_basic_auth(work))]
            protected = [s for s in servers if s.needs_auth]
            for server in protected:
                add_flood_users(server, flood_names)
            pools = {s.name: ClientPool(stack, s, plan, logs) for s in servers}
            print(f"servers and clients up after {time.monotonic() - began:.0f} s", flush=True)

            def cell(server: tg.Target, clients: int, flood: str | None, kind: str) -> Cell:
                result = run_cell(server, pools[server.name], plan, clients, flood, logs,
                                  flood_names, kind)
                cells.append(result)
                _progress(result)
                return result

            # Interleaved rounds, rotating the order, so slow drifts of the machine's load hit
            # every server alike; the report takes the median.
            for round_no in range(plan.rounds):
                order = servers[round_no % len(servers):] + servers[:round_no % len(servers)]
                for clients in (1, plan.concurrency):
                    for server in order:
                        cell(server, clients, None, "round")
            for clients in (1, plan.concurrency):
                for variant in ("single", "spread"):
                    for server in protected:
                        before = cell(server, clients, None, "paired")
                        flooded = cell(server, clients, variant, "flood")
                        flooded.baseline_rate = before.rate
            source = _sparse_file(work / "artifact.bin", plan.artifact_bytes)
            for _ in range(plan.artifact_rounds):
                for server in (bare, servers[1]):
                    result = run_artifacts(server, source, logs, work)
                    transfers.setdefault(server.name, []).append(result)
                    print(f"  artifacts {server.name}: {result}", flush=True)
            source.unlink()
    finally:
        (work / "cells.json").write_text(json.dumps({"cells": [asdict(c) for c in cells],
                                                     "transfers": transfers}, indent=1))
        if not args.keep:
            for name in ("bare", "trackgate", "textbook", "mlflow-auth"):
                tg.remove_tree(work / name)
    elapsed = time.monotonic() - began
    command = shlex.join([".venv/bin/python", "-m", "bench.run", *sys.argv[1:]])
    header = (f"# trackgate benchmark (issue 4)\n\n"
              f"- Date: {started_at:%Y-%m-%d %H:%M} UTC; run time {elapsed / 60:.1f} min\n"
              f"- Command: `{command}`\n"
              f"{report.machine()}"
              f"- Plan: {plan.seconds:g} s windows, {plan.rounds} interleaved rounds; servers, "
              "legit clients and attacker all on this machine, over loopback\n\n")
    text = header + report.render(cells, transfers, plan)
    print("\n" + text)
    if args.output:
        args.output.write_text(text)
    print(f"raw results and logs: {work}")


def _progress(cell: Cell) -> None:
    print(f"  {cell.kind:6s} {cell.target:12s} clients={cell.clients} flood={cell.flood or '-':6s}"
          f" {cell.rate:7.1f} calls/s  p95 {cell.p95_ms:7.1f} ms  /health p95 "
          f"{cell.health_p95_ms:7.1f} ms  err {cell.errors}  load {cell.load1:.1f}  "
          f"cpu {cell.cpu_s}"
          + (f"  flood {cell.flood_rate:.0f}/s {cell.flood_by_status}" if cell.flood else ""),
          flush=True)


if __name__ == "__main__":
    main()
