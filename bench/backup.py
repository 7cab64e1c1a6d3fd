"""How long `trackgate backup`, `restore` and `backup --verify` take on a store of ~1,000 runs x
50 metric steps and 1 GiB of artifacts (issue 13), on a real stack on loopback.

    .venv/bin/python -m bench.backup                                  # the issue's store
    .venv/bin/python -m bench.backup --runs 100 --artifact-mib 128    # a quick look
    .venv/bin/python -m bench.backup --output bench/out/backup.md     # also write the Markdown

The store is filled through the proxy with the real MLflow client (runs with params, tags and a
50-step metric history in one log_batch each; the artifacts as 64 MiB files of random bytes,
which do not compress). Everything runs in a temp dir that is removed at the end (`--keep`
keeps it); the stacks are stopped by PID.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from trackgate import backup
from trackgate.local import stack as stack_module

from tests.support import running_stack, stack_settings

MIB = 1024 * 1024
FILE_MIB = 64


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fill(env: dict[str, str], runs: int, steps: int, artifact_mib: int, work: Path) -> None:
    os.environ.update(env)
    from mlflow import MlflowClient
    from mlflow.entities import Metric, Param, RunTag

    client = MlflowClient()
    exp = client.create_experiment("bench-backup")
    started = time.monotonic()

    def one(i: int) -> str:
        run = client.create_run(exp, run_name=f"run-{i}")
        now = int(time.time() * 1000)
        client.log_batch(
            run.info.run_id,
            metrics=[Metric("loss", 1.0 / (s + 1), now + s, s) for s in range(steps)],
            params=[Param(f"p{k}", str(i * k)) for k in range(5)],
            tags=[RunTag("bench", "backup"), RunTag("index", str(i))],
        )
        return run.info.run_id

    with ThreadPoolExecutor(4) as pool:
        ids = list(pool.map(one, range(runs)))
    _say(f"bench: {runs} runs x {steps} steps logged in {time.monotonic() - started:.0f} s")
    started = time.monotonic()
    left, n = artifact_mib, 0
    while left > 0:
        size = min(FILE_MIB, left)
        path = work / f"blob-{n}.bin"
        with open(path, "wb") as f:
            for _ in range(size):
                f.write(os.urandom(MIB))
        client.log_artifact(ids[n % len(ids)], str(path), artifact_path="data")
        path.unlink()
        left -= size
        n += 1
    _say(f"bench: {artifact_mib} MiB of artifacts uploaded in {time.monotonic() - started:.0f} s")


def _rate(nbytes: int, seconds: float) -> str:
    return f"{nbytes / MIB / seconds:.0f} MiB/s" if seconds > 0 else "-"


def run(runs: int, steps: int, artifact_mib: int, keep: bool) -> str:
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="trackgate-bench-backup-"))
    os.chmod(work, 0o711)  # as root, the service account passes through to the data dirs
    rows: dict[str, Any] = {}
    try:
        with running_stack(work / "live") as live:
            (work / "upload").mkdir()
            _fill(live.client_env(), runs, steps, artifact_mib, work / "upload")
            db = live.settings.sqlite_path
            rows["database file"] = backup.human(db.stat().st_size) if db else "PostgreSQL"

            started = time.monotonic()
            made = backup.backup(live.settings, work / "bench.tar", say=_say)
            rows["backup"] = time.monotonic() - started
            _say(made.summary())
            tables = made.manifest["database"]["tables"]
            rows["runs"] = tables["runs"]["count"]
            rows["metric rows"] = tables["metrics"]["count"]
            rows["artifacts"] = f"{made.artifact_files} files, {backup.human(made.artifact_bytes)}"
            rows["archive"] = backup.human(made.size)
            rows["archive bytes"] = made.size

            target = stack_settings(work / "restored")
            started = time.monotonic()
            restored = backup.restore(target, made.path, say=_say)
            rows["restore"] = time.monotonic() - started
            _say(restored.summary())
            started = time.monotonic()
            stack_module.up(target)
            rows["first start after restore"] = time.monotonic() - started
            stack_module.down(target)

            started = time.monotonic()
            verified = backup.verify(live.settings, made.path, say=_say, scratch_root=work)
            rows["verify"] = time.monotonic() - started
            _say(verified.summary())
            for line in verified.differences:
                _say(f"  differs: {line}")
            rows["verify result"] = "good" if verified.ok else f"{len(verified.differences)} diffs"
    finally:
        if keep:
            _say(f"bench: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    size = rows["archive bytes"]
    return "\n".join(
        [
            f"## Backup, restore and verify: {runs:,} runs x {steps} metric steps, "
            f"{artifact_mib / 1024:.2f} GiB of artifacts (issue 13)",
            "",
            f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- Command: `.venv/bin/python -m bench.backup --runs {runs} --steps {steps} "
            f"--artifact-mib {artifact_mib}`",
            f"- Machine: `nproc` {os.cpu_count()}, {platform.platform()}; sqlite store, local "
            "artifacts, archive on the same disk; load average (1 min) "
            f"{load_before:.1f} before, {os.getloadavg()[0]:.1f} after (a shared machine)",
            f"- Store: {rows['runs']:,} runs, {rows['metric rows']:,} metric rows, database file "
            f"{rows['database file']}, {rows['artifacts']}; archive {rows['archive']}",
            "",
            "| step | seconds | throughput |",
            "|---|---:|---:|",
            f"| `trackgate backup` | {rows['backup']:.1f} | {_rate(size, rows['backup'])} |",
            f"| `trackgate restore` (checks every checksum, then writes) | {rows['restore']:.1f} "
            f"| {_rate(size, rows['restore'])} |",
            f"| first `trackgate up` on the restored dir | {rows['first start after restore']:.1f} "
            "| |",
            f"| `trackgate backup --verify` (checksums, scratch restore, start, API and live "
            f"comparison): {rows['verify result']} | {rows['verify']:.1f} | |",
            "",
        ]
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--artifact-mib", type=int, default=1024)
    parser.add_argument("--output", type=Path, help="Also write the Markdown section here.")
    parser.add_argument("--keep", action="store_true", help="Keep the temp dir.")
    args = parser.parse_args()
    text = run(args.runs, args.steps, args.artifact_mib, args.keep)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)


if __name__ == "__main__":
    main()
