"""The model registry through trackgate: register versions, point the @champion alias at the
best one, move it to the legacy Production stage, and load it back by both names.

    python examples/register.py --name diabetes-ridge
"""

from __future__ import annotations

import argparse
import warnings

import mlflow
import sklearn
from mlflow import MlflowClient
from mlflow.models import infer_signature
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_squared_error


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="diabetes-ridge", help="registered model name")
    parser.add_argument("--experiment", default="trackgate-examples")
    args = parser.parse_args()

    mlflow.set_experiment(args.experiment)
    X, y = load_diabetes(return_X_y=True, as_frame=True)
    client = MlflowClient()
    scores: dict[str, float] = {}
    # Each log_model with registered_model_name adds a new version of the same model.
    for alpha in (10.0, 0.1):
        with mlflow.start_run(run_name=f"register alpha={alpha}"):
            model = Ridge(alpha=alpha).fit(X, y)
            mse = float(mean_squared_error(y, model.predict(X)))
            mlflow.log_params({"alpha": alpha})
            mlflow.log_metric("mse", mse)
            info = mlflow.sklearn.log_model(
                model, name="model", registered_model_name=args.name,
                signature=infer_signature(X, model.predict(X)), input_example=X.head(3),
                # Pinned requirements: reproducible, and no slow inference subprocess per model.
                pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
            )
            scores[str(info.registered_model_version)] = mse
    champion = min(scores, key=scores.__getitem__)
    print(f"versions: {scores}; champion: version {champion}")

    client.set_registered_model_alias(args.name, "champion", champion)
    client.set_model_version_tag(args.name, champion, "validated", "true")
    with warnings.catch_warnings():  # stages are deprecated in MLflow 3 but still used by teams
        warnings.simplefilter("ignore", FutureWarning)
        client.transition_model_version_stage(args.name, champion, "Production",
                                              archive_existing_versions=True)

    # What a serving host or a colleague does with only the exported credentials.
    sample = X.head(3)
    by_alias = mlflow.pyfunc.load_model(f"models:/{args.name}@champion").predict(sample)
    by_stage = mlflow.pyfunc.load_model(f"models:/{args.name}/Production").predict(sample)
    print(f"models:/{args.name}@champion predicts {[round(float(v), 3) for v in by_alias]}")
    print(f"models:/{args.name}/Production predicts {[round(float(v), 3) for v in by_stage]}")


if __name__ == "__main__":
    main()
