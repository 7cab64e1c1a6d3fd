"""trackgate: a private, password-protected MLflow server.

The package by role (each module owns one job; see README "Where things live"):

- ``settings``, ``users``, ``tls``, ``nginx``, ``database``, ``provision``, ``processes``:
  shared building blocks every deployment uses (one settings object, one htpasswd store, one
  nginx renderer/controller, the schema and its backups, first-run provisioning);
- ``server/``: what runs behind nginx (the auth gateway with its credential cache and throttle,
  the MLflow tracking server under gunicorn);
- ``local/``: `trackgate up` on one machine without systemd or Docker (stack, supervisor,
  probe) and `trackgate serve-model`;
- ``client/``: what training scripts use (``configure()``, ``check``, ``login``, the team SDK);
- ``cli``: the `trackgate` command, thin wrappers over the above.

Training scripts write ``from trackgate import sdk`` (imported on first use: it loads MLflow).
"""

from __future__ import annotations

import importlib
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType

try:
    __version__ = version("trackgate")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"


def __getattr__(name: str) -> ModuleType:
    if name == "sdk":
        return importlib.import_module("trackgate.client.sdk")
    raise AttributeError(f"module 'trackgate' has no attribute {name!r}")
