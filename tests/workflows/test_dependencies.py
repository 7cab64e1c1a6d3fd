"""Workflow 5: pip_requirements, extra_pip_requirements, code_paths and a pre-deployment
predict; the logged environment files say what a serving host will install."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow.artifacts
import pandas as pd
import pytest
import sklearn
import yaml

from ..support import RunningStack
from .conftest import run_example, unique, user_env

_PREDICT = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
print(json.dumps(model.predict(pd.DataFrame({"bmi": [0.06, -0.04], "bp": [0.02, -0.03]}))))
"""


@pytest.fixture(scope="module")
def logged(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """One run of examples/dependencies.py: the URIs of its two models and its output."""
    result = run_example(stack, "dependencies.py", "--experiment", unique("deps"),
                         cwd=tmp_path_factory.mktemp("deps"))
    uris = list(dict.fromkeys(re.findall(r"^--- (models:/\S+) MLmodel$", result.stdout, re.M)))
    assert len(uris) == 2, result.stdout
    return {"pinned": uris[0], "extra": uris[1], "stdout": result.stdout}


def _download(uri: str, tmp_path: Path) -> Path:
    return Path(mlflow.artifacts.download_artifacts(uri, dst_path=str(tmp_path)))


def test_pinned_requirements_are_exactly_what_was_asked(
        logged: dict[str, str], exported_credentials: None, tmp_path: Path) -> None:
    model = _download(logged["pinned"], tmp_path)
    requirements = (model / "requirements.txt").read_text().split()
    assert requirements == [f"mlflow=={mlflow.__version__}",
                            f"scikit-learn=={sklearn.__version__}", f"pandas=={pd.__version__}"]
    conda = yaml.safe_load((model / "conda.yaml").read_text())
    pip_section = next(d["pip"] for d in conda["dependencies"] if isinstance(d, dict))
    assert pip_section == requirements
    python_env = yaml.safe_load((model / "python_env.yaml").read_text())
    assert python_env["python"] == ".".join(map(str, sys.version_info[:3]))
    assert python_env["dependencies"] == ["-r requirements.txt"]
    mlmodel = yaml.safe_load((model / "MLmodel").read_text())
    assert mlmodel["flavors"]["python_function"]["code"] == "code"
    assert (model / "code" / "feature_helpers.py").is_file()


def test_extra_requirements_are_added_to_the_inferred_ones(
        logged: dict[str, str], exported_credentials: None, tmp_path: Path) -> None:
    requirements = (_download(logged["extra"], tmp_path) / "requirements.txt").read_text().split()
    assert requirements[-1] == "joblib>=1.2"
    assert f"scikit-learn=={sklearn.__version__}" in requirements  # inferred, not listed by us


def test_pre_deployment_predict_ran_with_the_local_environment(logged: dict[str, str]) -> None:
    # mlflow.models.predict prints the predictions of the serving input example.
    found = re.search(r"^pre-deployment check: (.*)$", logged["stdout"], re.M)
    assert found, logged["stdout"]
    assert len(json.loads(found.group(1))["predictions"]) == 3  # the 3-row input example


def test_code_paths_ship_the_helper_to_a_client_without_the_source_tree(
        stack: RunningStack, logged: dict[str, str], tmp_path: Path) -> None:
    # Run from an empty directory: feature_helpers can only come from the model's code/.
    result = subprocess.run([sys.executable, "-c", _PREDICT, logged["pinned"]], cwd=tmp_path,
                            env=user_env(stack), capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    assert len(json.loads(result.stdout.strip().splitlines()[-1])) == 2
