"""trackgate: a private, password-protected MLflow server.

The package by role (each module owns one job; see README "Layout"):

- shared building blocks every deployment uses: ``settings`` (the one settings object),
  ``users`` and ``roles`` (the htpasswd store and who may do what), ``tokens`` (API tokens),
  ``tls`` (local CA),
  ``nginx`` (render, run, test, reload), ``database`` (schema and its backups), ``backup``
  (archives: backup, restore, verify), ``audit`` (the audit log), ``provision`` (first run),
  ``accounts`` (unprivileged accounts when started by root), ``processes`` (PIDs, ports, /proc);
- ``server/``: what runs behind nginx: the auth gateway (``gateway``, ``credentials``,
  ``throttle``; sign-in: ``sessions``, ``login``, ``oidc``), the MLflow tracking server
  (``tracking``, ``gunicorn``) and the policy layer in front of MLflow's handlers (``policy``:
  artifact roots; ``access``: roles, owners, authors);
- ``local/``: `trackgate up` on one machine without systemd or Docker (``stack``,
  ``supervisor``, ``probe``) and `trackgate serve-model` (``serving``);
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
