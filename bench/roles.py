"""Throughput with roles on vs off, and of the per-resource mode, side by side (issue 14).

    .venv/bin/python -m bench.roles [--blocks 60] [--calls 30] [--max-seconds 300]

Three real stacks (`trackgate up`: nginx + TLS + auth gateway + gunicorn/MLflow), the same user
and password on each:

- **on**: the policy layer as shipped (roles, owners, stamping, audit), no private experiment;
- **private**: the same with one private experiment (an admin's), so every request takes the
  per-resource path;
- **off**: the same stack, but its tracking app is loaded without the access layer (a bench-only
  `sitecustomize` on the tracking server's PYTHONPATH swaps `_load_mlflow`; the artifact-root
  rules stay). A check after the run proves it: its audit log has no line.

One process, one `MlflowClient` per stack, each logging to a run of its own: `log_metric` calls
alternate variant by variant in blocks of `--calls` (the order rotates each block), so the shared
machine's drifts hit every variant alike. Each block gives a ratio on/off and private/off; the
table shows the median of the blocks, the middle half and the extremes, plus the server CPU per
call read from /proc (all processes of each stack). Bounded by `--blocks` and `--max-seconds`.
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
import time
from pathlib import Path
from typing import Any

from tests.support import RunningStack, patched_environ, running_stack

from . import report
from . import targets as tg

VARIANTS = ("on", "private", "off")
MIN_BLOCKS = 20

# Loaded by every Python process of the "off" stack (PYTHONPATH): the tracking server then serves
# MLflow behind the policy layer's artifact-root rules only, as before roles existed.
_OFF_HOOK = '''\
"""bench/roles.py, variant "off": the tracking app without trackgate's access layer."""
import os

import trackgate.server.tracking as _tracking


def _load_mlflow(settings=None):
    from mlflow.server import app
    from trackgate.server.policy import Policy

    root = os.environ.get("_MLFLOW_SERVER_ARTIFACT_ROOT", "mlflow-artifacts:/")
    return Policy(app, artifact_root=root)


_tracking._load_mlflow = _load_mlflow
'''


def _stacks(stack: contextlib.ExitStack, work: Path) -> tuple[dict[str, RunningStack], str]:
    hook = work / "off-hook"
    hook.mkdir(mode=0o755)
    (hook / "sitecustomize.py").write_text(_OFF_HOOK)
    (hook / "sitecustomize.py").chmod(0o644)
    stacks: dict[str, RunningStack] = {}
    for name in VARIANTS:
        extra = {"PYTHONPATH": str(hook)} if name == "off" else {}
        with patched_environ(extra):  # the supervisor and its children keep the environment of `up`
            stacks[name] = stack.enter_context(
                running_stack(work / name, bcrypt_rounds=tg.BCRYPT_ROUNDS))
    admin = ("admin", stacks["private"].admin_password)
    made = stacks["private"].request("POST", "/api/2.0/mlflow/experiments/create", auth=admin,
                                     json={"name": "admins-private", "tags": [
                                         {"key": "trackgate.private", "value": "true"}]})
    made.raise_for_status()
    return stacks, made.json()["experiment_id"]


def _quartiles(values: list[float]) -> tuple[float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], q[2]


def render(result: dict[str, Any]) -> str:
    rates, cpu_s, done = result["rates"], result["cpu_s"], result["calls"]
    blocks = len(rates["off"])
    lines = [
        "| variant | log_metric calls/s (median of blocks) | ratio to off, median of blocks "
        "| middle half | min – max | server CPU per call |",
        "| --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    labels = {"off": "roles off (no access layer)", "on": "roles on, as shipped",
              "private": "roles on + one private experiment (per-resource mode)"}
    for name in ("off", "on", "private"):
        ratios = [a / b for a, b in zip(rates[name], rates["off"], strict=True)]
        low, high = _quartiles(ratios)
        per_call = 1e6 * cpu_s[name] / max(done[name], 1)
        ratio = "1" if name == "off" else f"{statistics.median(ratios):.3f}"
        spread = "–" if name == "off" else f"{low:.3f} – {high:.3f}"
        extremes = "–" if name == "off" else f"{min(ratios):.3f} – {max(ratios):.3f}"
        lines.append(f"| {labels[name]} | {statistics.median(rates[name]):.1f} | {ratio} | "
                     f"{spread} | {extremes} | {per_call:.0f} µs |")
    loads = result["loads"]
    lines.append("")
    lines.append(f"{blocks} blocks of {done['off'] // max(blocks, 1)} calls per variant "
                 f"({sum(done.values())} calls); 1-min load average {min(loads):.1f} – "
                 f"{max(loads):.1f} during the run (`nproc` {os.cpu_count()}).")
    return "\n".join(lines) + "\n"


def _check_variants(stacks: dict[str, RunningStack], private_id: str, password: str) -> None:
    """The variants are what they claim: the access layer audits log_metric on "on" and
    "private" and is absent on "off"; the private experiment is hidden on "private"."""
    for name, running in stacks.items():
        audit = running.settings.logs / "audit.log"  # type: ignore[operator]
        logged = audit.exists() and '"log_metric"' in audit.read_text()
        if logged != (name != "off"):
            raise SystemExit(f"variant {name!r}: the access layer is "
                             f"{'present' if logged else 'absent'} (audit log {audit})")
    hidden = stacks["private"].get(f"/api/2.0/mlflow/experiments/get?experiment_id={private_id}",
                                   auth=(tg.USER, password))
    if hidden.status_code != 403:
        raise SystemExit(f"variant 'private': the private experiment answered {hidden.status_code}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=60)
    parser.add_argument("--calls", type=int, default=30, help="log_metric calls per block")
    parser.add_argument("--max-seconds", type=float, default=300,
                        help="stop adding blocks after this (at least 20 blocks are run)")
    args = parser.parse_args()
    started = dt.datetime.now(dt.UTC)
    began = time.monotonic()
    work = Path(tempfile.mkdtemp(prefix="trackgate-bench-roles-"))
    work.chmod(0o711)  # as root, each stack's service account passes through to its data dir
    try:
        with contextlib.ExitStack() as stack:
            stacks, private_id = _stacks(stack, work)
            password = os.urandom(12).hex()
            clients = tg.mlflow_clients(stacks, work, password)
            print(f"stacks and clients up after {time.monotonic() - began:.0f} s", flush=True)
            result = tg.measure_log_metric(stacks, clients, VARIANTS, args.blocks, args.calls,
                                           args.max_seconds, min_blocks=MIN_BLOCKS)
            _check_variants(stacks, private_id, password)
    finally:
        for name in VARIANTS:
            tg.remove_tree(work / name)
    command = shlex.join([".venv/bin/python", "-m", "bench.roles", *sys.argv[1:]])
    print(f"\n- Date: {started:%Y-%m-%d %H:%M} UTC; run time "
          f"{(time.monotonic() - began) / 60:.1f} min\n- Command: `{command}`\n"
          f"{report.machine()}\n{render(result)}")


if __name__ == "__main__":
    main()
