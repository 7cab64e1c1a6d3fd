"""A model defined as code (MLflow "models from code"): this file itself is logged, not a pickle.

log_model_from_code.py logs it with `python_model="model_code.py"`; MLflow runs this file
when the model is loaded, and `set_model` says which object is the model.
"""

from __future__ import annotations

import mlflow
import pandas as pd
from mlflow.pyfunc import PythonModel


class BmiRiskModel(PythonModel):
    """A transparent rule: risk score from BMI and blood pressure, with a configurable cut-off."""

    def load_context(self, context: mlflow.pyfunc.PythonModelContext) -> None:
        self.threshold = float((context.model_config or {}).get("threshold", 0.05))

    def predict(self, context: mlflow.pyfunc.PythonModelContext, model_input: pd.DataFrame,
                params: dict | None = None) -> pd.DataFrame:
        score = model_input["bmi"] + 0.5 * model_input["bp"]
        return pd.DataFrame({"score": score, "high_risk": score > self.threshold})


mlflow.models.set_model(BmiRiskModel())
