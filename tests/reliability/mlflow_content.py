"""What a user can see through the MLflow client, to compare two servers by content."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
from typing import Any

from ..support import patched_environ


def mlflow_env(env: dict[str, str]) -> contextlib.AbstractContextManager[None]:
    """The MLflow client reads its URI, credentials and CA from the environment per request."""
    return patched_environ(env)


def populate(work: Path) -> dict[str, str]:
    """Experiments, runs (params, tags, metric histories, artifacts), a deleted experiment and
    run, a registered model with two versions, tags and an alias. Returns run ids by name."""
    from mlflow import MlflowClient

    client = MlflowClient()
    exp = client.create_experiment("backup-a", tags={"team": "vision"})
    gone = client.create_experiment("backup-gone")
    ids = {}
    for i in range(3):
        run = client.create_run(exp, run_name=f"run-{i}", tags={"seed": str(i)})
        rid = run.info.run_id
        ids[f"run-{i}"] = rid
        client.log_param(rid, "lr", str(0.1 * (i + 1)))
        client.log_param(rid, "batch", "32")
        for step in range(20):
            client.log_metric(rid, "loss", 1.0 / (step + 1 + i), step=step)
        for step in range(0, 10, 3):
            client.log_metric(rid, "acc", 0.5 + step / 100, step=step)
        client.set_terminated(rid)
    blob = work / "weights.bin"
    blob.write_bytes(os.urandom(3 * 1024 * 1024))  # incompressible, like most artifacts
    (work / "notes").mkdir(exist_ok=True)
    (work / "notes" / "readme.txt").write_text("trained on the full set\n" * 100)
    client.log_artifact(ids["run-0"], str(blob), artifact_path="model")
    client.log_artifacts(ids["run-0"], str(work / "notes"), artifact_path="notes")
    deleted = client.create_run(exp, run_name="deleted")
    client.log_param(deleted.info.run_id, "x", "1")
    client.delete_run(deleted.info.run_id)
    other = client.create_run(gone, run_name="in-deleted-exp")
    client.log_metric(other.info.run_id, "m", 3.0)
    client.delete_experiment(gone)
    client.create_registered_model("bk-model", tags={"owner": "alice"}, description="two versions")
    for _ in range(2):
        client.create_model_version(
            "bk-model", f"runs:/{ids['run-0']}/model", run_id=ids["run-0"], tags={"k": "v"}
        )
    client.set_registered_model_alias("bk-model", "champion", "2")
    client.set_model_version_tag("bk-model", "1", "stage", "old")
    return ids


def content(work: Path) -> dict[str, Any]:
    """Everything a user can see, through the API of the server in the environment."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.entities import ViewType

    client = MlflowClient()
    exps = client.search_experiments(view_type=ViewType.ALL)
    out: dict[str, Any] = {"experiments": {}, "runs": {}, "models": {}}
    for e in exps:
        out["experiments"][e.experiment_id] = (e.name, e.lifecycle_stage, dict(e.tags))
    runs = client.search_runs(
        [e.experiment_id for e in exps], run_view_type=ViewType.ALL, max_results=1000
    )
    for r in runs:
        rid = r.info.run_id
        metrics = {
            key: [(m.step, m.value, m.timestamp) for m in client.get_metric_history(rid, key)]
            for key in r.data.metrics
        }
        artifacts = {}
        pending = [None]
        while pending:
            for info in client.list_artifacts(rid, pending.pop()):
                if info.is_dir:
                    pending.append(info.path)
                    continue
                local = mlflow.artifacts.download_artifacts(
                    run_id=rid, artifact_path=info.path, dst_path=str(work / rid)
                )
                artifacts[info.path] = hashlib.sha256(Path(local).read_bytes()).hexdigest()
        out["runs"][rid] = {
            "info": (
                r.info.experiment_id,
                r.info.run_name,
                r.info.status,
                r.info.lifecycle_stage,
                r.info.start_time,
                r.info.end_time,
            ),
            "params": dict(r.data.params),
            "tags": dict(r.data.tags),
            "metrics": metrics,
            "artifacts": artifacts,
        }
    for m in client.search_registered_models():
        versions = client.search_model_versions(f"name='{m.name}'")
        out["models"][m.name] = {
            "description": m.description,
            "tags": dict(m.tags),
            "aliases": dict(m.aliases) if isinstance(m.aliases, dict) else m.aliases,
            "versions": sorted(
                (v.version, v.source, v.run_id, v.status, dict(v.tags), sorted(v.aliases))
                for v in versions
            ),
        }
    return out
