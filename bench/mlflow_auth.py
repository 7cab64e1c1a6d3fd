"""Serve MLflow's basic-auth app (`mlflow.server.auth:create_app`) for the benchmark.

`python -m bench.mlflow_auth DATA_DIR PORT`, with MLFLOW_AUTH_ADMIN_USERNAME/PASSWORD and
MLFLOW_FLASK_SERVER_SECRET_KEY in the environment. It does what `mlflow server --app-name
basic-auth` does (bootstrap the admin user once, before any worker exists) but under exactly the
gunicorn options trackgate's tracking server uses, so only the authentication differs. The app
needs Flask-WTF (`pip install "mlflow[auth]"`).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from trackgate import database
from trackgate.server.gunicorn import GunicornApp, tracking_options
from trackgate.server.tracking import mlflow_environment

from .targets import tracking_settings

# MLflow's cache of verified credentials is off by default (auth_cache_ttl_seconds = 0); the
# issue compares against it switched on, with trackgate's TTL and size.
_AUTH_INI = """\
[mlflow]
default_permission = READ
database_uri = sqlite:///{db}
authorization_function = mlflow.server.auth:authenticate_request_basic_auth
auth_cache_max_size = {size}
auth_cache_ttl_seconds = {ttl}
"""


def main(data_dir: Path, port: int) -> None:
    settings = tracking_settings(data_dir, port)
    settings.logs.mkdir(parents=True, exist_ok=True)  # type: ignore[union-attr]
    Path(settings.artifacts_uri).mkdir(parents=True, exist_ok=True)
    ini = data_dir / "basic_auth.ini"
    ini.write_text(_AUTH_INI.format(db=data_dir / "basic_auth.db", size=settings.cache_size,
                                    ttl=settings.cache_ttl))
    database.ensure_schema(settings)
    os.environ.update(mlflow_environment(settings))
    os.environ["MLFLOW_AUTH_CONFIG_PATH"] = str(ini)  # read when mlflow.server.auth is imported

    from mlflow.server import auth

    auth.bootstrap_admin_user()  # once, before the workers fork (as `mlflow server` does)
    os.environ["_MLFLOW_AUTH_ADMIN_BOOTSTRAPPED"] = "true"
    options = {**tracking_options(settings), "proc_name": "bench-mlflow-auth"}
    GunicornApp(auth.create_app, options).run()


if __name__ == "__main__":
    main(Path(sys.argv[1]), int(sys.argv[2]))
