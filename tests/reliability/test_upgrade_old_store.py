"""Upgrades (issue 13): a store made by MLflow 2.16.2 (installed in a throwaway venv, cached at
OLD_VENV) is refused by `trackgate up` and by the tracking server itself with a message that says
what to run; two `trackgate db upgrade` at once back it up and upgrade it once (one waits for the
other); then `up` serves every record intact, compared by content through the MLflow client.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ..support import clean_env, run_at_once, trackgate
from .supervision import CliStack, mentioning

pytestmark = pytest.mark.reliability

OLD_MLFLOW = "2.16.2"
# Reused across runs: a pip install of old MLflow takes minutes.
OLD_VENV = Path(f"/var/tmp/trackgate-mlflow-{OLD_MLFLOW}")

POPULATE = """
import sys
from mlflow import MlflowClient
uri = sys.argv[1]
client = MlflowClient(tracking_uri=uri, registry_uri=uri)
exp = client.create_experiment("old-exp", artifact_location="mlflow-artifacts:/old",
                               tags={"team": "nlp"})
runs = {}
for i in range(3):
    run = client.create_run(exp, run_name=f"old-{i}", tags={"seed": str(i), "kind": "baseline"})
    rid = run.info.run_id
    runs[i] = rid
    client.log_param(rid, "lr", str(0.01 * (i + 1)))
    client.log_param(rid, "layers", "12")
    for step in range(25):
        client.log_metric(rid, "loss", 2.0 / (step + 1 + i), step=step)
    for step in range(0, 25, 5):
        client.log_metric(rid, "acc", 0.4 + step / 100, step=step)
    client.set_terminated(rid)
client.create_registered_model("old-model", tags={"owner": "bob"}, description="from 2.16")
for i in range(2):
    client.create_model_version("old-model", f"runs:/{runs[i]}/model", run_id=runs[i],
                                tags={"v": str(i)}, description=f"version {i + 1}")
client.set_registered_model_alias("old-model", "champion", "2")
client.set_model_version_tag("old-model", "1", "stage", "retired")
"""

CONTENT = """
import json, sys
from mlflow import MlflowClient
from mlflow.entities import ViewType
uri = sys.argv[1] if len(sys.argv) > 1 else None
client = MlflowClient(tracking_uri=uri, registry_uri=uri) if uri else MlflowClient()
out = {"experiments": {}, "runs": {}, "models": {}}
exps = client.search_experiments(view_type=ViewType.ALL)
for e in exps:
    out["experiments"][e.name] = [e.experiment_id, e.lifecycle_stage, dict(e.tags)]
for r in client.search_runs([e.experiment_id for e in exps], run_view_type=ViewType.ALL):
    rid = r.info.run_id
    out["runs"][rid] = {
        "info": [r.info.experiment_id, r.info.run_name, r.info.status, r.info.start_time,
                 r.info.end_time, r.info.lifecycle_stage],
        "params": dict(r.data.params),
        "tags": dict(r.data.tags),
        "metrics": {k: sorted([m.step, m.value, m.timestamp]
                              for m in client.get_metric_history(rid, k))
                    for k in sorted(r.data.metrics)},
    }
for m in client.search_registered_models():
    aliases = m.aliases if isinstance(m.aliases, dict) else {a.alias: a.version for a in m.aliases}
    versions = sorted(
        [str(v.version), v.run_id, v.source, v.description, dict(v.tags), v.status]
        for v in client.search_model_versions(f"name='{m.name}'"))
    out["models"][m.name] = {"description": m.description, "tags": dict(m.tags),
                             "aliases": {k: str(v) for k, v in aliases.items()},
                             "versions": versions}
