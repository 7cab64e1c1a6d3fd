"""Dependency management for a model: pinned pip_requirements, extra_pip_requirements on top of
the inferred ones, a local helper module shipped with code_paths, and a pre-deployment check
with `mlflow.models.predict(..., env_manager="local")`. Prints the logged environment files.

    python examples/dependencies.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlflow
import pandas as pd
import sklearn
from mlflow.pyfunc import PythonModel
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge

HERE = Path(__file__).resolve().parent
FEATURES = ["bmi", "bp"]


class FeatureRidge(PythonModel):
    """Ridge on engineered features; the feature code comes from the shipped helper module."""

    def __init__(self, model: Ridge) -> None:
        self.model = model

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict | None = None) -> list[float]:
        from feature_helpers import add_features  # found in the model's code/ directory

        return [float(v) for v in self.model.predict(add_features(model_input[FEATURES]))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="trackgate-examples")
    args = parser.parse_args()

    import sys

    sys.path.insert(0, str(HERE))
    from feature_helpers import add_features

    X, y = load_diabetes(return_X_y=True, as_frame=True)
    ridge = Ridge().fit(add_features(X[FEATURES]), y)
    example = X[FEATURES].head(3)
    mlflow.set_experiment(args.experiment)
    with mlflow.start_run(run_name="dependencies") as run:
        # Exactly these requirements (reproducible; MLflow adds nothing but itself).
        pinned = mlflow.pyfunc.log_model(
            name="pinned", python_model=FeatureRidge(ridge), input_example=example,
            code_paths=[str(HERE / "feature_helpers.py")],
            pip_requirements=[f"scikit-learn=={sklearn.__version__}", f"pandas=={pd.__version__}"],
        )
        # The inferred requirements plus one MLflow cannot see (imported only at predict time).
        extra = mlflow.sklearn.log_model(
            ridge, name="extra", input_example=add_features(example),
            extra_pip_requirements=["joblib>=1.2"],
        )
    print(f"run: {run.info.run_id}")

    # Pre-deployment check: score the logged model as the serving host would load it.
    print("pre-deployment check: ", end="", flush=True)
    mlflow.models.predict(model_uri=pinned.model_uri, input_data=example,
                          env_manager="local", content_type="json")
    print()  # predict() writes the predictions without a newline

    for info in (pinned, extra):
        local = Path(mlflow.artifacts.download_artifacts(info.model_uri))
        for name in ("MLmodel", "requirements.txt", "python_env.yaml", "conda.yaml"):
            print(f"--- {info.model_uri} {name}\n{(local / name).read_text().strip()}")
        print(f"--- code/: {sorted(p.name for p in (local / 'code').glob('*.py'))}")


if __name__ == "__main__":
    main()
