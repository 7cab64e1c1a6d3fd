"""The baseline: plain `mlflow.server:app` under the same gunicorn options trackgate uses, with
no policy layer, no nginx and no TLS. `python -m bench.bare_mlflow DATA_DIR PORT`."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from trackgate import database
from trackgate.server.gunicorn import GunicornApp, tracking_options
from trackgate.server.tracking import mlflow_environment

from .targets import tracking_settings


def main(data_dir: Path, port: int) -> None:
    settings = tracking_settings(data_dir, port)
    settings.logs.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
    Path(settings.artifacts_uri).mkdir(parents=True, exist_ok=True)
    database.ensure_schema(settings)
    os.environ.update(mlflow_environment(settings))

    def load() -> object:
        from mlflow.server import app

        return app

    GunicornApp(load, {**tracking_options(settings), "proc_name": "bench-bare-mlflow"}).run()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