print(json.dumps(out, sort_keys=True))
"""


def _old_python() -> Path:
    """Python of a venv with MLflow 2.16.2 (built once, then reused)."""
    python = OLD_VENV / "bin" / "python"
    if (OLD_VENV / ".complete").exists():
        return python
    partial = OLD_VENV.with_name(OLD_VENV.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "venv", str(partial)], check=True)
    subprocess.run([str(partial / "bin" / "pip"), "install", "-q", f"mlflow=={OLD_MLFLOW}",
                    "sqlalchemy<2.1"], check=True, timeout=1800)
    shutil.rmtree(OLD_VENV, ignore_errors=True)
    partial.rename(OLD_VENV)  # bin/python is a link and finds the venv by its own path
    (OLD_VENV / ".complete").write_text("")
    return python


def _revision(db: Path) -> str:
    with sqlite3.connect(db) as conn:
        return str(conn.execute("SELECT version_num FROM alembic_version").fetchone()[0])


def _tmp_tables(db: Path) -> list[str]:
    with sqlite3.connect(db) as conn:
        rows = conn.execute(
            "SELECT name FROM sqlite_master WHERE name LIKE '\\_alembic\\_tmp\\_%' ESCAPE '\\'"
        ).fetchall()
    return [r[0] for r in rows]


def _old_content(python: Path, uri: str, cwd: Path) -> dict[str, object]:
    env = clean_env()
    done = subprocess.run([str(python), "-c", CONTENT, uri], env=env, cwd=cwd,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.splitlines()[-1])  # type: ignore[no-any-return]


def test_an_old_store_is_refused_then_upgraded_once_with_a_backup_and_kept_intact(
    tmp_path: Path,
) -> None:
    python = _old_python()
    root = tmp_path
    os.chmod(root, 0o711)
    stack = CliStack.new(root / "data")
    data = stack.data_dir
    data.mkdir()
    db = data / "mlflow.db"
    uri = f"sqlite:///{db}"
    made = subprocess.run([str(python), "-c", POPULATE, uri], env=clean_env(), cwd=root,
                          capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-3000:]
    before = _old_content(python, uri, root)
    assert len(before["runs"]) == 3 and before["models"]["old-model"]["versions"]  # type: ignore[index]
    old_revision = _revision(db)

    # `trackgate up` refuses, in one clear line, before starting anything.
    refused = stack.run("up")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "Traceback" not in refused.stderr
    assert "trackgate db upgrade" in refused.stderr and old_revision in refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 2  # "Starting ..." and the error
    assert not (data / "run" / "supervisor.pid").exists() and mentioning(data) == []
    # The tracking server refuses on its own too (systemd units and containers start it).
    served = trackgate("serve", "tracking", "--data-dir", str(data), timeout=120)
    assert served.returncode == 1 and "trackgate db upgrade" in served.stderr, served.stderr
    assert "Traceback" not in served.stderr
    assert _revision(db) == old_revision, "nothing may migrate the store implicitly"
    for made_by_root in ("artifacts", "logs"):  # `up` gives the service account the rest
        shutil.rmtree(data / made_by_root, ignore_errors=True)

    # Two upgrades at once: one upgrades (after a backup), the other waits and finds it done.
    started = time.monotonic()
    argv = [sys.executable, "-m", "trackgate", "db", "upgrade", "--data-dir", str(data)]
    outcomes = []
    for done in run_at_once(argv):
        assert done.returncode == 0, done.stderr[-3000:]
        assert "Traceback" not in done.stderr
        outcomes.append(done.stdout.strip())
    print(f"two db upgrades at once: {sorted(outcomes)} in {time.monotonic() - started:.1f} s")
    assert sorted(outcomes) == ["database schema current", "database schema upgraded"]
    assert _revision(db) != old_revision and _tmp_tables(db) == []
    backups = sorted((data / "backups").glob("mlflow-before-upgrade-from-*.db"))
    assert len(backups) == 1 and _revision(backups[0]) == old_revision
    assert _old_content(python, f"sqlite:///{backups[0]}", root) == before

    stack.up()
    try:
        env = clean_env(**stack.client_env())
        done = subprocess.run([sys.executable, "-c", CONTENT], env=env, cwd=root,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        after = json.loads(done.stdout.splitlines()[-1])
    finally:
        stack.run("down")
    assert after == before
    steps = sum(len(h) for r in after["runs"].values() for h in r["metrics"].values())
    print(f"intact after the upgrade: {len(after['runs'])} runs, {steps} metric steps, "
          f"{len(after['models']['old-model']['versions'])} model versions")
