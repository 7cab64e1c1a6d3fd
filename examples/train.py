"""Tracking through trackgate: params, stepped metrics, tags, artifacts, sklearn autolog,
nested runs, then search and compare the runs from the client.

    export MLFLOW_TRACKING_URI=https://mlflow.example.com MLFLOW_TRACKING_USERNAME=... \
           MLFLOW_TRACKING_PASSWORD=... [MLFLOW_TRACKING_SERVER_CERT_PATH=ca.pem]
    python examples/train.py --experiment diabetes
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import mlflow
import numpy as np
import sklearn
from sklearn.datasets import load_diabetes
from sklearn.linear_model import Ridge
from sklearn.metrics import mean_squared_error
from sklearn.model_selection import train_test_split


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="trackgate-examples")
    parser.add_argument("--alphas", default="0.01,0.1,1.0", help="Ridge alphas, one child run each")
    args = parser.parse_args()
    alphas = [float(a) for a in args.alphas.split(",")]

    mlflow.set_experiment(args.experiment)
    X, y = load_diabetes(return_X_y=True, as_frame=True)
    X_train, X_val, y_train, y_val = train_test_split(X, y, test_size=0.25, random_state=0)
    # Autolog records every fit's params and training metrics; the model worth keeping is logged
    # once below, with pinned requirements (inferring them costs a subprocess per model).
    mlflow.sklearn.autolog(log_models=False, silent=True)
    models: dict[str, Ridge] = {}

    with mlflow.start_run(run_name="ridge-sweep") as parent:
        mlflow.set_tags({"team": "examples", "stage": "sweep"})
        mlflow.log_params({"model": "Ridge", "alphas": args.alphas, "n_train": len(X_train)})
        for alpha in alphas:
            with mlflow.start_run(run_name=f"alpha={alpha}", nested=True) as child:
                model = models[child.info.run_id] = Ridge(alpha=alpha).fit(X_train, y_train)
                rmse = float(np.sqrt(mean_squared_error(y_val, model.predict(X_val))))
                mlflow.log_metric("val_rmse", rmse)
                # A metric with steps: a (simulated) learning curve, one point per epoch.
                for epoch in range(5):
                    mlflow.log_metric("train_loss", rmse * (1 + 1 / (epoch + 1)), step=epoch)

        with tempfile.TemporaryDirectory() as tmp:
            report = Path(tmp, "report.json")
            report.write_text(json.dumps({"alphas": alphas, "features": list(X.columns)}))
            mlflow.log_artifact(str(report))  # one file
            data = Path(tmp, "data")
            data.mkdir()
            X_val.head(20).to_csv(data / "val_sample.csv", index=False)
            (data / "README.txt").write_text("A sample of the validation split.\n")
            mlflow.log_artifacts(str(data), artifact_path="data")  # a whole directory

        # Search and compare from the client: the best child of this sweep by validation RMSE.
        children = mlflow.search_runs(
            experiment_names=[args.experiment],
            filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'",
            order_by=["metrics.val_rmse ASC"],
        )
        print(children[["run_id", "params.alpha", "metrics.val_rmse"]].to_string(index=False))
        best = children.iloc[0]
        mlflow.set_tag("best_child", best["run_id"])
        mlflow.log_metric("best_val_rmse", float(best["metrics.val_rmse"]))
        mlflow.sklearn.log_model(models[best["run_id"]], name="model",
                                 pip_requirements=[f"scikit-learn=={sklearn.__version__}"],
                                 input_example=X_val.head(3))

    print(f"parent run: {parent.info.run_id}")
    print(f"best child: {best['run_id']} (alpha={best['params.alpha']})")


if __name__ == "__main__":
    main()
