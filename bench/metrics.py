"""Throughput with metrics on vs off, side by side (issue 17).

    .venv/bin/python -m bench.metrics [--blocks 40] [--calls 30] [--max-seconds 240]

Two real stacks (`trackgate up`: nginx + TLS + auth gateway + gunicorn/MLflow), the same user
and password on each:

- **on**: metrics as shipped (TRACKGATE_METRICS=true): the gateway's counters, nginx's syslog
  line per request, MLflow's exporter in every tracking worker, and a scraper reading all three
  metrics URLs every 5 s (three times Prometheus's default rate);
- **off**: the same stack with TRACKGATE_METRICS=false (no exporter, no log line, no counters).

The method of bench/roles.py: one process, one `MlflowClient` per stack, each logging to a run of
its own; `log_metric` calls alternate variant by variant in blocks of `--calls` (the order
swaps each block), so the shared machine's drifts hit both alike. Each block gives a ratio
on/off; the table shows the median of the blocks, the middle half and the extremes, and the
server CPU per call read from /proc (all processes of each stack).
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

import requests

from tests.support import RunningStack, running_stack

from . import report
from . import targets as tg

VARIANTS = ("on", "off")
MIN_BLOCKS = 20
SCRAPE_EVERY = 5.0


def _scraper(urls: list[str], stop: threading.Event, scraped: list[int]) -> None:
    while not stop.wait(SCRAPE_EVERY):
        for url in urls:
            requests.get(url, timeout=10).raise_for_status()
            scraped[0] += 1


def render(result: dict[str, Any]) -> str:
    rates, cpu_s, done = result["rates"], result["cpu_s"], result["calls"]
    ratios = [a / b for a, b in zip(rates["on"], rates["off"], strict=True)]
    q = statistics.quantiles(ratios, n=4)
    lines = [
        "| variant | log_metric calls/s (median of blocks) | ratio on/off, median of blocks "
        "| middle half | min – max | server CPU per call |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for name, label in (("off", "metrics off"), ("on", "metrics on, scraped every 5 s")):
        per_call = 1e6 * cpu_s[name] / max(done[name], 1)
        cells = ("1", "–", "–") if name == "off" else (
            f"{statistics.median(ratios):.3f}", f"{q[0]:.3f} – {q[2]:.3f}",
            f"{min(ratios):.3f} – {max(ratios):.3f}")
        lines.append(f"| {label} | {statistics.median(rates[name]):.1f} | {' | '.join(cells)} "
                     f"| {per_call:.0f} µs |")
    loads = result["loads"]
    lines += ["", f"{len(ratios)} blocks of {done['off'] // max(len(ratios), 1)} calls per "
              f"variant; {result['scrapes']} scrapes of the 'on' stack; 1-min load average "
              f"{min(loads):.1f} – {max(loads):.1f} (`nproc` {os.cpu_count()})."]
    return "\n".join(lines) + "\n"


def _check_variants(stacks: dict[str, RunningStack]) -> None:
    """The variants are what they claim: 'on' counted the calls, 'off' has no listener."""
    on = requests.get(stacks["on"].settings.metrics_urls["gateway"], timeout=10).text
    if "trackgate_auth_cache_hits_total" not in on or "trackgate_http_requests_total" not in on:
        raise SystemExit("variant 'on': the gateway's metrics are missing")
    if stacks["off"].settings.metrics_urls:
        raise SystemExit("variant 'off' has metrics URLs")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=40)
    parser.add_argument("--calls", type=int, default=30, help="log_metric calls per block")
    parser.add_argument("--max-seconds", type=float, default=240,
                        help="stop adding blocks after this (at least 20 blocks are run)")
    args = parser.parse_args()
    started = dt.datetime.now(dt.UTC)
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="trackgate-bench-metrics-"))
    work.chmod(0o711)  # as root, each stack's service account passes through to its data dir
    stop, scraped = threading.Event(), [0]
    try:
        with contextlib.ExitStack() as stack:
            stacks = {name: stack.enter_context(running_stack(
                work / name, bcrypt_rounds=tg.BCRYPT_ROUNDS, metrics=name == "on"))
                for name in VARIANTS}
            clients = tg.mlflow_clients(stacks, work, os.urandom(12).hex())
            scraper = threading.Thread(target=_scraper, daemon=True, args=(
                list(stacks["on"].settings.metrics_urls.values()), stop, scraped))
            scraper.start()
            print(f"stacks and clients up after {time.monotonic() - began:.0f} s", flush=True)
            result = tg.measure_log_metric(stacks, clients, VARIANTS, args.blocks, args.calls,
                                           args.max_seconds, min_blocks=MIN_BLOCKS)
            stop.set()
            scraper.join()
            result["scrapes"] = scraped[0]
            _check_variants(stacks)
    finally:
        for name in VARIANTS:
            tg.remove_tree(work / name)
    command = shlex.join([".venv/bin/python", "-m", "bench.metrics", *sys.argv[1:]])
    print(f"\n- Date: {started:%Y-%m-%d %H:%M} UTC; run time "
          f"{(time.monotonic() - began) / 60:.1f} min\n- Command: `{command}`\n"
          f"{report.machine()}\n{render(result)}")


if __name__ == "__main__":
    main()
