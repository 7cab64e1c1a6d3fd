"""Log model_code.py as a model from code, load it back through trackgate and predict.

    python examples/log_model_from_code.py
"""

from __future__ import annotations

import argparse
from pathlib import Path

import mlflow
import pandas as pd

HERE = Path(__file__).resolve().parent


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="trackgate-examples")
    parser.add_argument("--name", default=None, help="also register under this name")
    args = parser.parse_args()

    mlflow.set_experiment(args.experiment)
    example = pd.DataFrame({"bmi": [0.06, -0.04], "bp": [0.02, -0.03]})
    with mlflow.start_run(run_name="model-from-code"):
        info = mlflow.pyfunc.log_model(
            name="model",
            python_model=str(HERE / "model_code.py"),  # a path: the code is the model
            model_config={"threshold": 0.05},
            input_example=example,
            pip_requirements=["pandas"],
            registered_model_name=args.name,
        )
    loaded = mlflow.pyfunc.load_model(info.model_uri)
    print(f"model uri: {info.model_uri}")
    print(loaded.predict(example).to_string(index=False))


if __name__ == "__main__":
    main()
