"""Workflow 2: versions, the @champion alias and the legacy Production stage, loaded back by
a client that has only the exported credentials."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from mlflow import MlflowClient

from ..support import RunningStack
from .conftest import user_env

_LOAD = """
import json, sys
import mlflow
from sklearn.datasets import load_diabetes
X, _ = load_diabetes(return_X_y=True, as_frame=True)
print(json.dumps([float(v) for v in mlflow.pyfunc.load_model(sys.argv[1]).predict(X.head(3))]))
"""


def test_register_example_creates_versions_alias_and_production_stage(
        mlflow_client: MlflowClient, registered_model: dict[str, str]) -> None:
    name = registered_model["name"]
    versions = mlflow_client.search_model_versions(f"name = '{name}'")
    assert sorted(int(v.version) for v in versions) == [1, 2]
    champion = mlflow_client.get_model_version_by_alias(name, "champion")
    assert champion.version == registered_model["champion"]
    assert champion.current_stage == "Production"
    assert champion.tags["validated"] == "true"
    others = [v for v in versions if v.version != champion.version]
    assert all(v.current_stage != "Production" for v in others)
    # The example loaded both names and got the same model back.
    assert registered_model["by_alias"] == registered_model["by_stage"]


def test_fresh_client_loads_champion_and_production_with_only_exported_credentials(
        stack: RunningStack, registered_model: dict[str, str], tmp_path: Path) -> None:
    predictions = {}
    for uri in (f"models:/{registered_model['name']}@champion",
                f"models:/{registered_model['name']}/Production"):
        result = subprocess.run([sys.executable, "-c", _LOAD, uri], cwd=tmp_path,
                                env=user_env(stack), capture_output=True, text=True, timeout=180)
        assert result.returncode == 0, result.stderr
        predictions[uri] = json.loads(result.stdout.strip().splitlines()[-1])
    first, second = predictions.values()
    assert first == second
    assert [round(v, 3) for v in first] == json.loads(registered_model["by_alias"])


def test_client_without_credentials_cannot_load_the_model(
        stack: RunningStack, registered_model: dict[str, str], tmp_path: Path) -> None:
    env = user_env(stack)
    del env["MLFLOW_TRACKING_USERNAME"], env["MLFLOW_TRACKING_PASSWORD"]
    result = subprocess.run(
        [sys.executable, "-c", _LOAD, f"models:/{registered_model['name']}@champion"],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=180)
    assert result.returncode != 0
    assert "401" in result.stderr
