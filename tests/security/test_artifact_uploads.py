"""Artifact uploads through the real stack (issue 18, server/uploads.py): nginx writes the body
to a file beside the artifact root and the tracking server, after its checks, links that very
file into place. The bytes that land are the bytes sent, by the MLflow client and by curl; a
client's own X-Trackgate-Upload-File never names the file; the policy layer still refuses users
without write permission before anything lands; MLflow's path checks still refuse traversal; an
upload cut off by its client leaves nothing behind; and every upload is still in the tracking
server's access log with the verified user."""

from __future__ import annotations

import base64
import contextlib
import json
import os
import re
import secrets
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from trackgate.roles import RolesStore, roles_path

from ..support import RunningStack, patched_environ, running_stack

pytestmark = pytest.mark.security
ARTIFACTS = "/api/2.0/mlflow-artifacts/artifacts"
STAGING = ".artifact.uploading."  # MLflow's staging files beside the destination


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    with running_stack(tmp_path_factory.mktemp("uploads-stack"), bcrypt_rounds=4) as running:
        yield running


@pytest.fixture(scope="module")
def owned(stack: RunningStack) -> dict[str, object]:
    """An editor's experiment and run: where uploads go."""
    auth = stack.new_user("owner")
    experiment = stack.request("POST", "/api/2.0/mlflow/experiments/create", auth=auth,
                               json={"name": f"uploads-{secrets.token_hex(4)}"}
                               ).json()["experiment_id"]
    run = stack.request("POST", "/api/2.0/mlflow/runs/create", auth=auth,
                        json={"experiment_id": experiment}).json()["run"]["info"]["run_id"]
    return {"auth": auth, "experiment": experiment, "run": run,
            "prefix": f"{ARTIFACTS}/{experiment}/{run}/artifacts"}


def _stored(stack: RunningStack, url: str) -> Path:
    return Path(stack.settings.artifacts_uri, url.removeprefix(ARTIFACTS + "/"))


def _staging_files(stack: RunningStack) -> list[Path]:
    return [p for p in Path(stack.settings.artifacts_uri).rglob("*") if STAGING in p.name]


def _curl_put(stack: RunningStack, auth: tuple[str, str], source: Path, url: str) -> int:
    out = subprocess.run(["curl", "-sS", "-o", "/dev/null", "-w", "%{http_code}", "--cacert",
                          str(stack.ca), "-u", f"{auth[0]}:{auth[1]}", "-T", str(source),
                          stack.url + url], capture_output=True, text=True, timeout=120)
    return int(out.stdout or 0)


def test_the_mlflow_client_and_curl_upload_byte_identical_files_logged_with_the_user(
    stack: RunningStack, owned: dict[str, object], tmp_path: Path,
) -> None:
    from mlflow import MlflowClient

    name, password = owned["auth"]  # type: ignore[misc]
    by_client = tmp_path / "weights.bin"
    by_client.write_bytes(os.urandom((5 << 20) + 7))  # not a whole number of read pieces
    with patched_environ(stack.client_env(name, password)):
        MlflowClient(tracking_uri=stack.url).log_artifact(str(owned["run"]), str(by_client),
                                                          "model")
    uploads = {f"{owned['prefix']}/model/weights.bin": by_client.read_bytes()}
    for size in (0, 1, (3 << 20) + 1):
        source = tmp_path / f"curl-{size}.bin"
        source.write_bytes(os.urandom(size))
        url = f"{owned['prefix']}/curl/{source.name}"
        assert _curl_put(stack, (name, password), source, url) == 200
        uploads[url] = source.read_bytes()
    for url, data in uploads.items():
        assert _stored(stack, url).read_bytes() == data, url
        assert stack.get(url, auth=(name, password)).content == data, url
    assert not _staging_files(stack)
    # Audit trail: each upload is in the tracking server's access log with the verified user.
    log = (stack.settings.logs or Path()) / "tracking-access.log"
    deadline = time.monotonic() + 10  # gunicorn writes the line after the answer
    while time.monotonic() < deadline:
        lines = log.read_text().splitlines()
        found = [u for u in uploads if any(f'"PUT {u} HTTP/1.1" 200' in x and f"user={name}" in x
                                           for x in lines)]
        if len(found) == len(uploads):
            break
        time.sleep(0.05)
    assert sorted(found) == sorted(uploads)
    # ... and in trackgate's audit log (one JSON line per write, with the verified user).
    assert stack.settings.audit_log is not None
    events = [json.loads(x) for x in stack.settings.audit_log.read_text().splitlines()]
    audited = {e.get("path") for e in events if e.get("user") == name and e.get("method") == "PUT"}
    assert set(uploads) <= audited, sorted(audited)


def test_users_without_write_permission_are_refused_before_anything_lands(
    stack: RunningStack, owned: dict[str, object], tmp_path: Path,
) -> None:
    viewer = stack.new_user("viewer")
    RolesStore(roles_path(stack.settings)).set(viewer[0], "viewer")
    other_editor = stack.new_user("other")  # an editor, but not the run's owner
    source = tmp_path / "intruder.bin"
    source.write_bytes(os.urandom(2 << 20))
    for who in (viewer, other_editor):
        url = f"{owned['prefix']}/{who[0]}.bin"
        answer = stack.request("PUT", url, auth=who, data=source.read_bytes())
        assert answer.status_code == 403, (who[0], answer.status_code, answer.text)
        assert _curl_put(stack, who, source, url) == 403
        assert not _stored(stack, url).exists()
    assert not _staging_files(stack)
    _wait_empty(_upload_dir(stack))  # nginx removes its body files when the requests end


