"""Workflow 4: a model logged as code (model_code.py + set_model), loaded back and used."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import mlflow.artifacts
import yaml

from ..support import RunningStack
from .conftest import EXAMPLES, run_example, unique, user_env

_PREDICT = """
import json, sys
import mlflow, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
frame = pd.DataFrame({"bmi": [0.06, -0.04, 0.0], "bp": [0.02, -0.03, 0.2]})
print(json.dumps(model.predict(frame).to_dict(orient="list")))
"""


def test_model_from_code_is_logged_as_source_and_predicts_when_loaded(
        stack: RunningStack, exported_credentials: None, tmp_path: Path) -> None:
    name = unique("bmi-rule")
    result = run_example(stack, "log_model_from_code.py", "--experiment", unique("code"),
                         "--name", name, cwd=tmp_path)
    assert re.search(r"0\.070\s+True", result.stdout), result.stdout

    # The model is the source file itself (copied next to MLmodel), not a pickled object.
    model_dir = Path(mlflow.artifacts.download_artifacts(f"models:/{name}/1",
                                                         dst_path=str(tmp_path / "model")))
    mlmodel = yaml.safe_load((model_dir / "MLmodel").read_text())
    pyfunc = mlmodel["flavors"]["python_function"]
    assert pyfunc["loader_module"] == "mlflow.pyfunc.loaders.code_model"
    assert Path(pyfunc["model_code_path"]).name == "model_code.py"
    assert pyfunc["config"] == {"threshold": 0.05}
    assert (model_dir / "model_code.py").read_text() == (EXAMPLES / "model_code.py").read_text()
    assert not list(model_dir.rglob("*.pkl"))

    # A fresh client elsewhere loads it from the registry; model_config set the threshold.
    loaded = subprocess.run([sys.executable, "-c", _PREDICT, f"models:/{name}/1"], cwd=tmp_path,
                            env=user_env(stack), capture_output=True, text=True, timeout=180)
    assert loaded.returncode == 0, loaded.stderr
    out = json.loads(loaded.stdout.strip().splitlines()[-1])
    assert out["high_risk"] == [True, False, True]
    assert [round(v, 3) for v in out["score"]] == [0.07, -0.055, 0.1]
