"""The team SDK for training scripts: a thin, explicit layer over plain MLflow.

    from app import sdk

    params = sdk.load_params("params.yaml")
    with sdk.training_run("churn", params=params) as run:
        model = train(**params)
        joblib.dump(model, "outputs/model.joblib")   # logged automatically on exit

Everything else is ordinary MLflow: inside the block `mlflow.log_metric` etc. work as usual.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from . import connection as client
from .connection import ClientError, TrackingConfig

MODEL_SUFFIXES = (".joblib", ".pkl", ".h5", ".keras", ".onnx", ".pt", ".model")
# Directories never searched for model files: environments, VCS data, local MLflow stores.
_SKIP_DIRS = {".git", ".venv", "venv", "env", "node_modules", "__pycache__", "mlruns", ".tox"}

__all__ = [
    "ClientError",
    "configure",
    "get_or_create_experiment",
    "load_params",
    "training_run",
    "MODEL_SUFFIXES",
]


def load_params(path: str | Path) -> dict[str, Any]:
    """Run parameters from a .yaml/.yml or .json file (a mapping at the top level)."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        data = yaml.safe_load(text)
    elif path.suffix.lower() == ".json":
        data = json.loads(text)
    else:
        raise ValueError(f"{path}: parameters must be a .yaml, .yml or .json file")
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ValueError(
            f"{path}: expected a mapping of parameter names to values, got {type(data).__name__}"
        )
    return data


def configure(env_file: str | Path | None = ".env", *, check: bool = True) -> TrackingConfig:
    """Point MLflow at the team server (`trackgate.client.configure`) and, with `check`, make one
    request so that missing or wrong credentials fail here, with a message saying what to fix,
    rather than as a traceback deep in the first `log_metric`."""
    config = client.configure(env_file, require=True)
    if check:
        result = client.check(config)
        if not result.ok:
            raise ClientError(result.message)
    return config


def get_or_create_experiment(name: str, *, tags: Mapping[str, str] | None = None) -> str:
    """The id of experiment NAME, created (with `tags`) if it does not exist yet."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    mlflow_client = MlflowClient()
    found = mlflow_client.get_experiment_by_name(name)
    if found is not None:
        if found.lifecycle_stage == "deleted":
            raise ClientError(
                f"experiment {name!r} is deleted: restore it in the UI or choose another name"
            )
        return str(found.experiment_id)
    try:
        return str(mlflow_client.create_experiment(name, tags=dict(tags or {})))
    except MlflowException as exc:
        if exc.error_code != "RESOURCE_ALREADY_EXISTS":
            raise
        # Another script created it between our two calls.
        again = mlflow_client.get_experiment_by_name(name)
        assert again is not None
        return str(again.experiment_id)


def _flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested parameter files become dotted MLflow params: {"opt": {"lr": 1}} -> opt.lr=1."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _model_files(roots: Iterable[Path]) -> dict[Path, int]:
    """Model files under `roots` with their modification times (ns)."""
    found: dict[Path, int] = {}
    for root in roots:
        if root.is_file():
            candidates: Iterable[Path] = [root]
        else:
            candidates = _walk(root)
        for path in candidates:
            if path.suffix.lower() in MODEL_SUFFIXES and path.is_file():
                found[path.resolve()] = path.stat().st_mtime_ns
    return found


def _walk(root: Path) -> Iterator[Path]:
    for directory, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in _SKIP_DIRS and not d.startswith(".")]
        for name in files:
            yield Path(directory, name)


def _calling_script() -> Path | None:
    """The file of the code that opened the run (the training script), else sys.argv[0]."""
    skip = {Path(__file__).resolve(), Path(contextlib.__file__).resolve()}
    frame = inspect.currentframe()
    while frame is not None:
        candidate = Path(frame.f_code.co_filename)
        if candidate.is_file() and candidate.resolve() not in skip:
            return candidate.resolve()
        frame = frame.f_back
    argv0 = Path(sys.argv[0]) if sys.argv and sys.argv[0] else None
    return argv0.resolve() if argv0 is not None and argv0.is_file() else None


@contextmanager
def training_run(
    experiment: str,
    *,
    run_name: str | None = None,
    params: Mapping[str, Any] | None = None,
    tags: Mapping[str, str] | None = None,
    autolog: bool | Mapping[str, Any] = True,
    model_dirs: Iterable[str | Path] = (".",),
    env_file: str | Path | None = ".env",
) -> Iterator[Any]:
    """An MLflow run with the team's conventions; yields the `mlflow.ActiveRun`.

    On entry: configure and check credentials, get or create `experiment`, enable autolog
    (`autolog` may be a mapping of `mlflow.autolog` options, e.g. {"log_models": False}), start
    the run, log `params` (nested keys dotted) and `tags`, and log the calling script under
    `code/` for lineage. On exit, also after an exception (which marks the run FAILED): log
    every model file (MODEL_SUFFIXES) under `model_dirs` that the block created or changed,
    under `model_files/`.
    """
    import mlflow

    script = _calling_script()
    configure(env_file)
    experiment_id = get_or_create_experiment(experiment)
    if autolog:
        mlflow.autolog(**{"silent": True, **(autolog if isinstance(autolog, Mapping) else {})})
    roots = [Path(d) for d in model_dirs]
    before = _model_files(roots)
    with mlflow.start_run(
        experiment_id=experiment_id, run_name=run_name, tags=dict(tags or {})
    ) as run:
        if params:
            mlflow.log_params(_flatten(params))
        if script is not None:
            mlflow.log_artifact(str(script), artifact_path="code")
            mlflow.set_tag("trackgate.script", script.name)
        try:
            yield run
        finally:  # a failed run keeps its checkpoints too: they show how far it got
            written = [
                path for path, mtime in _model_files(roots).items() if before.get(path) != mtime
            ]
            for path in sorted(written):
                mlflow.log_artifact(str(path), artifact_path="model_files")
