"""`trackgate backup`, `restore` and `backup --verify` against real stacks.

One live stack per module, filled through the proxy with the real MLflow client. A backup taken
while a client keeps logging is restored into a fresh dir and served; what the restored server
answers is compared with the live one by content (experiments, runs, params, tags, every metric
step, artifact bytes, registered models, versions and aliases), not by file existence.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import os
import tarfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from trackgate import backup
from trackgate.cli import cli
from trackgate.local import stack as stack_module

from ..support import RunningStack, running_stack, stack_settings
from .archives import tampered_copy
from .mlflow_content import content as _content
from .mlflow_content import mlflow_env
from .mlflow_content import populate as _populate

pytestmark = pytest.mark.reliability


@dataclass
class Live:
    stack: RunningStack
    user: tuple[str, str]
    ids: dict[str, str]
    root: Path


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("backup")
    os.chmod(root, 0o711)  # as root, the service account passes through to the data dirs
    with running_stack(root / "live") as running:
        user = running.new_user("alice")
        work = root / "populate"
        work.mkdir()
        with mlflow_env(running.client_env()):
            ids = _populate(work)
        yield Live(running, user, ids, root)


@dataclass
class UnderWrites:
    archive: Path
    manifest: dict[str, Any]
    acks: list[tuple[int, float]]  # (step, when the server acknowledged it)
    writer_run: str
    started: float
    finished: float


@pytest.fixture(scope="module")
def under_writes(live: Live) -> UnderWrites:
    """A backup taken while a client logs a metric through the proxy, as fast as it can."""
    from mlflow import MlflowClient

    acks: list[tuple[int, float]] = []
    stop = threading.Event()
    errors: list[BaseException] = []
    with mlflow_env(live.stack.client_env()):
        client = MlflowClient()
        exp = client.get_experiment_by_name("backup-a").experiment_id
        writer_run = client.create_run(exp, run_name="writer").info.run_id

        def write() -> None:
            step = 0
            try:
                while not stop.is_set():
                    client.log_metric(writer_run, "live", float(step), step=step)
                    acks.append((step, time.time()))
                    step += 1
            except BaseException as exc:  # reported by the test, not lost in the thread
                errors.append(exc)

        thread = threading.Thread(target=write, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + 30
            while len(acks) < 20 and time.monotonic() < deadline and not errors:
                time.sleep(0.05)
            started = time.time()
            result = backup.backup(live.stack.settings, live.root / "under-writes.tar")
            finished = time.time()
            time.sleep(1.0)  # the client keeps writing after the backup too
        finally:
            stop.set()
            thread.join(timeout=30)
    assert not errors, errors
    return UnderWrites(result.path, result.manifest, acks, writer_run, started, finished)


def test_archive_is_private_and_its_manifest_describes_every_member(
    under_writes: UnderWrites,
) -> None:
    archive = under_writes.archive
    assert (archive.stat().st_mode & 0o777) == 0o600
    assert not list(archive.parent.glob(f".{archive.name}*")), "no temp file left behind"
    manifest = under_writes.manifest
    assert manifest["mlflow_version"] == "3.17.2"
    assert manifest["trackgate_version"]
    assert manifest["database"]["schema_revision"]
    assert manifest["database"]["tables"]["runs"]["count"] >= 6
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        settings_text = tar.extractfile(backup.SETTINGS_MEMBER).read().decode()  # type: ignore[union-attr]
        assert names[-2:] == [backup.MANIFEST, backup.MANIFEST_SUM]
        for name, want in manifest["members"].items():
            data = tar.extractfile(name).read()  # type: ignore[union-attr]
            assert (len(data), hashlib.sha256(data).hexdigest()) == (want["size"], want["sha256"])
    assert set(names) - {backup.MANIFEST, backup.MANIFEST_SUM} == set(manifest["members"])
    roles = {m["role"] for m in manifest["members"].values()}
    assert {"db", "artifact", "users", "tls", "settings"} <= roles
    assert any(n == "tls/ca-key/ca.key" for n in names) and "users/htpasswd" in names
    assert "TRACKGATE_HOSTNAME=localhost\n" in settings_text


def test_every_secret_and_other_file_of_the_data_dir_is_in_the_archive(
    live: Live, under_writes: UnderWrites
) -> None:
    """Whatever provisioning writes (secret keys...) is archived, runtime state is not."""
    data = live.stack.settings.data_dir
    runtime = {"run", "logs", "backups", "serving", "artifacts", "tls", "mlflow.db", "htpasswd"}
    expected = set()
    for path in data.rglob("*"):
        top = path.relative_to(data).parts[0]
        if top in runtime or top.startswith(("mlflow.db", ".htpasswd", "htpasswd")):
            continue
        if path.name.endswith(".lock"):  # lock files are runtime state, empty by design
            continue
        if path.is_file() and path.stat().st_mtime < under_writes.started:
            expected.add(f"data/{path.relative_to(data).as_posix()}")
    members = set(under_writes.manifest["members"])
    assert expected <= members
    runtime_members = [m for m in members if m.startswith(("data/run/", "data/logs/"))]
    assert not runtime_members


def test_restored_stack_is_identical_by_content(
    live: Live, under_writes: UnderWrites, tmp_path: Path
) -> None:
    # What the live server holds now; the writer's run only has more steps than the backup.
    with mlflow_env(live.stack.client_env()):
        expected = _content(tmp_path / "live-download")
    target = stack_settings(tmp_path / "restored")
    result = backup.restore(target, under_writes.archive)
    assert "every checksum matched" in result.summary()
    assert target.ca_cert.read_bytes() == live.stack.settings.ca_cert.read_bytes()
    up = stack_module.up(target)
    try:
        assert up.admin_password is None, "the restored users are used, no new admin is made"
        restored = RunningStack(target, live.stack.admin_password)
        # The live CA file is trusted by the restored server: the same CA, the same key.
        env = {**restored.client_env(), "MLFLOW_TRACKING_SERVER_CERT_PATH": str(live.stack.ca)}
        with mlflow_env(env):
            got = _content(tmp_path / "restored-download")
        for name, password in (("admin", live.stack.admin_password), live.user):
            ok = restored.get(
                "/api/2.0/mlflow/experiments/search?max_results=1", auth=(name, password)
            )
            assert ok.status_code == 200, (name, ok.status_code)
        wrong = restored.get("/api/2.0/mlflow/experiments/search", auth=("admin", "wrong"))
        assert wrong.status_code == 401
    finally:
        stack_module.down(target)

    writer = under_writes.writer_run
    live_steps = expected["runs"][writer]["metrics"].pop("live")
    restored_steps = got["runs"][writer]["metrics"].pop("live")
    # Everything but the writer's metric is identical, artifact bytes included.
    assert got == expected
    assert expected["runs"][live.ids["run-0"]]["artifacts"].keys() == {
        "model/weights.bin",
        "notes/readme.txt",
    }
    assert got["models"]["bk-model"]["aliases"] == {"champion": "2"}
    # The writer: a prefix of what the live server has, holding every step acknowledged
    # before the database snapshot started.
    snapshot = under_writes.manifest["database"]["snapshot_started"]
    acked_before = [step for step, when in under_writes.acks if when < snapshot]
    assert acked_before, "the client was writing before the backup"
    assert [s for s, _v, _t in restored_steps] == list(range(len(restored_steps)))
    assert restored_steps == live_steps[: len(restored_steps)]
    assert len(restored_steps) >= len(acked_before)
    assert any(when > under_writes.finished for _s, when in under_writes.acks), (
        "the client kept writing after the backup"
    )
    assert len(live_steps) > len(restored_steps)


def test_verify_passes_on_a_good_archive_and_catches_any_changed_byte(
    live: Live, under_writes: UnderWrites, tmp_path: Path
) -> None:
    settings = live.stack.settings
    quiet = backup.backup(settings, tmp_path / "quiet.tar")  # nobody writes now
    result = backup.verify(settings, quiet.path, scratch_root=tmp_path)
    assert result.ok, result.differences
    assert result.compared_live
    assert any("artifacts downloaded through nginx" in c for c in result.checked)
    assert not list(tmp_path.glob("trackgate-verify-*")), "the scratch dir is removed"

    # The CLI: exit 0 and one summary line on stdout.
    ok = CliRunner().invoke(
        cli, ["backup", "--verify", str(quiet.path), "--data-dir", str(settings.data_dir)]
    )
    assert ok.exit_code == 0, ok.output
    assert "is good" in ok.stdout

    # One byte changed in an artifact, in the database: caught, named, exit non-zero.
    for member in ("artifacts/", backup.SQLITE_MEMBER):
        name = next(n for n in quiet.manifest["members"] if n.startswith(member))
        bad = tampered_copy(quiet.path, name, tmp_path / "tampered.tar")
        result = backup.verify(settings, bad, scratch_root=tmp_path)
        assert not result.ok
        assert any(name in d and "sha256 differs" in d for d in result.differences), result
        cli_result = CliRunner().invoke(
            cli, ["backup", "--verify", str(bad), "--data-dir", str(settings.data_dir)]
        )
        assert cli_result.exit_code == 1
        assert name in cli_result.stderr
        # restore refuses it before writing anything
        target = stack_settings(tmp_path / "never")
        with pytest.raises(backup.BackupError, match="nothing was restored"):
            backup.restore(target, bad)
        assert not target.data_dir.exists()

    # The archive taken under writes is older than the live server: verify says what differs.
    stale = backup.verify(settings, under_writes.archive, scratch_root=tmp_path)
    assert not stale.ok
    text = "\n".join(stale.differences)
    assert "table metrics:" in text and "only in the live server" in text
    assert "table runs" not in text  # the same runs, only more metric steps


def test_restore_refuses_a_non_empty_dir_unless_forced(
    under_writes: UnderWrites, tmp_path: Path
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "mlflow.db").write_text("someone else's")
    runner = CliRunner()
    args = ["restore", str(under_writes.archive), "--data-dir", str(data)]
    refused = runner.invoke(cli, args)
    assert refused.exit_code == 1
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]
    assert "not empty" in refused.stderr and "--force" in refused.stderr
    assert (data / "mlflow.db").read_text() == "someone else's"

    forced = runner.invoke(cli, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert "every checksum matched" in forced.stdout
    restored = backup.content_summary(f"sqlite:///{data / 'mlflow.db'}")
    assert restored == under_writes.manifest["database"]["tables"]


def _tar_with(path: Path, files: dict[str, bytes]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _future_manifest(directory: Path) -> Path:
    text = json.dumps({"format": backup.FORMAT, "format_version": 99, "members": {}})
    return _tar_with(directory / "future.tar", {backup.MANIFEST: text.encode()})


BAD_ARCHIVES = {
    "missing": (lambda p: p / "nope.tar", "no archive at"),
    "not-a-tar": (
        lambda p: (p / "x.tar").write_bytes(os.urandom(4096)) and p / "x.tar",
        "is not a trackgate backup (not a tar archive)",
    ),
    "no-manifest": (
        lambda p: _tar_with(p / "other.tar", {"hello.txt": b"hi"}),
        "it has no manifest.json",
    ),
    "newer-format": (_future_manifest, "format version 99"),
    "a-directory": (lambda p: p, "is a directory"),
}


@pytest.mark.parametrize("command", ["restore", "verify"])
@pytest.mark.parametrize("case", sorted(BAD_ARCHIVES))
def test_bad_archives_give_one_clear_line(case: str, command: str, tmp_path: Path) -> None:
    make, message = BAD_ARCHIVES[case]
    archive = make(tmp_path)
    argv = (
        ["restore", str(archive)] if command == "restore" else ["backup", "--verify", str(archive)]
    )
    result = CliRunner().invoke(cli, [*argv, "--data-dir", str(tmp_path / "target")])
    assert result.exit_code == 1
    assert isinstance(result.exception, SystemExit)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("trackgate: error: "), result.stderr
    assert message in lines[0]
    assert not (tmp_path / "target").exists()


def test_backup_errors_are_one_clear_line(
    live: Live, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    runner = CliRunner()
    data = str(live.stack.settings.data_dir)

    missing = runner.invoke(cli, ["backup", "--data-dir", str(tmp_path / "nothing-here")])
    assert missing.exit_code == 1
    assert missing.stderr.strip() == (
        f"trackgate: error: no data dir at {tmp_path / 'nothing-here'}: nothing to back up"
    )

    s3 = runner.invoke(
        cli, ["backup", "--data-dir", data, "--artifacts-destination", "s3://bucket/mlflow"]
    )
    assert s3.exit_code == 1
    # A bucket is backed up too (test_backup_s3.py); without keys, that is one line before any
    # dump is taken.
    assert "no S3 keys for s3://bucket/mlflow" in s3.stderr
    assert len(s3.stderr.strip().splitlines()) == 1

    def full(*_args: Any, **_kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(tarfile.TarFile, "addfile", full)
    out = tmp_path / "full.tar"
    disk_full = runner.invoke(cli, ["backup", "--data-dir", data, "--output", str(out)])
    assert disk_full.exit_code == 1
    assert disk_full.stderr.strip().startswith("trackgate: error: no space left on the device")
    assert not out.exists() and not list(tmp_path.glob(".full.tar*"))
    assert not list(tmp_path.glob(".trackgate-backup-*")), "the work dir is removed"


def test_backup_cli_prints_one_summary_line(live: Live, tmp_path: Path) -> None:
    out = tmp_path / "cli.tar"
    result = CliRunner().invoke(
        cli, ["backup", "--data-dir", str(live.stack.settings.data_dir), "-o", str(out)]
    )
    assert result.exit_code == 0, result.output
    line = result.stdout.strip()
    assert line.startswith(f"backup: wrote {out} (") and "artifact files" in line
    assert " s): database " in line


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to run the CLI as another account")
def test_an_unreadable_data_dir_is_one_clear_line(live: Live, tmp_path: Path) -> None:
    """As an account that may not read the data dir (it belongs to the service account)."""
    import subprocess
    import sys

    from ..support import clean_env

    data = live.stack.settings.data_dir
    argv = ["runuser", "-u", "nobody", "--", sys.executable, "-m", "trackgate", "backup"]
    by_flag = [*argv, "--data-dir", str(data), "--output", str(tmp_path / "x.tar")]
    env = clean_env(HOME="/tmp")
    for command, extra in ((by_flag, {}), (argv, {"TRACKGATE_DATA_DIR": str(data)})):
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=120, env={**env, **extra}
        )
        assert result.returncode != 0
        assert "Traceback" not in result.stderr
        assert "not readable" in result.stderr or "permission denied" in result.stderr, (
            result.stderr
        )


def test_a_full_disk_during_restore_is_one_line_and_leaves_the_dir_empty(
    under_writes: UnderWrites, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real_extract = backup._extract
    calls = {"n": 0}

    def fills_up(*args: Any, **kwargs: Any) -> None:
        calls["n"] += 1
        if calls["n"] > 3:  # a few files land, then the disk is full
            raise OSError(errno.ENOSPC, "No space left on device", str(args[2]))
        real_extract(*args, **kwargs)

    monkeypatch.setattr(backup, "_extract", fills_up)
    data = tmp_path / "data"
    result = CliRunner().invoke(
        cli, ["restore", str(under_writes.archive), "--data-dir", str(data)]
    )
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        f"trackgate: error: no space left on the device while restoring into {data}"
    ), result.stderr
    assert not data.exists() or not any(data.iterdir()), "a failed restore leaves it empty"
    monkeypatch.undo()
    again = CliRunner().invoke(cli, ["restore", str(under_writes.archive), "--data-dir", str(data)])
    assert again.exit_code == 0, again.output  # no --force needed for the second try
