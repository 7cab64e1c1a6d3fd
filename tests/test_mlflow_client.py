"""The real MLflow client, configured only by exported variables, works through the proxy."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

from .support import RunningStack, clean_env

CLIENT_SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys
    import mlflow
    from mlflow import MlflowClient

    work = sys.argv[1]
    mlflow.set_experiment("client-roundtrip")
    big = os.path.join(work, "big.bin")
    with open(big, "wb") as f:  # 50 MB of non-compressible data
        for _ in range(50):
            f.write(os.urandom(1024 * 1024))
    digest = hashlib.sha256(open(big, "rb").read()).hexdigest()

    class Doubler(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return model_input * 2

    with mlflow.start_run() as run:
        mlflow.log_param("lr", 0.1)
        mlflow.set_tag("team", "vision")
        for step in range(5):
            mlflow.log_metric("loss", 1.0 / (step + 1), step=step)
        mlflow.log_artifact(big, artifact_path="data")
        mlflow.pyfunc.log_model(name="model", python_model=Doubler())

    client = MlflowClient()
    fetched = client.get_run(run.info.run_id)
    history = client.get_metric_history(run.info.run_id, "loss")
    listed = [a.path for a in client.list_artifacts(run.info.run_id, "data")]
    back = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="data/big.bin",
                                               dst_path=os.path.join(work, "down"))
    model = mlflow.pyfunc.load_model(f"runs:/{run.info.run_id}/model")
    runs = mlflow.search_runs(experiment_names=["client-roundtrip"], output_format="list")
    import pandas as pd
    print(json.dumps({
        "params": fetched.data.params,
        "tags_team": fetched.data.tags.get("team"),
        "steps": [m.step for m in history],
        "listed": listed,
        "same_bytes": hashlib.sha256(open(back, "rb").read()).hexdigest() == digest,
        "prediction": model.predict(pd.DataFrame({"x": [1, 2]}))["x"].tolist(),
        "runs": len(runs),
    }))
""")


def _run_client(
    stack: RunningStack, tmp_path: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "client.py"
    script.write_text(CLIENT_SCRIPT)
    return subprocess.run(
        [sys.executable, str(script), str(tmp_path)],
        env=clean_env(**env, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0"),
        capture_output=True,
        text=True,
        timeout=600,
        cwd=tmp_path,
    )


def test_exported_credentials_log_and_read_back_params_metrics_artifacts_and_a_model(
    stack: RunningStack, tmp_path: Path
) -> None:
    import json

    result = _run_client(stack, tmp_path, **stack.client_env())
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["params"] == {"lr": "0.1"}
    assert out["tags_team"] == "vision"
    assert out["steps"] == [0, 1, 2, 3, 4]
    assert out["listed"] == ["data/big.bin"]
    assert out["same_bytes"] is True
    assert out["prediction"] == [2, 4]
    assert out["runs"] >= 1
    # --serve-artifacts semantics: the bytes land in the server's store, and the client (which
    # ran in tmp_path) wrote no local ./mlruns: it never needs filesystem access to the store.
    assert list(Path(stack.settings.artifacts_uri).rglob("big.bin"))
    assert not (tmp_path / "mlruns").exists()


def test_wrong_password_fails_with_a_clear_401(stack: RunningStack, tmp_path: Path) -> None:
    env = stack.client_env(password="not-the-password")
    result = _run_client(stack, tmp_path, **env)
    assert result.returncode != 0
    assert "401" in result.stderr
    assert "wrong or missing username/password" in result.stderr
