"""Artifact upload bodies are read from gunicorn in large pieces (server/uploads.py, issue 18).

gunicorn's own request body answers MLflow's 1 MiB reads with 1 KiB rounds over 8 KiB recv()s;
through trackgate that Python work competes with nginx's TLS for the same cores. Here gunicorn's
real Body/LengthReader/SocketUnreader read from a socket that hands out whatever is asked, as a
fast loopback does, and the reads are counted."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from gunicorn.http.body import Body, LengthReader
from gunicorn.http.unreader import SocketUnreader
from trackgate.server.uploads import FastUploads
from werkzeug.wrappers import Request

UPLOAD = "/api/2.0/mlflow-artifacts/artifacts/1/abc/artifacts/model.bin"
NEXT_REQUEST = b"GET /next HTTP/1.1\r\n\r\n"  # kept-alive connection: must not be eaten


class _Socket:
    """recv() hands out up to what is asked of a prepared byte string, counting the calls."""

    def __init__(self, data: bytes) -> None:
        self.data = memoryview(data)
        self.calls = 0

    def recv(self, size: int) -> bytes:
        self.calls += 1
        piece, self.data = self.data[:size], self.data[size:]
        return bytes(piece)


class _Reader(LengthReader):  # type: ignore[misc]
    """gunicorn's length-bounded reader, its reads counted (each one a Python-level round)."""

    calls = 0

    def read(self, size: int) -> bytes:
        self.calls += 1
        return super().read(size)


class _Upload:
    """What MLflow's copy loop read of one request, and how the reading went."""

    def __init__(self, body: bytes, method: str = "PUT", path: str = UPLOAD) -> None:
        self.sock = _Socket(body + NEXT_REQUEST)
        self.unreader = SocketUnreader(self.sock)
        self.reader = _Reader(self.unreader, len(body))
        self.got = _read_like_mlflow(method, path, len(body), Body(self.reader))


