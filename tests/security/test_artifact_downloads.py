"""Artifact downloads sent by nginx after the tracking server authorized them (issue 18).

The tracking server still decides every download (roles, private experiments, MLflow's own
path checks) and still logs it with the verified user; only the bytes come from nginx
(X-Accel-Redirect to an internal location). nginx's ETag shows who sent the body."""

from __future__ import annotations

import os
import re
import secrets
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from ..support import RunningStack, patched_environ, running_stack

pytestmark = pytest.mark.security
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("downloads-stack")) as running:
        yield running


@pytest.fixture(scope="module")
def logged(stack: RunningStack, tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    """An editor's run with one artifact, logged by the MLflow client."""
    from mlflow import MlflowClient

    name, password = stack.new_user("owner")
    source = tmp_path_factory.mktemp("upload") / "weights.bin"
    source.write_bytes(os.urandom(3 << 20))
    with patched_environ(stack.client_env(name, password)):
        client = MlflowClient(tracking_uri=stack.url)
        experiment = client.create_experiment(f"downloads-{secrets.token_hex(4)}")
        run_id = client.create_run(experiment).info.run_id
        client.log_artifact(run_id, str(source), "model")
    return {"auth": (name, password), "run_id": run_id, "experiment": experiment,
            "data": source.read_bytes(),
            "url": f"{ARTIFACTS}/{experiment}/{run_id}/artifacts/model/weights.bin"}


def _logged_bytes(stack: RunningStack, method: str, path: str) -> list[str]:
    """The tracking server's access log lines for METHOD PATH (their body sizes)."""
    log = (stack.settings.logs or Path()) / "tracking-access.log"
    pattern = re.compile(rf'"{method} {re.escape(path)} HTTP/1.1" (\d+) (\S+)')
    return [m.group(2) for m in pattern.finditer(log.read_text())]


def _wait_logged(stack: RunningStack, method: str, path: str, count: int) -> list[str]:
    deadline = time.monotonic() + 10  # gunicorn writes the line after the answer
    while len(found := _logged_bytes(stack, method, path)) < count and \
            time.monotonic() < deadline:
        time.sleep(0.05)
    return found


def test_the_mlflow_client_lists_and_downloads_as_before_and_nginx_sends_the_bytes(
    stack: RunningStack, logged: dict[str, object], tmp_path: Path,
) -> None:
    from mlflow import MlflowClient

    name, password = logged["auth"]  # type: ignore[misc]
    with patched_environ(stack.client_env(name, password)):
        client = MlflowClient(tracking_uri=stack.url)
        listed = client.list_artifacts(str(logged["run_id"]), "model")
        assert [(f.path, f.file_size) for f in listed] == [("model/weights.bin", 3 << 20)]
        local = client.download_artifacts(str(logged["run_id"]), "model/weights.bin",
                                          str(tmp_path))
    assert Path(local).read_bytes() == logged["data"]
    # Audit trail: the tracking server still logs the download, with the verified user.
    path = str(logged["url"])
    assert _wait_logged(stack, "GET", path, 1)
    line = next(x for x in ((stack.settings.logs or Path()) / "tracking-access.log")
                .read_text().splitlines() if f'"GET {path} ' in x)
    assert f"user={name}" in line
    # nginx sent the bytes: its ETag is "<mtime>-<size>" in hex (werkzeug's is "wzsdm-...").
    stored = Path(stack.settings.artifacts_uri, path.removeprefix(ARTIFACTS + "/")).stat()
    etag = stack.get(path, auth=(name, password)).headers["ETag"]
    assert etag == f'"{int(stored.st_mtime):x}-{stored.st_size:x}"', etag


def test_ranges_head_and_revalidation_are_answered_by_nginx(
    stack: RunningStack, logged: dict[str, object],
) -> None:
    auth, url, data = logged["auth"], str(logged["url"]), logged["data"]
    assert isinstance(data, bytes)
    part = stack.get(url, auth=auth, headers={"Range": "bytes=1000-1999"})  # type: ignore[arg-type]
    assert part.status_code == 206 and part.content == data[1000:2000]
    assert part.headers["Content-Range"] == f"bytes 1000-1999/{len(data)}"
    head = stack.request("HEAD", url, auth=auth)  # type: ignore[arg-type]
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len(data))
    full = stack.get(url, auth=auth)  # type: ignore[arg-type]
    assert full.content == data
    # MLflow's attachment header and the security headers come along.
    assert full.headers["Content-Disposition"].startswith("attachment")
    assert full.headers["X-Content-Type-Options"] == "nosniff"
    again = stack.get(url, auth=auth,  # type: ignore[arg-type]
                      headers={"If-None-Match": full.headers["ETag"]})
    assert again.status_code == 304


def test_no_credentials_wrong_ones_and_the_internal_location_get_nothing(
    stack: RunningStack, logged: dict[str, object],
) -> None:
    url = str(logged["url"])
    assert stack.get(url).status_code == 401
    assert stack.get(url, auth=(logged["auth"][0], "wrong")).status_code == 401  # type: ignore[index]
    relative = url.removeprefix(ARTIFACTS + "/")
    for auth in (None, logged["auth"]):
        direct = stack.get(f"/_trackgate/artifact-files/{relative}", auth=auth)  # type: ignore[arg-type]
        assert direct.status_code == 404 and direct.content != logged["data"]


@pytest.mark.parametrize("path", [
    "../htpasswd", "..%2Fhtpasswd", "%2e%2e/htpasswd", "x/..%2F..%2Fhtpasswd",
    "x/%2e%2e/%2e%2e/htpasswd", "%2Fetc/passwd", "..%5Chtpasswd", "x/%00/htpasswd",
    "x/..;/..;/htpasswd",
])
def test_traversal_out_of_the_artifact_root_is_refused(
    stack: RunningStack, logged: dict[str, object], path: str,
) -> None:
    answer = requests.get(f"{stack.url}{ARTIFACTS}/{path}", auth=logged["auth"],  # type: ignore[arg-type]
                          verify=str(stack.ca), timeout=30, allow_redirects=False)
    # A redirect (werkzeug merging '//') names a path under the root again: no file either.
    assert answer.status_code in (308, 400, 403, 404), (path, answer.status_code)
    assert b"$2" not in answer.content and b"root:" not in answer.content


def test_a_private_experiments_artifacts_are_refused_to_users_without_read(
    stack: RunningStack, tmp_path: Path,
) -> None:
    owner = stack.new_user("carol")
    other = stack.new_user("bob")
    made = stack.request("POST", "/api/2.0/mlflow/experiments/create", auth=owner, json={
        "name": f"private-{owner[0]}", "tags": [{"key": "trackgate.private", "value": "true"}]})
    experiment = made.json()["experiment_id"]
    run = stack.request("POST", "/api/2.0/mlflow/runs/create", auth=owner,
                        json={"experiment_id": experiment}).json()["run"]["info"]["run_id"]
    url = f"{ARTIFACTS}/{experiment}/{run}/artifacts/secret.txt"
    assert stack.request("PUT", url, auth=owner, data=b"carol's secret").status_code == 200
    assert stack.get(url, auth=owner).content == b"carol's secret"
    refused = stack.get(url, auth=other)
    assert refused.status_code == 403 and b"carol's secret" not in refused.content
    ranged = stack.get(url, auth=other, headers={"Range": "bytes=0-5"})
    assert ranged.status_code == 403
