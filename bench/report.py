"""The benchmark's Markdown report: absolute figures, ratios, and the issue's targets."""

from __future__ import annotations

import os
import platform
import ssl
import statistics
import subprocess
from collections import defaultdict
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .run import Cell, Plan

SERVERS = ("bare", "trackgate", "textbook", "mlflow-auth")
COMPONENTS = ("nginx", "gateway", "gunicorn", "supervisor", "clients", "attacker", "other",
              "elsewhere")


def _fmt(x: float, digits: int = 1) -> str:
    return "n/a" if x != x else f"{x:,.{digits}f}"  # x != x: NaN


def _ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def _verdict(ok: bool) -> str:
    return "**met**" if ok else "**MISSED**"


def _median(cells: list[Cell], value: Callable[[Cell], float]) -> float:
    return statistics.median(value(c) for c in cells) if cells else float("nan")


class _Rounds:
    """The interleaved no-flood windows of each (server, clients), reduced to medians."""

    def __init__(self, cells: list[Cell]) -> None:
        self.by_key: dict[tuple[str, int], list[Cell]] = defaultdict(list)
        for c in cells:
            if c.kind == "round":
                self.by_key[(c.target, c.clients)].append(c)

    def rate(self, target: str, clients: int) -> float:
        return _median(self.by_key.get((target, clients), []), lambda c: c.rate)

    def rates(self, target: str, clients: int) -> str:
        return " / ".join(f"{c.rate:.1f}" for c in self.by_key.get((target, clients), []))

    def median(self, target: str, clients: int, value: Callable[[Cell], float]) -> float:
        return _median(self.by_key.get((target, clients), []), value)

    def cpu_ms_per_call(self, target: str, clients: int) -> dict[str, float]:
        cells = self.by_key.get((target, clients), [])
        calls = sum(c.calls for c in cells)
        total: dict[str, float] = defaultdict(float)
        for c in cells:
            for k, v in c.cpu_s.items():
                total[k] += v
        return {k: 1000 * v / calls for k, v in total.items()} if calls else {}


