"""A bounded flood of wrong passwords, as its own process (an attacker is not our client).

    python -m bench.flood --port P [--tls --ca CA] --variant single|spread --users a,b,...

Variants (both realistic, and they stress different defences):

- ``single``: one source address guesses the password of one known user (classic brute force).
  trackgate's per-IP/per-user throttle turns it into cheap 429s after a few failures.
- ``spread``: a botnet-like spray over many source addresses (a new 127.x.y.z for every
  connection, a few guesses each) and many *existing* usernames, so no per-IP or per-user
  counter trips and every guess costs a real password-hash check on every server (existing
  names, because nginx and MLflow answer unknown users without hashing).

Bounded: `--threads` connections at once, at most `--rate` guesses per second per thread,
`--max-requests` in all, `--seconds` at most, or until a line arrives on stdin. Prints one JSON
line with the answers counted by status.
"""

from __future__ import annotations

import argparse
import base64
import http.client
import itertools
import json
import secrets
import ssl
import sys
import threading
import time
from collections import Counter

PATH = "/api/2.0/mlflow/experiments/search?max_results=1"
GUESSES_PER_CONNECTION = 4  # below trackgate's default failure_limit (10) per source address


class _Flood:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.stop = threading.Event()
        self.deadline = time.monotonic() + args.seconds
        self.counts: Counter[str] = Counter()
        self.lock = threading.Lock()
        self.sent = 0
        self.latencies: list[float] = []
        self.addresses = itertools.count()
        self.users = args.users.split(",")
        self.context: ssl.SSLContext | None = None
        if args.tls:
            self.context = ssl.create_default_context(cafile=args.ca)

    def _source(self) -> str:
        if self.args.variant == "single":
            return "127.0.250.250"
        n = next(self.addresses) % 60000  # 60,000 addresses: 127.100.1.2 to 127.100.250.241
        return f"127.100.{n // 240 + 1}.{n % 240 + 2}"

    def _connect(self, source: str) -> http.client.HTTPConnection:
        if self.context is not None:
            return http.client.HTTPSConnection(self.args.host, self.args.port, timeout=15,
                                               context=self.context, source_address=(source, 0))
        return http.client.HTTPConnection(self.args.host, self.args.port, timeout=15,
                                          source_address=(source, 0))

    def _take(self) -> bool:
        with self.lock:
            if self.sent >= self.args.max_requests:
                return False
            self.sent += 1
            return True

    def worker(self) -> None:
        interval = 1.0 / self.args.rate
        next_at = time.monotonic()
        while not self.stop.is_set() and time.monotonic() < self.deadline:
            conn = self._connect(self._source())
            try:
                for _ in range(GUESSES_PER_CONNECTION):
                    if self.stop.is_set() or time.monotonic() >= self.deadline or not self._take():
                        return
                    user = secrets.choice(self.users)
                    token = base64.b64encode(f"{user}:{secrets.token_urlsafe(9)}".encode())
                    began = time.monotonic()
                    conn.request("GET", PATH, headers={"Authorization": f"Basic {token.decode()}"})
                    response = conn.getresponse()
                    response.read()
                    self._count(str(response.status), time.monotonic() - began)
                    if response.getheader("Connection", "").lower() == "close":
                        break
                    next_at = max(next_at + interval, time.monotonic() - interval)
                    self.stop.wait(max(0.0, next_at - time.monotonic()))
            except (OSError, http.client.HTTPException) as exc:
                self._count(type(exc).__name__)
            finally:
                conn.close()

    def _count(self, key: str, latency: float | None = None) -> None:
        with self.lock:
            self.counts[key] += 1
            if latency is not None:
                self.latencies.append(latency)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="localhost")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--tls", action="store_true")
    parser.add_argument("--ca")
    parser.add_argument("--variant", choices=["single", "spread"], required=True)
    parser.add_argument("--users", required=True, help="comma-separated usernames to guess")
    parser.add_argument("--threads", type=int, default=8)
    parser.add_argument("--rate", type=float, default=25.0, help="guesses/s per thread, at most")
    parser.add_argument("--max-requests", type=int, default=20000)
    parser.add_argument("--seconds", type=float, default=120.0)
    args = parser.parse_args()
    flood = _Flood(args)
    threads = [threading.Thread(target=flood.worker, daemon=True) for _ in range(args.threads)]
    began = time.monotonic()
    for thread in threads:
        thread.start()
    print("started", flush=True)
    # Any line (or EOF) on stdin stops the flood early; the deadline stops it anyway.
    watcher = threading.Thread(target=lambda: (sys.stdin.readline(), flood.stop.set()),
                               daemon=True)
    watcher.start()
    for thread in threads:
        thread.join(args.seconds + 30)
    elapsed = time.monotonic() - began
    latencies = sorted(flood.latencies) or [float("nan")]
    print(json.dumps({"variant": args.variant, "requests": sum(flood.counts.values()),
                      "elapsed": elapsed, "by_status": dict(flood.counts),
                      "p50_ms": 1000 * latencies[len(latencies) // 2],
                      "max_ms": 1000 * latencies[-1]}), flush=True)


if __name__ == "__main__":
    main()
