"""Feature code the model needs at prediction time; shipped inside the model with code_paths."""

from __future__ import annotations

import pandas as pd


def add_features(frame: pd.DataFrame) -> pd.DataFrame:
    """The same derived columns at training and at serving time."""
    out = frame.copy()
    out["bmi_x_bp"] = out["bmi"] * out["bp"]
    return out
