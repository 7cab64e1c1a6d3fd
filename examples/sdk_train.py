"""A training script on the team SDK (trackgate.sdk): parameters from a file, credentials checked
up front, autolog, the script itself and the saved model file logged with the run.

    python examples/sdk_train.py [--params examples/params.yaml] [--out outputs]
"""

from __future__ import annotations

import argparse
from pathlib import Path

import joblib
import mlflow
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge
from sklearn.model_selection import train_test_split
from trackgate import sdk

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", type=Path, default=HERE / "params.yaml")
    parser.add_argument("--out", type=Path, default=Path("outputs"))
    parser.add_argument("--experiment", default=None, help="overrides `experiment` in the params")
    args = parser.parse_args()

    params = sdk.load_params(args.params)
    experiment = args.experiment or params.pop("experiment", "trackgate-sdk")
    params.pop("experiment", None)
    X, y = load_diabetes(return_X_y=True, as_frame=True)
    X_train, X_test, y_train, y_test = train_test_split(X, y, **params["split"])

    # The model is saved with joblib below, so autolog need not log a second copy.
    with sdk.training_run(experiment, params=params, autolog={"log_models": False},
                          model_dirs=[args.out]) as run:
        model = Ridge(**params["model"]).fit(X_train, y_train)
        mlflow.log_metric("test_r2", float(model.score(X_test, y_test)))
        args.out.mkdir(parents=True, exist_ok=True)
        joblib.dump(model, args.out / "model.joblib")
    print(f"run: {run.info.run_id}")


if __name__ == "__main__":
    main()
