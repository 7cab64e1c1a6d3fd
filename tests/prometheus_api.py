"""Questions to a running Prometheus (its HTTP API), shared by the deploy and compose tiers:
is every trackgate target up, and does stopping one fire TrackgateDown. `get` fetches an API
path and returns the decoded JSON (over HTTP from here, or from inside a host container)."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import requests

JOBS = ("trackgate-tracking", "trackgate-gateway", "trackgate-nginx")
Get = Callable[[str], Any]


def over_http(base: str) -> Get:
    def get(path: str) -> Any:
        answer = requests.get(base + path, timeout=10)
        answer.raise_for_status()
        return answer.json()
    return get


def inside(host: Any, port: int = 9090) -> Get:
    """Through `python3` on a testinfra host (Prometheus listens on its loopback only)."""
    def get(path: str) -> Any:
        script = ("import sys, urllib.request; sys.stdout.write(urllib.request.urlopen("
                  f"'http://127.0.0.1:{port}' + sys.argv[1], timeout=10).read().decode())")
        result = host.run(f"python3 -c \"{script}\" '{path}'")
        if result.rc != 0:
            raise OSError(result.stderr)
        return json.loads(result.stdout)
    return get


def targets_up(get: Get) -> dict[str, float]:
    """{job: value of `up`} for trackgate's jobs (absent: not scraped yet)."""
    try:
        data = get("/api/v1/query?query=up%7Bjob%3D~%22trackgate-.%2A%22%7D")["data"]
    except (OSError, requests.RequestException, ValueError):
        return {}
    return {r["metric"]["job"]: float(r["value"][1]) for r in data["result"]}


def firing(get: Get, alertname: str, job: str) -> list[dict[str, Any]]:
    try:
        alerts = get("/api/v1/alerts")["data"]["alerts"]
    except (OSError, requests.RequestException, ValueError):
        return []
    return [a for a in alerts if a["labels"].get("alertname") == alertname
            and a["labels"].get("job") == job and a["state"] == "firing"]


def wait_until_every_target_is_up(get: Get, timeout: float = 120) -> dict[str, float]:
    deadline = time.monotonic() + timeout
    while True:
        up = targets_up(get)
        if all(up.get(job) == 1 for job in JOBS) or time.monotonic() > deadline:
            return up
        time.sleep(1)


def wait_for_alert(get: Get, alertname: str, job: str, timeout: float = 120) -> list[Any]:
    deadline = time.monotonic() + timeout
    while True:
        alerts = firing(get, alertname, job)
        if alerts or time.monotonic() > deadline:
            return alerts
        time.sleep(1)
