"""Every path family needs credentials; /health does not; plain HTTP only redirects."""

from __future__ import annotations

import socket
import ssl

import pytest
import requests

from .support import RunningStack, fresh_source_ip, session_from

# One path per family the MLflow server exposes (UI, REST, ajax, GraphQL, artifacts, static).
PATH_FAMILIES = {
    "ui": "/",
    "api": "/api/2.0/mlflow/experiments/search?max_results=1",
    "ajax-api": "/ajax-api/2.0/mlflow/experiments/search?max_results=1",
    "graphql": "/graphql",
    "get-artifact": "/get-artifact?path=x&run_uuid=0",
    "mlflow-artifacts": "/api/2.0/mlflow-artifacts/artifacts",
    "static-files": "/static-files/favicon.ico",
    "version": "/version",
}


@pytest.fixture(scope="module")
def member(stack: RunningStack) -> tuple[str, str]:
    return stack.new_user("member")


CASES = {
    "no credentials": lambda user, pw: None,
    "wrong password": lambda user, pw: (user, pw + "x"),
    "unknown user": lambda user, pw: ("nobody-" + user, pw),
}


@pytest.mark.parametrize("family", sorted(PATH_FAMILIES))
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_path_family_refuses_bad_credentials_with_a_basic_challenge(
    stack: RunningStack, member: tuple[str, str], family: str, case: str
) -> None:
    auth = CASES[case](*member)
    response = stack.get(PATH_FAMILIES[family], auth=auth)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == 'Basic realm="trackgate", charset="UTF-8"'
    assert "MLFLOW_TRACKING_PASSWORD" in response.text


@pytest.mark.parametrize("family", sorted(PATH_FAMILIES))
def test_every_path_family_passes_the_right_credentials_to_mlflow(
    stack: RunningStack, member: tuple[str, str], family: str
) -> None:
    response = stack.get(PATH_FAMILIES[family], auth=member)
    assert response.status_code != 401
    assert "WWW-Authenticate" not in response.headers
    if family in ("ui", "api", "ajax-api", "version"):
        assert response.status_code == 200


def test_health_is_open_and_reflects_the_tracking_server(stack: RunningStack) -> None:
    response = stack.get("/health")
    assert response.status_code == 200
    assert response.text.strip() == "OK"


def test_plain_http_redirects_to_https_without_asking_for_credentials(stack: RunningStack) -> None:
    url = f"http://localhost:{stack.settings.http_port}/api/2.0/mlflow/experiments/search?a=1"
    with session_from() as session:
        response = session.get(url, allow_redirects=False, timeout=10)
    assert response.status_code == 308
    assert response.headers["Location"] == stack.url + "/api/2.0/mlflow/experiments/search?a=1"
    assert "WWW-Authenticate" not in response.headers


def test_removed_user_is_refused_on_the_next_request(stack: RunningStack) -> None:
    name, password = stack.new_user("leaver")
    source = fresh_source_ip()
    assert stack.get("/version", auth=(name, password), source_ip=source).status_code == 200
    stack.users.remove(name)
    assert stack.get("/version", auth=(name, password), source_ip=source).status_code == 401


def test_security_headers_are_set_once_on_every_answer(
    stack: RunningStack, member: tuple[str, str]
) -> None:
    for response in (stack.get("/", auth=member), stack.get("/"), stack.get("/health")):
        assert response.headers["Strict-Transport-Security"].startswith("max-age=")
        assert response.headers["X-Content-Type-Options"] == "nosniff"  # one value, not two
        assert response.headers["X-Frame-Options"] == "SAMEORIGIN"
        assert "nginx/" not in response.headers.get("Server", "")


@pytest.mark.parametrize(
    "version, accepted",
    [
        (ssl.TLSVersion.TLSv1_1, False),
        (ssl.TLSVersion.TLSv1_2, True),
        (ssl.TLSVersion.TLSv1_3, True),
    ],
)
def test_only_tls_1_2_and_1_3_are_accepted(
    stack: RunningStack, version: ssl.TLSVersion, accepted: bool
) -> None:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.load_verify_locations(str(stack.ca))
    context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let the client offer old versions at all
    context.minimum_version = context.maximum_version = version
    with socket.create_connection(("127.0.0.1", stack.settings.https_port), timeout=10) as raw:
        if accepted:
            with context.wrap_socket(raw, server_hostname="localhost") as tls:
                assert tls.version() == version.name.replace("_", ".")
        else:
            with pytest.raises(
                ssl.SSLError, match="ALERT_PROTOCOL_VERSION|ALERT_HANDSHAKE_FAILURE"
            ):
                context.wrap_socket(raw, server_hostname="localhost")


def test_certificate_is_issued_for_the_host_name_by_the_local_ca(stack: RunningStack) -> None:
    # requests verifies the chain against the CA and the name against the SAN.
    response = requests.get(stack.url + "/health", verify=str(stack.ca), timeout=10)
    assert response.ok
