"""The client side: what a training script or a person's shell uses to reach a trackgate server.

``configure()`` maps the short ``TRACKING_*`` names and ``.env`` onto MLflow's own variables;
``check()`` says precisely what is wrong; ``sdk`` is the team SDK for training scripts.
"""

from .connection import (
    USER_ENV_FILE,
    CheckResult,
    ClientError,
    TrackingConfig,
    check,
    configure,
    resolve,
    write_env_file,
)

__all__ = [
    "USER_ENV_FILE",
    "CheckResult",
    "ClientError",
    "TrackingConfig",
    "check",
    "configure",
    "resolve",
    "write_env_file",
]