def _read_like_mlflow(method: str, path: str, length: int, body: Body) -> bytes:
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "CONTENT_LENGTH": str(length),
               "wsgi.input": body,
               "wsgi.input_terminated": True, "SERVER_NAME": "x", "SERVER_PORT": "80",
               "wsgi.url_scheme": "http"}
    got = io.BytesIO()

    def mlflow(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        # MLflow's _upload_artifact: copyfileobj(request.stream, staging file, 1 MiB)
        shutil.copyfileobj(Request(environ).stream, got, 1024 * 1024)
        start_response("200 OK", [])
        return [b"{}"]

    FastUploads(mlflow)(environ, lambda *a: None)
    return got.getvalue()


def test_an_upload_body_arrives_whole_in_a_few_reads_and_the_next_request_is_kept() -> None:
    body = os.urandom((8 << 20) + 12345)
    upload = _Upload(body)
    assert upload.got == body
    # gunicorn's own body: one recv per 8 KiB (1,026 here) and one reader round per KiB
    # (8,205); read in pieces of 1 MiB: 10 of each.
    assert upload.sock.calls <= 16, upload.sock.calls
    assert upload.reader.calls <= 16, upload.reader.calls
    assert upload.unreader.read() == NEXT_REQUEST


@pytest.mark.parametrize("size", [0, 1, 1 << 20, (1 << 20) + 1])
def test_edge_sizes_arrive_byte_identical(size: int) -> None:
    body = os.urandom(size)
    upload = _Upload(body)
    assert upload.got == body and upload.unreader.read() == NEXT_REQUEST


@pytest.mark.parametrize(("method", "path"), [
    ("POST", "/api/2.0/mlflow/runs/log-batch"), ("GET", UPLOAD),
    ("PUT", "/api/2.0/mlflow/other"),
])
def test_other_requests_keep_gunicorns_own_body(method: str, path: str) -> None:
    body = os.urandom(64 << 10)
    upload = _Upload(body, method, path)
    assert upload.got == body and upload.reader.calls >= (64 << 10) // 1024


# --- a body file named by nginx (X-Trackgate-Upload-File) -------------------------------------


def _put_named(folder: Path, named: str) -> tuple[str, bytes]:
    """(status, what MLflow read) of a PUT whose body nginx says is in file NAMED."""
    seen: list[bytes] = []
    answer: list[str] = []

    def mlflow(environ: dict[str, Any], start_response: Any) -> list[bytes]:
        seen.append(Request(environ).stream.read())
        start_response("200 OK", [])
        return [b"{}"]

    environ = {"REQUEST_METHOD": "PUT", "PATH_INFO": UPLOAD, "SERVER_NAME": "x",
               "SERVER_PORT": "80", "wsgi.url_scheme": "http", "wsgi.input": io.BytesIO(),
               "HTTP_X_TRACKGATE_UPLOAD_FILE": named}
    FastUploads(mlflow, str(folder))(environ, lambda status, headers: answer.append(status))
    return answer[0], b"".join(seen)


@pytest.fixture
def upload_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "artifacts.uploads"
    folder.mkdir(mode=0o700)
    return folder


def test_the_body_file_nginx_wrote_is_what_mlflow_reads(upload_dir: Path) -> None:
    (upload_dir / "0000000001").write_bytes(b"the body")
    assert _put_named(upload_dir, f"{upload_dir}/0000000001") == ("200 OK", b"the body")


def test_a_link_planted_where_nginx_writes_is_not_followed(upload_dir: Path, tmp_path: Path
                                                           ) -> None:
    secret = tmp_path / "secret"
    secret.write_bytes(b"not for you")
    (upload_dir / "0000000002").symlink_to(secret)
    os.link(secret, upload_dir / "0000000003")  # a second name of another file
    for name in ("0000000002", "0000000003"):
        status, read = _put_named(upload_dir, f"{upload_dir}/{name}")
        assert status.startswith("500") and not read, name


@pytest.mark.parametrize("named", ["/etc/passwd", "{dir}/../secret", "{dir}/body.txt",
                                   "{dir}/0000000004/", "{dir}/00000000045", "{dir}"])
def test_a_name_that_is_not_an_nginx_body_file_in_the_upload_dir_is_refused(
    upload_dir: Path, named: str,
) -> None:
    (upload_dir / "body.txt").write_bytes(b"x")
    (upload_dir / "00000000045").write_bytes(b"x")
    status, read = _put_named(upload_dir, named.format(dir=upload_dir))
    assert status.startswith("500") and not read


def test_an_upload_dir_others_may_write_to_is_refused(upload_dir: Path) -> None:
    (upload_dir / "0000000005").write_bytes(b"the body")
    upload_dir.chmod(0o733)  # another account could swap the file
    status, read = _put_named(upload_dir, f"{upload_dir}/0000000005")
    assert status.startswith("500") and not read


def test_without_an_upload_dir_a_named_file_is_an_error_not_an_empty_artifact(
    upload_dir: Path,
) -> None:
    seen: list[str] = []
    environ = {"REQUEST_METHOD": "PUT", "PATH_INFO": UPLOAD, "wsgi.input": io.BytesIO(),
               "HTTP_X_TRACKGATE_UPLOAD_FILE": f"{upload_dir}/0000000006"}
    body = FastUploads(lambda *a: [b"stored"])(environ, lambda s, h: seen.append(s))
    assert seen[0].startswith("500") and b"TRACKGATE_ARTIFACT_UPLOADS" in b"".join(body)


@pytest.mark.parametrize(("overrides", "standalone", "by_nginx"), [
    ({}, True, True),  # `trackgate up`: nginx and the tracking server, one account, one machine
    ({}, False, False),  # an Ansible host's site: Debian's nginx runs as another account
    ({"internal_transport": "tcp"}, True, False),  # compose: nginx is another container
    ({"tracking_upstream": "10.0.0.5,10.0.0.6"}, True, False),  # several hosts
    ({"artifacts_destination": "s3://bucket/prefix"}, True, False),  # S3 keeps streaming
    ({"artifact_uploads": "tracking"}, True, False),
])
def test_nginx_writes_upload_bodies_only_beside_a_local_store_on_the_tracking_servers_machine(
    tmp_path: Path, overrides: dict[str, str], standalone: bool, by_nginx: bool,
) -> None:
    from trackgate import nginx
    from trackgate.settings import Settings

    settings = Settings(data_dir=tmp_path, hostname="localhost", **overrides)  # type: ignore[arg-type]
    config = nginx.render(settings, standalone=standalone)
    assert ("client_body_in_file_only clean;" in config) is by_nginx
    assert (f"client_body_temp_path {tmp_path}/artifacts.uploads;" in config) is by_nginx
    # Every location that sends an identity to a tracking server drops a client's copy of the
    # header; only the upload location names nginx's own file.
    cleared = config.count('proxy_set_header X-Trackgate-Upload-File "";')
    assert cleared == config.count("proxy_set_header X-Trackgate-User $trackgate_user;") > 0
    assert config.count("X-Trackgate-Upload-File $request_body_file;") == (1 if by_nginx else 0)
