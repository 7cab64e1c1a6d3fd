"""How long `trackgate backup`, `restore` and `backup --verify` take on a store of ~1,000 runs x
50 metric steps and 1 GiB of artifacts (issue 13), on a real stack on loopback.

    .venv/bin/python -m bench.backup                                  # the issue's store
    .venv/bin/python -m bench.backup --runs 100 --artifact-mib 128    # a quick look
    .venv/bin/python -m bench.backup --output bench/out/backup.md     # also write the Markdown
    .venv/bin/python -m bench.backup --s3 --file-mib 512              # artifacts in a bucket

The store is filled through the proxy with the real MLflow client (runs with params, tags and a
50-step metric history in one log_batch each; the artifacts as 64 MiB files of random bytes,
which do not compress). Everything runs in a temp dir that is removed at the end (`--keep`
keeps it); the stacks are stopped by PID. With `--s3` the artifacts live in a real SeaweedFS
bucket, and backup and restore run as `trackgate` CLI processes whose peak RSS is read with
wait4 (an object is streamed, never held whole: the peak stays far below one file's size).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from trackgate import backup
from trackgate.local import stack as stack_module

from tests.infra.seaweedfs import seaweedfs
from tests.support import clean_env, running_stack, stack_settings

MIB = 1024 * 1024
FILE_MIB = 64


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _fill(
    env: dict[str, str], runs: int, steps: int, artifact_mib: int, work: Path, file_mib: int
) -> None:
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
        size = min(file_mib, left)
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


def _cli(argv: list[str]) -> tuple[float, int]:
    """(seconds, peak RSS in bytes) of one `trackgate` process, progress passed through."""
    started = time.monotonic()
    proc = subprocess.Popen(  # its summary to stderr too: stdout is the Markdown
        [sys.executable, "-m", "trackgate", *argv], env=clean_env(), cwd="/", stdout=sys.stderr
    )
    _pid, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"trackgate {argv[0]} exited {proc.returncode}")
    return time.monotonic() - started, usage.ru_maxrss * 1024


def _bucket_settings(stack: contextlib.ExitStack, work: Path) -> Any:
    """A SeaweedFS for the run; returns f(prefix) -> settings overrides for that prefix."""
    store = stack.enter_context(seaweedfs(work / "seaweedfs"))
    keys = store.write_credentials_file(work / "s3-credentials")
    return lambda prefix: {
        "artifacts_destination": f"s3://{store.bucket}/{prefix}",
        "s3_endpoint_url": store.endpoint,
        "s3_credentials_file": keys,
    }


def _cli_args(settings: Any) -> list[str]:
    return [
        "--data-dir", str(settings.data_dir),
        "--artifacts-destination", settings.artifacts_destination,
        "--s3-endpoint-url", settings.s3_endpoint_url,
        "--s3-credentials-file", str(settings.s3_credentials_file),
    ]  # fmt: skip


def run(runs: int, steps: int, artifact_mib: int, keep: bool, s3: bool, file_mib: int) -> str:
    load_before = os.getloadavg()[0]
    work = Path(tempfile.mkdtemp(prefix="trackgate-bench-backup-"))
    os.chmod(work, 0o711)  # as root, the service account passes through to the data dirs
    rows: dict[str, Any] = {}
    try:
        with contextlib.ExitStack() as stack:
            where = _bucket_settings(stack, work) if s3 else lambda _prefix: {}
            live = stack.enter_context(running_stack(work / "live", **where("live")))
            (work / "upload").mkdir()
            _fill(live.client_env(), runs, steps, artifact_mib, work / "upload", file_mib)
            db = live.settings.sqlite_path
            rows["database file"] = backup.human(db.stat().st_size) if db else "PostgreSQL"

            archive = work / "bench.tar"
            started = time.monotonic()
            if s3:  # a process of its own: its peak RSS is the backup's alone
                rows["backup"], rows["backup rss"] = _cli(
                    ["backup", "--output", str(archive), *_cli_args(live.settings)]
                )
                manifest = backup.check_archive(archive)[0]
            else:
                made = backup.backup(live.settings, archive, say=_say)
                rows["backup"] = time.monotonic() - started
                _say(made.summary())
                manifest = made.manifest
            tables = manifest["database"]["tables"]
            rows["runs"] = tables["runs"]["count"]
            rows["metric rows"] = tables["metrics"]["count"]
            arts = manifest["artifacts"]
            rows["artifacts"] = f"{arts['files']} files, {backup.human(arts['bytes'])}"
            rows["archive"] = backup.human(archive.stat().st_size)
            rows["archive bytes"] = archive.stat().st_size

            target = stack_settings(work / "restored", **where("restored"))
            started = time.monotonic()
            if s3:
                _seconds, rows["restore rss"] = _cli(["restore", str(archive), *_cli_args(target)])
            else:
                _say(backup.restore(target, archive, say=_say).summary())
            rows["restore"] = time.monotonic() - started
            started = time.monotonic()
            stack_module.up(target)
            rows["first start after restore"] = time.monotonic() - started
            stack_module.down(target)

            started = time.monotonic()
            verified = backup.verify(live.settings, archive, say=_say, scratch_root=work)
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
    store = (
        f"artifacts in a SeaweedFS bucket ({file_mib} MiB files); backup and restore as CLI "
        f"processes, peak RSS {backup.human(rows['backup rss'])} and "
        f"{backup.human(rows['restore rss'])}"
        if s3
        else "local artifacts"
    )
    return "\n".join(
        [
            f"## Backup, restore and verify: {runs:,} runs x {steps} metric steps, "
            f"{artifact_mib / 1024:.2f} GiB of artifacts (issue 13)",
            "",
            f"- Date: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}",
            f"- Command: `.venv/bin/python -m bench.backup --runs {runs} --steps {steps} "
            f"--artifact-mib {artifact_mib}" + (f" --s3 --file-mib {file_mib}`" if s3 else "`"),
            f"- Machine: `nproc` {os.cpu_count()}, {platform.platform()}; sqlite store, {store}, "
            "archive on the same disk; load average (1 min) "
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
    parser.add_argument("--s3", action="store_true", help="Artifacts in a SeaweedFS bucket.")
    parser.add_argument("--file-mib", type=int, default=FILE_MIB, help="Size of each artifact.")
    args = parser.parse_args()
    text = run(args.runs, args.steps, args.artifact_mib, args.keep, args.s3, args.file_mib)
    print(text)
    if args.output:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.write_text(text)


if __name__ == "__main__":
    main()
