"""Prometheus metrics (issue 17): every component is scraped on the metrics listener, known
traffic moves the counters by exactly that much, and the public listener never shows them."""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families
from trackgate import backup
from trackgate.local.probe import internal_connection
from trackgate.local.supervisor import nginx_exporter_binary

from .support import RunningStack, fresh_source_ip

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(url: str) -> Samples:
    answer = requests.get(url, timeout=10)
    assert answer.status_code == 200, (url, answer.status_code, answer.text[:300])
    assert answer.headers["Content-Type"].startswith("text/plain"), answer.headers
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(answer.text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    """The sum of the samples named `name` whose labels include `labels` (0 if none)."""
    want = set(labels.items())
    return sum(v for (n, ls), v in samples.items() if n == name and want <= ls)


def gateway(stack: RunningStack) -> Samples:
    return scrape(stack.settings.metrics_urls["gateway"])


def wait_for(check: Callable[[], bool], timeout: float = 15) -> None:
    """nginx's request lines reach the gateway as datagrams, a moment after the answer."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return
        time.sleep(0.1)


def test_config_json_lists_every_metrics_url(stack: RunningStack) -> None:
    urls = stack.settings.layout()["metrics_urls"]
    port = stack.settings.metrics_port
    assert urls == {
        "tracking": f"http://127.0.0.1:{port}/metrics/tracking",
        "gateway": f"http://127.0.0.1:{port}/metrics/gateway",
        "nginx": f"http://127.0.0.1:{stack.settings.nginx_exporter_port}/metrics",
    }


def test_each_component_is_scraped_in_prometheus_format(stack: RunningStack) -> None:
    admin = ("admin", stack.admin_password)
    assert stack.get("/api/2.0/mlflow/experiments/search?max_results=1",
                     auth=admin).status_code == 200
    tracking = scrape(stack.settings.metrics_urls["tracking"])
    assert any(name.startswith("mlflow_http_request") for name, _ in tracking), tracking
    names = {name for name, _ in gateway(stack)}
    for expected in ("trackgate_auth_success_total", "trackgate_auth_failure_total",
                     "trackgate_auth_throttled_total", "trackgate_auth_cache_hits_total",
                     "trackgate_data_dir_free_bytes", "trackgate_backup_max_age_seconds",
                     "trackgate_tls_certificate_expiry_timestamp_seconds"):
        assert expected in names, (expected, sorted(names))
    if nginx_exporter_binary() is None:
        pytest.skip("prometheus-nginx-exporter is not installed (scripts/install.sh --test)")
    url = stack.settings.metrics_urls["nginx"]
    wait_for(lambda: _answers(url), 30)
    nginx = scrape(url)
    assert value(nginx, "nginx_up") == 1
    assert value(nginx, "nginx_http_requests_total") > 0


def _answers(url: str) -> bool:
    try:
        return requests.get(url, timeout=5).status_code == 200
    except requests.RequestException:
        return False


@pytest.mark.parametrize(
    "path", ["/metrics", "/metrics/", "/metrics/tracking", "/metrics/gateway", "//metrics",
             "/%6detrics", "/metrics?x=1", "/stub_status"],
)
def test_the_public_listener_never_serves_metrics(stack: RunningStack, path: str) -> None:
    for auth in (None, ("admin", stack.admin_password)):
        answer = stack.get(path, auth=auth)
        assert answer.status_code in (401, 404), (path, auth is not None, answer.status_code)
        assert "trackgate_" not in answer.text and "mlflow_http" not in answer.text
        assert "Active connections" not in answer.text


def test_the_tracking_server_hides_metrics_from_a_request_nginx_vouched_for(
    stack: RunningStack,
) -> None:
    # Defence in depth: a logged-in user's request (one nginx stamped with the user) that got
    # to /metrics by some spelling nginx did not catch is refused by the tracking server too.
    conn = internal_connection(stack.settings.tracking_address, timeout=10)
    try:
        conn.request("GET", "/metrics", headers={"Host": "localhost", "X-Trackgate-User": "eve"})
        answer = conn.getresponse()
        assert answer.status == 404 and b"mlflow_http" not in answer.read()
    finally:
        conn.close()


def test_logins_wrong_passwords_and_a_throttled_client_move_the_counters_by_exactly_that(
    stack: RunningStack,
) -> None:
    user = stack.new_user("metered")
    guesser, stranger = fresh_source_ip(), f"nobody-{time.monotonic_ns()}"
    limit = stack.settings.failure_limit
    path = "/api/2.0/mlflow/experiments/search?max_results=1"
    before = gateway(stack)
    tracking_before = scrape(stack.settings.metrics_urls["tracking"])

    for _ in range(4):  # one bcrypt check, then three answers from memory
        assert stack.get(path, auth=user).status_code == 200
    for _ in range(3):
        assert stack.get(path, auth=(user[0], "wrong"), source_ip=fresh_source_ip()
                         ).status_code == 401
    for _ in range(limit):  # a guesser reaches the limit ...
        assert stack.get(path, auth=(stranger, "guess"), source_ip=guesser).status_code == 401
    assert stack.get(path, auth=(stranger, "guess"), source_ip=guesser).status_code == 429

    expected_requests = {"200": 4, "401": 3 + limit, "429": 1}
    wait_for(lambda: all(
        value(gateway(stack), "trackgate_http_requests_total", status=s, family="api")
        - value(before, "trackgate_http_requests_total", status=s, family="api") >= n
        for s, n in expected_requests.items()))
    after = gateway(stack)

    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("trackgate_auth_success_total") == 4
    assert moved("trackgate_auth_cache_hits_total") == 3
    assert moved("trackgate_auth_failure_total") == 3 + limit
    assert moved("trackgate_auth_throttled_total", reason="failures") == 1
    assert moved("trackgate_auth_throttled_total", reason="busy") == 0
    assert moved("trackgate_auth_bcrypt_seconds_count") == 1 + 3 + limit
    assert moved("trackgate_auth_bcrypt_seconds_sum") > 0
    for status, n in expected_requests.items():
        assert moved("trackgate_http_requests_total", status=status, family="api") == n
    # Only the four let through reached the tracking server, and nginx timed each of them.
    assert moved("trackgate_http_upstream_seconds_count", family="api") == 4
    tracking = scrape(stack.settings.metrics_urls["tracking"])
    assert (value(tracking, "mlflow_http_request_total", method="GET", status="200")
            - value(tracking_before, "mlflow_http_request_total", method="GET", status="200")
            ) == 4


def test_an_upload_and_a_download_move_the_artifact_bytes(stack: RunningStack) -> None:
    admin = ("admin", stack.admin_password)
    run = stack.request("POST", "/api/2.0/mlflow/runs/create", auth=admin,
                        json={"experiment_id": "0"}).json()["run"]["info"]
    where = run["artifact_uri"].removeprefix("mlflow-artifacts:/")
    url = f"/api/2.0/mlflow-artifacts/artifacts/{where}/blob.bin"
    body = b"x" * 300_000
    before = gateway(stack)
    upload = stack.request("PUT", url, auth=admin, data=body)
    assert upload.status_code == 200
    download = stack.get(url, auth=admin)
    assert download.status_code == 200 and download.content == body

    def moved(direction: str) -> float:
        return (value(gateway(stack), "trackgate_artifact_bytes_total", direction=direction)
                - value(before, "trackgate_artifact_bytes_total", direction=direction))

    wait_for(lambda: moved("out") >= len(body))
    # Out: the bodies nginx sent (the download, and the upload's short JSON answer).
    assert moved("out") == len(body) + len(upload.content)
    # In: the whole request as nginx read it (request line and headers included).
    assert len(body) < moved("in") < len(body) + 4096
    after = gateway(stack)
    assert (value(after, "trackgate_http_requests_total", family="artifacts", status="200")
            - value(before, "trackgate_http_requests_total", family="artifacts", status="200")
            ) == 2


def test_disk_backup_and_certificate_figures(stack: RunningStack, tmp_path: Path) -> None:
    from cryptography import x509

    archive = backup.backup(stack.settings, tmp_path / "metrics-test.tar")
    samples = gateway(stack)
    assert value(samples, "trackgate_backup_last_size_bytes") == archive.size
    assert abs(value(samples, "trackgate_backup_last_success_timestamp_seconds")
               - time.time()) < 120
    assert value(samples, "trackgate_backup_max_age_seconds") == stack.settings.backup_max_age
    free = shutil.disk_usage(stack.settings.data_dir).free
    assert abs(value(samples, "trackgate_data_dir_free_bytes") - free) < 200 * 2**20
    cert = x509.load_pem_x509_certificate(stack.settings.cert_file.read_bytes())
    assert value(samples, "trackgate_tls_certificate_expiry_timestamp_seconds") == (
        cert.not_valid_after_utc.timestamp())


def test_sessions_and_api_tokens_in_use_are_counted(stack: RunningStack) -> None:
    from .test_signin import log_in
    from .test_tokens import create, tokens

    name, password = stack.new_user("metered")
    before = gateway(stack)

    def delta(samples: Samples, metric: str) -> float:
        return value(samples, metric) - value(before, metric)

    assert log_in(stack, name, password, source_ip=fresh_source_ip()).status_code == 303
    create(stack, name, "ci")
    create(stack, name, "nightly")
    assert tokens(stack, "revoke", "--user", name, "--name", "nightly").returncode == 0
    after = gateway(stack)
    assert delta(after, "trackgate_sessions_active") == 1
    assert delta(after, "trackgate_api_tokens_active") == 1
