"""Run one of trackgate's Python servers in the foreground under gunicorn.

The same entry point (`trackgate serve tracking|gateway`) runs under `trackgate up`'s supervisor,
under systemd units (Ansible) and as a container command (compose).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from gunicorn.app.base import BaseApplication

from . import database
from .gunicorn_conf import gateway_options, tracking_options
from .settings import Settings


class _GunicornApp(BaseApplication):  # type: ignore[misc]
    """gunicorn's documented "custom application": options from a dict, app from a callable."""

    def __init__(self, load: Any, options: dict[str, Any]) -> None:
        self._load = load
        self._options = options
        super().__init__()

    def load_config(self) -> None:
        for key, value in self._options.items():
            self.cfg.set(key, value)

    def load(self) -> Any:
        return self._load()


def mlflow_environment(settings: Settings) -> dict[str, str]:
    """What `mlflow server --serve-artifacts` would set, plus the Host/CORS allow-lists."""
    names = settings.server_names
    hosts = [*names, *(f"{n}:*" for n in names), "localhost", "localhost:*", "127.0.0.1:*"]
    origins = [*(f"https://{n}" for n in names), *(f"https://{n}:*" for n in names)]
    return {
        "_MLFLOW_SERVER_FILE_STORE": settings.database_uri,
        "_MLFLOW_SERVER_REGISTRY_STORE": settings.database_uri,
        "_MLFLOW_SERVER_ARTIFACT_ROOT": "mlflow-artifacts:/",
        "_MLFLOW_SERVER_ARTIFACT_DESTINATION": settings.artifacts_uri,
        "_MLFLOW_SERVER_SERVE_ARTIFACTS": "true",
        "_MLFLOW_SGI_NAME": "gunicorn",
        "MLFLOW_SERVER_ALLOWED_HOSTS": ",".join(dict.fromkeys(hosts)),
        "MLFLOW_SERVER_CORS_ALLOWED_ORIGINS": ",".join(origins),
    }


def _load_mlflow() -> Any:
    from mlflow.server import app

    return app


def run_tracking(settings: Settings) -> None:
    """Prepare the database and artifact store, then serve `mlflow.server:app`."""
    if settings.logs is not None:
        settings.logs.mkdir(parents=True, exist_ok=True)
    if "://" not in settings.artifacts_uri:
        Path(settings.artifacts_uri).mkdir(parents=True, exist_ok=True)
    database.ensure_schema(settings, allow_upgrade=False)
    os.environ.update(mlflow_environment(settings))
    _GunicornApp(_load_mlflow, tracking_options(settings)).run()


def run_gateway(settings: Settings) -> None:
    from .gateway import create_app

    if settings.logs is not None:
        settings.logs.mkdir(parents=True, exist_ok=True)
    _GunicornApp(lambda: create_app(settings), gateway_options(settings)).run()