@pytest.mark.parametrize("path", [
    "../uploaded-outside", "..%2Fuploaded-outside", "%2e%2e/uploaded-outside",
    "x/..%2F..%2Fuploaded-outside", "%2Fuploaded-outside", "1/../../uploaded-outside",
    "x/%2e%2e/%2e%2e/uploaded-outside",
])
def test_traversal_in_an_upload_path_is_refused(
    stack: RunningStack, owned: dict[str, object], path: str,
) -> None:
    answer = stack.request("PUT", f"{ARTIFACTS}/{path}", auth=owned["auth"],  # type: ignore[arg-type]
                           data=b"outside", allow_redirects=False)
    assert answer.status_code in (308, 400, 403, 404), (path, answer.status_code)
    root = Path(stack.settings.artifacts_uri)
    data = Path(stack.settings.data_dir)  # the artifact root's parent, and its parent
    landed = [p for p in [*data.rglob("*uploaded-outside*"),
                          *data.parent.glob("*uploaded-outside*")] if root not in p.parents]
    assert not landed, landed


def test_an_upload_cut_off_by_its_client_leaves_no_file_behind(
    stack: RunningStack, owned: dict[str, object],
) -> None:
    name, password = owned["auth"]  # type: ignore[misc]
    url = f"{owned['prefix']}/cut-off.bin"
    body_temp = stack.settings.nginx_upload_dir
    assert body_temp is not None
    context = ssl.create_default_context(cafile=str(stack.ca))
    port = int(stack.url.rsplit(":", 1)[1].rstrip("/"))
    token = base64.b64encode(f"{name}:{password}".encode()).decode()
    with socket.create_connection(("127.0.0.1", port), timeout=30) as raw, \
            context.wrap_socket(raw, server_hostname="localhost") as tls:
        tls.sendall(f"PUT {url} HTTP/1.1\r\nHost: localhost\r\nAuthorization: Basic {token}\r\n"
                    f"Content-Length: {64 << 20}\r\n\r\n".encode())
        tls.sendall(os.urandom(4 << 20))
        # nginx has started the body file: the request passed the auth gateway
        deadline = time.monotonic() + 30
        while not any(body_temp.iterdir()) and time.monotonic() < deadline:
            tls.sendall(os.urandom(64 << 10))
        assert any(body_temp.iterdir()), "nginx never wrote the body"
    _wait_empty(body_temp)
    assert not _stored(stack, url).exists() and not _staging_files(stack)
    assert not re.search(rf'"PUT {re.escape(url)} ',
                         ((stack.settings.logs or Path()) / "tracking-access.log").read_text())


def _upload_dir(stack: RunningStack) -> Path:
    assert stack.settings.nginx_upload_dir is not None, "a local store on one machine"
    return stack.settings.nginx_upload_dir


def test_the_stored_artifact_is_the_very_file_nginx_wrote(
    stack: RunningStack, owned: dict[str, object], tmp_path: Path,
) -> None:
    """No copy: the inode nginx wrote the body into is the stored artifact's."""
    source = tmp_path / "big.bin"
    source.write_bytes(os.urandom(48 << 20))
    url = f"{owned['prefix']}/linked/big.bin"
    seen: set[int] = set()
    done = threading.Event()

    def watch() -> None:  # nginx's body file, while the upload runs
        while not done.is_set():
            for entry in os.scandir(_upload_dir(stack)):
                with contextlib.suppress(FileNotFoundError):
                    seen.add(entry.inode())
            time.sleep(0.01)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        assert _curl_put(stack, owned["auth"], source, url) == 200  # type: ignore[arg-type]
    finally:
        done.set()
        watcher.join(10)
    stored = _stored(stack, url)
    assert stored.read_bytes() == source.read_bytes()
    assert stored.stat().st_ino in seen, "the artifact is a copy, not nginx's file"
    _wait_empty(_upload_dir(stack))
    assert stored.stat().st_nlink == 1  # nginx removed its own name


def test_a_client_header_naming_another_file_is_ignored(
    stack: RunningStack, owned: dict[str, object],
) -> None:
    """Another upload's body file (nginx's own kind of name, the service account's) and a
    system file: a client naming them in X-Trackgate-Upload-File stores its own body."""
    folder = _upload_dir(stack)
    victim = folder / "0000099999"
    victim.write_bytes(b"another user's upload in flight")
    owner = folder.stat()
    os.chown(victim, owner.st_uid, owner.st_gid)
    victim.chmod(0o600)
    for i, named in enumerate((str(victim), "/etc/passwd", f"{folder}/../htpasswd")):
        url = f"{owned['prefix']}/hostile-{i}.txt"
        answer = stack.request("PUT", url, auth=owned["auth"],  # type: ignore[arg-type]
                               data=b"my own bytes", headers={"X-Trackgate-Upload-File": named})
        assert answer.status_code == 200, (named, answer.status_code, answer.text)
        assert _stored(stack, url).read_bytes() == b"my own bytes", named
    assert victim.read_bytes() == b"another user's upload in flight"
    victim.unlink()


def _wait_empty(folder: Path) -> None:
    deadline = time.monotonic() + 30
    while any(folder.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not list(folder.iterdir())
