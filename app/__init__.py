"""trackgate: a private, password-protected MLflow server.

Modules, one concern each: settings (configuration), users (htpasswd store), gateway (auth
subrequests with a credential cache and throttle), nginx_config (templates), tls (local CA),
serve/gunicorn_conf (the Python servers), supervisor/stack (`trackgate up`), client (training
scripts), cli (the `trackgate` command).
"""

__version__ = "0.1.0"
