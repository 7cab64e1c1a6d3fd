"""What runs behind nginx: the auth gateway and the MLflow tracking server (gunicorn)."""
