"""Throughput by alternated calls (issue 18): the method that holds on a shared machine.

One window per variant gave ratios from 0.36 to 2.99 under other people's load. Here every
variant has its own MLflow client process(es), and `log_metric` calls go in blocks: COUNT calls
to A, then to B, C..., the order rotated each block, so a drift of the machine's load hits all
variants alike. Each block gives each variant a rate and a ratio to the baseline of the same
block; the report is the median of the block ratios with its spread (middle half, extremes)
and the number of blocks. Server CPU per call is read from /proc (every process of the
variant's tree) around each of its blocks.
"""

from __future__ import annotations

import json
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from . import cpu

if TYPE_CHECKING:
    from .run import ClientPool
    from .targets import Target


@dataclass
class Series:
    """One variant at one client count: a rate and a ratio per block, CPU and call counts."""

    rates: list[float] = field(default_factory=list)
    ratios: list[float] = field(default_factory=list)
    cpu_s: dict[str, float] = field(default_factory=dict)
    calls: int = 0
    errors: int = 0
    first_errors: list[str] = field(default_factory=list)


@dataclass
class Alternated:
    baseline: str
    clients: int
    blocks: int = 0
    series: dict[str, Series] = field(default_factory=dict)
    loads: list[float] = field(default_factory=list)
    seconds: float = 0.0


def _block(target: Target, pool: ClientPool, clients: int,
           count: int) -> tuple[float, dict[str, Any]]:
    """COUNT calls on each of CLIENTS processes at once: (calls/s, summary)."""
    for proc, _lines in pool.kids[:clients]:
        assert proc.stdin is not None
        proc.stdin.write(f"n {count}\n")
        proc.stdin.flush()
    results = [json.loads(lines.next(600, f"{target.name} block")) for _p, lines in
               pool.kids[:clients]]
    calls = sum(r["calls"] for r in results)
    elapsed = max(r["elapsed"] for r in results)
    summary = {"calls": calls, "errors": sum(r["errors"] for r in results),
               "first_errors": [e for r in results for e in r["first_errors"]][:3]}
    return calls / elapsed if elapsed > 0 else 0.0, summary


def run(targets: list[Target], pools: dict[str, ClientPool], clients: int, blocks: int,
        calls: dict[str, int], max_seconds: float, progress: bool = True) -> Alternated:
    """`blocks` blocks (at least 20, fewer only past max_seconds) over all targets; the first
    target is the baseline of the ratios. `calls[name]` calls per client and block."""
    baseline = targets[0].name
    result = Alternated(baseline, clients, series={t.name: Series() for t in targets})
    for target in targets:  # warm: connections, caches, MLflow's first-call paths
        _block(target, pools[target.name], clients, 3)
    began = time.monotonic()
    for block in range(blocks):
        if block >= 20 and time.monotonic() - began > max_seconds:
            break
        shift = block % len(targets)
        rates: dict[str, float] = {}
        for target in targets[shift:] + targets[:shift]:
            pool = pools[target.name]
            before = cpu.snapshot(target.root_pid, [], None)
            rate, summary = _block(target, pool, clients, calls[target.name])
            used = cpu.delta(before, cpu.snapshot(target.root_pid, [], None))
            series = result.series[target.name]
            for component, seconds in used.items():
                if component != "elsewhere":
                    series.cpu_s[component] = series.cpu_s.get(component, 0.0) + seconds
            series.calls += summary["calls"]
            series.errors += summary["errors"]
            series.first_errors = (series.first_errors + summary["first_errors"])[:3]
            rates[target.name] = rate
        for name, rate in rates.items():
            result.series[name].rates.append(rate)
            result.series[name].ratios.append(rate / rates[baseline] if rates[baseline] else 0)
        result.blocks += 1
        result.loads.append(os.getloadavg()[0])
        if progress:
            print(f"  block {block + 1:2d} clients={clients} load {result.loads[-1]:.1f}  " +
                  "  ".join(f"{n} {r:6.1f}/s" for n, r in rates.items()), flush=True)
    result.seconds = time.monotonic() - began
    return result


def spread(values: list[float]) -> tuple[float, float, float]:
    """(median, first quartile, third quartile)."""
    if len(values) < 2:
        v = values[0] if values else float("nan")
        return v, v, v
    q = statistics.quantiles(values, n=4)
    return statistics.median(values), q[0], q[2]


def render(results: list[Alternated], labels: dict[str, str]) -> str:
    lines = [
        "| variant | clients | calls/s (median of blocks) | ratio to bare, median of blocks "
        "| middle half | min – max | blocks | server CPU ms per call (nginx / gateway / "
        "gunicorn+MLflow / total) | errors |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | --- | ---: |",
    ]
    for result in results:
        for name, series in result.series.items():
            median, low, high = spread(series.ratios)
            rate = statistics.median(series.rates) if series.rates else float("nan")
            per = {k: 1000 * v / max(series.calls, 1) for k, v in series.cpu_s.items()}
            total = sum(per.values())
            cpu_text = (f"{per.get('nginx', 0):.2f} / {per.get('gateway', 0):.2f} / "
                        f"{per.get('gunicorn', 0):.2f} / {total:.2f}")
            is_base = name == result.baseline
            lines.append(
                f"| {labels.get(name, name)} | {result.clients} | {rate:.1f} | "
                f"{'1' if is_base else f'{median:.3f}'} | "
                f"{'–' if is_base else f'{low:.3f} – {high:.3f}'} | "
                f"{'–' if is_base else f'{min(series.ratios):.3f} – {max(series.ratios):.3f}'} | "
                f"{result.blocks} | {cpu_text} | {series.errors} |")
    loads = [x for r in results for x in r.loads]
    if loads:
        lines.append("")
        lines.append(f"1-min load average during these blocks: {min(loads):.1f} – "
                     f"{max(loads):.1f} (median {statistics.median(loads):.1f}) on "
                     f"`nproc` {os.cpu_count()}.")
    return "\n".join(lines) + "\n"


def ratio(result: Alternated, name: str) -> tuple[float, float, float, int]:
    """(median, first quartile, third quartile, blocks) of NAME's ratio to the baseline."""
    median, low, high = spread(result.series[name].ratios)
    return median, low, high, result.blocks
