"""The MLflow tracking server: the real `mlflow.server:app` under gunicorn, with the environment
`mlflow server --serve-artifacts` would set and the schema checked before it starts.

`trackgate serve tracking` runs it in the foreground under `trackgate up`'s supervisor, systemd
units (Ansible) and containers (compose) alike.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

from .. import database
from ..provision import KEK_PASSPHRASE_ENV, ensure_kek_passphrase
from ..settings import Settings
from . import objectstore, proxyauth
from .gunicorn import GunicornApp, send_head_with_body, tracking_options


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


def _load_mlflow(settings: Settings | None = None) -> Any:
    """MLflow's Flask app behind trackgate's policy layer (see policy.py), with roles, owners,
    stamped authors and the audit log (access.py)."""
    from mlflow.server import app

    from ..audit import AuditLog, audit_path
    from .access import Access
    from .policy import Policy

    root = os.environ.get("_MLFLOW_SERVER_ARTIFACT_ROOT", "mlflow-artifacts:/")
    settings = settings or Settings()
    access = Access(AuditLog(audit_path(settings)), privacy_stamp=settings.privacy_stamp)
    access.install(app)
    if objectstore.is_s3(os.environ.get("_MLFLOW_SERVER_ARTIFACT_DESTINATION")):
        objectstore.install(app)  # every artifact byte through the proxy (see objectstore.py)
    served: Any = app
    if settings.nginx_artifact_root is not None:  # downloads: checked here, sent by nginx
        from .downloads import NginxDownloads

        served = NginxDownloads(app, settings.nginx_artifact_root)
    # Uploads: a body file from nginx linked into place, or gunicorn's body read in large pieces.
    from .uploads import FastUploads, install_linking

    upload_dir = settings.nginx_upload_dir
    if upload_dir is not None:
        install_linking()
    served = FastUploads(served, None if upload_dir is None else str(upload_dir))
    policy = Policy(served, url_map=app.url_map, artifact_root=root, access=access)
    if not settings.metrics:
        return policy
    from .metrics import HideMetricsFromUsers

    return HideMetricsFromUsers(policy)


def prepare_privacy_stamp(settings: Settings) -> str | None:
    """Create the privacy stamp (see access.PrivateExperiments) as this account, 0600, before
    any worker needs it. None if ready, else the one line to print: without it other workers
    see a new private experiment only within 2 s, not before its write is answered."""
    stamp = settings.privacy_stamp
    try:
        os.close(os.open(stamp, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600))
    except OSError as exc:
        return (f"trackgate: cannot write {stamp} ({exc.strerror}): other tracking workers may "
                "show a new private experiment to others for up to 2 s; make "
                f"{settings.data_dir} writable for the tracking server's account")
    return None


def run(settings: Settings) -> None:
    """Prepare the database and artifact store, then serve `mlflow.server:app`."""
    from . import metrics

    if settings.metrics:
        # MLflow's exporter (prometheus-flask-exporter), multiprocess across the workers: the
        # directory must be named before mlflow.server or prometheus-client is imported.
        metrics.prepare_multiprocess_dir("tracking")
    if settings.logs is not None:
        settings.logs.mkdir(parents=True, exist_ok=True)
    if "://" not in settings.artifacts_uri:
        Path(settings.artifacts_uri).mkdir(parents=True, exist_ok=True)
    if settings.nginx_upload_dir is not None:  # nginx's upload bodies: this account's alone
        try:
            settings.nginx_upload_dir.mkdir(mode=0o700, exist_ok=True)
            settings.nginx_upload_dir.chmod(0o700)
        except OSError as exc:  # uploads that nginx hands over get a clear 500 (uploads.py)
            print(f"trackgate: cannot prepare {settings.nginx_upload_dir} for nginx's upload "
                  f"bodies ({exc.strerror}); set TRACKGATE_ARTIFACT_UPLOADS=tracking or make "
                  "the artifact root's parent writable", file=sys.stderr)
    warning = prepare_privacy_stamp(settings)
    if warning is not None:
        print(warning, file=sys.stderr)
    database.ensure_schema(settings, allow_upgrade=False)
    os.environ.update(mlflow_environment(settings))
    if objectstore.is_s3(settings.artifacts_uri):
        os.environ.update(objectstore.s3_environment(settings))
        objectstore.check(settings)  # a wrong endpoint, key or bucket: one line, now
    # MLflow's secret store: the operator's passphrase if set, else this install's own.
    if not os.environ.get(KEK_PASSPHRASE_ENV):
        passphrase = ensure_kek_passphrase(settings)
        if passphrase:
            os.environ[KEK_PASSPHRASE_ENV] = passphrase
    load = lambda: _load_mlflow(settings)  # noqa: E731
    if settings.proxy_secret_file is not None:  # only nginx may call (see proxyauth.py)
        secret = proxyauth.read_secret(settings.proxy_secret_file)
        load = lambda: proxyauth.RequireProxy(_load_mlflow(settings), secret)  # noqa: E731
    try:
        send_head_with_body()  # a killed server never leaves nginx a cut answer
        GunicornApp(load, tracking_options(settings)).run()
    finally:
        metrics.remove_multiprocess_dir()