def render(cells: list[Cell], all_transfers: dict[str, list[dict[str, Any]]],
           plan: Plan) -> str:
    rounds = _Rounds(cells)
    # Fixed work on a shared machine: the fastest transfer is the least disturbed one.
    transfers: dict[str, dict[str, Any]] = {name: {"bytes": runs[0]["bytes"],
                        "upload_s": min(r["upload_s"] for r in runs),
                        "download_s": min(r["download_s"] for r in runs),
                        "upload_cpu": min(runs, key=lambda r: r["upload_s"])["upload_cpu"],
                        "download_cpu": min(runs, key=lambda r: r["download_s"])["download_cpu"],
                        "uploads": " / ".join(f"{r['upload_s']:.1f}" for r in runs),
                        "downloads": " / ".join(f"{r['download_s']:.1f}" for r in runs)}
                 for name, runs in all_transfers.items() if runs}
    conc = plan.concurrency
    out: list[str] = []
    out += [f"## Throughput: MLflow `log_metric` calls/s, no flood (median of {plan.rounds} "
            "interleaved rounds)", "",
            f"| server | 1 client | rounds | p50 / p95 ms | {conc} clients | rounds | p50 / p95 ms "
            "| /health p95 ms |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name in SERVERS:
        if (name, 1) not in rounds.by_key:
            continue

        def lat(n: int, name: str = name) -> str:
            return (f"{_fmt(rounds.median(name, n, lambda c: c.p50_ms))} / "
                    f"{_fmt(rounds.median(name, n, lambda c: c.p95_ms))}")

        health = rounds.median(name, conc, lambda c: c.health_p95_ms)
        out.append(f"| {name} | {_fmt(rounds.rate(name, 1))} | {rounds.rates(name, 1)} | {lat(1)} "
                   f"| {_fmt(rounds.rate(name, conc))} | {rounds.rates(name, conc)} | {lat(conc)} "
                   f"| {_fmt(health)} |")
    out += ["", f"| ratio | 1 client | {conc} clients |", "|---|---:|---:|"]
    for a, b in (("trackgate", "bare"), ("trackgate", "textbook"), ("trackgate", "mlflow-auth"),
                 ("textbook", "bare"), ("mlflow-auth", "bare")):
        vals = [_ratio(rounds.rate(a, n), rounds.rate(b, n)) for n in (1, conc)]
        out.append(f"| {a} / {b} | {_fmt(vals[0], 2)}x | {_fmt(vals[1], 2)}x |")

    out += ["", "CPU milliseconds per `log_metric` call, by process (all rounds; `elsewhere` = "
            "the rest of the machine, i.e. other work on a shared host):", "",
            "| server | clients | " + " | ".join(COMPONENTS) + " |",
            "|---|---:|" + "---:|" * len(COMPONENTS)]
    for name in SERVERS:
        for n in (1, conc):
            ms = rounds.cpu_ms_per_call(name, n)
            if ms:
                out.append(f"| {name} | {n} | "
                           + " | ".join(_fmt(ms.get(k, 0.0), 2) for k in COMPONENTS) + " |")

    out += ["", "## Under a flood of wrong passwords", "",
            f"Flood: {plan.flood_threads} attacker connections from a separate process, at most "
            f"{plan.flood_rate:g} guesses/s each. `single` = one source IP guessing the known "
            "user's password (classic brute force); `spread` = a new source IP (127.100.x.y) every "
            f"4 guesses, over {plan.flood_users} existing usernames (a botnet spraying a user "
            "list), so no per-IP or per-user throttle trips and every guess costs a real hash "
            "check. Legit clients run from 127.0.0.1; each flooded window is compared with a "
            f"no-flood window of the same server run just before it; the flood starts "
            f"{plan.flood_ramp:g} s before the window opens.", "",
            "| server | flood | clients | legit calls/s (before) | flooded / unflooded "
            "| vs rounds median "
            "| legit p95 ms | /health p50 / p95 ms (failed) | guesses/s | attacker p50 ms "
            "| answers to the flood | CPU s: gateway / nginx / gunicorn / attacker / elsewhere |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for c in cells:
        if c.kind != "flood":
            continue
        answers = ", ".join(f"{k}: {v}" for k, v in sorted(c.flood_by_status.items()))
        errors = f", {c.errors} errors" if c.errors else ""
        cpu = " / ".join(_fmt(c.cpu_s.get(k, 0.0), 1)
                         for k in ("gateway", "nginx", "gunicorn", "attacker", "elsewhere"))
        ratio = _ratio(c.rate, c.baseline_rate)
        out.append(f"| {c.target} | {c.flood} | {c.clients} | {_fmt(c.rate)} "
                   f"({_fmt(c.baseline_rate)}{errors}) | {_fmt(100 * ratio, 0)} % "
                   f"| {_fmt(100 * _ratio(c.rate, rounds.rate(c.target, c.clients)), 0)} % "
                   f"| {_fmt(c.p95_ms)} | {_fmt(c.health_p50_ms)} / {_fmt(c.health_p95_ms)} "
                   f"({c.health_failed}/{c.health_probes}) | {_fmt(c.flood_rate)} | "
                   f"{_fmt(c.flood_p50_ms, 0)} | {answers} "
                   f"| {cpu} |")

    if transfers:
        size = next(iter(transfers.values()))["bytes"]
        out += ["", f"## Artifact transfer: {size / 2**30:.2f} GiB file, MLflow client "
                "`log_artifact` / `download_artifacts`", "",
                "| path | upload s (fastest) | all runs | upload MiB/s | download s (fastest) "
                "| all runs | download MiB/s |",
                "|---|---:|---:|---:|---:|---:|---:|"]
        for name, t in transfers.items():
            label = "direct (bare gunicorn)" if name == "bare" else f"through {name} (TLS)"
            out.append(f"| {label} | {_fmt(t['upload_s'], 2)} | {t['uploads']} | "
                       f"{_fmt(size / 2**20 / t['upload_s'], 0)} | {_fmt(t['download_s'], 2)} | "
                       f"{t['downloads']} | {_fmt(size / 2**20 / t['download_s'], 0)} |")
        out += ["", "CPU seconds during the fastest transfer of each path, by process:", "",
                "| path | phase | " + " | ".join(COMPONENTS) + " |",
                "|---|---|" + "---:|" * len(COMPONENTS)]
        for name, t in transfers.items():
            for phase in ("upload", "download"):
                used = t[f"{phase}_cpu"]
                out.append(f"| {name} | {phase} | "
                           + " | ".join(_fmt(used.get(k, 0.0), 2) for k in COMPONENTS) + " |")

    out += ["", "## Targets (issue 4)", ""]
    if plan.rounds < 2:
        out += ["A quick run: windows too short to reach a flood's steady state or to average "
                "out noise, so these verdicts are a smoke check, not a measurement.", ""]
    out += ["| target | measured | verdict |", "|---|---:|---|"]
    for n in (1, conc):
        label = f"{n} client{'s' * (n > 1)}"
        r = _ratio(rounds.rate("trackgate", n), rounds.rate("bare", n))
        out.append(f"| trackgate >= 0.9x bare gunicorn ({label}) | {_fmt(r, 2)}x | "
                   f"{_verdict(r >= 0.9)} |")
        r = _ratio(rounds.rate("trackgate", n), rounds.rate("textbook", n))
        out.append(f"| trackgate >= 18x textbook ({label}) | {_fmt(r, 1)}x | {_verdict(r >= 18)} |")
    for c in cells:
        if c.target != "trackgate" or c.kind != "flood":
            continue
        r = _ratio(c.rate, c.baseline_rate)
        where = f"`{c.flood}` flood, {c.clients} client{'s' * (c.clients > 1)}"
        out.append(f"| {where}: legit >= 80 % of unflooded | {_fmt(100 * r, 0)} % | "
                   f"{_verdict(r >= 0.8)} |")
        out.append(f"| {where}: /health p95 < 50 ms | {_fmt(c.health_p95_ms)} ms | "
                   f"{_verdict(c.health_p95_ms < 50)} |")
    if "bare" in transfers and "trackgate" in transfers:
        up = transfers["bare"]["upload_s"] / transfers["trackgate"]["upload_s"]
        down = transfers["bare"]["download_s"] / transfers["trackgate"]["download_s"]
        size = transfers["bare"]["bytes"]
        size_label = f"{size / 2**30:g} GiB" if size >= 2**30 else f"{size / 2**20:g} MiB"
        out.append(f"| {size_label} upload through trackgate >= 0.8x direct | {up:.2f}x | "
                   f"{_verdict(up >= 0.8)} |")
        out.append(f"| download through trackgate vs direct (no target) | {down:.2f}x | - |")
    loads = [c.load1 for c in cells]
    if loads:
        out += ["", f"Machine load (1-min average) as windows started: min {min(loads):.1f}, "
                f"median {statistics.median(loads):.1f}, max {max(loads):.1f} on "
                f"{os.cpu_count()} CPUs."]
    errs = [c for c in cells if c.errors]
    if errs:
        out += ["", "Client errors (first few per window):"]
        out += [f"- {c.target}, {c.clients} client(s), flood {c.flood}: {c.errors}: "
                f"{c.first_errors}" for c in errs]
    return "\n".join(out) + "\n"


def machine() -> str:
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines()
    cpu = next((line.split(":", 1)[1].strip() for line in cpuinfo
                if line.startswith("model name")), platform.processor())
    mem_kb = int(next(line.split()[1] for line in Path("/proc/meminfo").read_text().splitlines()
                      if line.startswith("MemTotal")))
    nginx = subprocess.run(["/usr/sbin/nginx", "-v"], capture_output=True, text=True).stderr
    packages = ("mlflow", "gunicorn", "flask", "werkzeug", "Flask-WTF", "bcrypt", "libpass")
    versions = ", ".join(f"{p} {metadata.version(p)}" for p in packages)
    return (f"- Machine: `nproc` {os.cpu_count()}, CPU {cpu}, {mem_kb / 2**20:.1f} GiB RAM, "
            f"{platform.platform()}\n"
            f"- Versions: Python {platform.python_version()}, "
            f"{nginx.strip().removeprefix('nginx version: ')}, {ssl.OPENSSL_VERSION}, {versions}\n")
