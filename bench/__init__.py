"""Side-by-side benchmark of issue 4: bare gunicorn, trackgate, nginx `auth_basic` and MLflow's
basic-auth app.

Run it with `.venv/bin/python -m bench.run` (add `--quick` for a short smoke run). Not a test:
it measures, prints a table with ratios against the issue's targets, and can write RESULTS.md.
"""
