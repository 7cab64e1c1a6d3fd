"""An S3 artifact destination (`TRACKGATE_ARTIFACTS_DESTINATION=s3://bucket/prefix`) that keeps
every artifact byte behind trackgate's auth.

MLflow's own S3 repository offers multipart and presigned transfers: the server then advertises
them (/api/3.0/mlflow/server-info) and clients download every artifact, and upload large ones,
straight from the S3 endpoint, past nginx and the policy layer, needing a route to the store.
In the tracking server the `s3` scheme is served by `ProxiedS3Repository` instead: the same
store, without those capabilities, so MLflow advertises none and answers the multipart and
presigned endpoints "unsupported"; clients then PUT and GET through the proxy. Uploads stream
from the request into S3 (no temp file); downloads of one file stream from S3 to the client.

`check` runs before gunicorn starts: a bad endpoint, wrong keys or a missing bucket is one clear
line then, not a 500 on the first upload.
"""

from __future__ import annotations

import os
import posixpath
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from ..settings import Settings

KEY_VARIABLES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
DEFAULT_REGION = "us-east-1"
PROBE_KEY = ".trackgate-write-check"
CHUNK = 1024 * 1024


class ObjectStoreError(RuntimeError):
    """The S3 destination cannot be used; the message says what to fix."""


def is_s3(uri: str | None) -> bool:
    return bool(uri) and str(uri).startswith("s3://")


def split_s3(uri: str) -> tuple[str, str]:
    """(bucket, key prefix) of an s3://bucket/prefix URI."""
    parts = urlsplit(uri)
    return parts.netloc, parts.path.strip("/")


def read_credentials_file(path: Path) -> dict[str, str]:
    """AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (and optionally AWS_SESSION_TOKEN) as
    NAME=value lines; a file others can read is refused, as keys in it are secrets."""
    from dotenv import dotenv_values

    try:
        st = path.stat()
    except OSError as exc:
        raise ObjectStoreError(f"cannot read the S3 credentials file {path}: {exc.strerror}") \
            from None
    if st.st_mode & 0o077:
        raise ObjectStoreError(
            f"the S3 credentials file {path} is readable by other accounts (mode "
            f"{st.st_mode & 0o777:o}): chmod 600 {path}")
    values = {k: v for k, v in dotenv_values(path).items() if v}
    missing = [name for name in KEY_VARIABLES if name not in values]
    if missing:
        raise ObjectStoreError(f"the S3 credentials file {path} has no {' or '.join(missing)}")
    return {k: v for k, v in values.items() if k.startswith("AWS_")}


def s3_environment(settings: Settings) -> dict[str, str]:
    """What MLflow's S3 code and boto3 read in the tracking server: the endpoint, the region and,
    from the credentials file when one is set, the keys (else the AWS_* variables already set)."""
    if not is_s3(settings.artifacts_uri):
        return {}
    env: dict[str, str] = {"AWS_DEFAULT_REGION": os.environ.get("AWS_DEFAULT_REGION")
                           or DEFAULT_REGION}
    if settings.s3_endpoint_url:
        env["MLFLOW_S3_ENDPOINT_URL"] = settings.s3_endpoint_url
    if settings.s3_credentials_file is not None:
        env.update(read_credentials_file(settings.s3_credentials_file))
    return env


def _client(env: dict[str, str]) -> Any:
    import boto3
    from botocore.config import Config

    merged = {**os.environ, **env}
    return boto3.client(
        "s3",
        endpoint_url=merged.get("MLFLOW_S3_ENDPOINT_URL") or None,
        region_name=merged.get("AWS_DEFAULT_REGION") or DEFAULT_REGION,
        aws_access_key_id=merged.get("AWS_ACCESS_KEY_ID"),
        aws_secret_access_key=merged.get("AWS_SECRET_ACCESS_KEY"),
        aws_session_token=merged.get("AWS_SESSION_TOKEN"),
        config=Config(connect_timeout=5, read_timeout=15, retries={"max_attempts": 2}),
    )


def check(settings: Settings) -> None:
    """Reach the bucket with the server's keys and write, then delete, one small object: raise
    ObjectStoreError saying what is wrong (endpoint, keys, bucket, permissions)."""
    from botocore.exceptions import BotoCoreError, ClientError

    uri = settings.artifacts_uri
    bucket, prefix = split_s3(uri)
    env = s3_environment(settings)
    where = env.get("MLFLOW_S3_ENDPOINT_URL") or os.environ.get("MLFLOW_S3_ENDPOINT_URL") \
        or "AWS S3"
    try:
        client = _client(env)
        client.head_bucket(Bucket=bucket)
        key = posixpath.join(prefix, PROBE_KEY) if prefix else PROBE_KEY
        client.put_object(Bucket=bucket, Key=key, Body=b"ok")
        client.delete_object(Bucket=bucket, Key=key)
    except (BotoCoreError, ClientError, ValueError) as exc:
        raise explain(exc, uri, where) from None


def endpoint_name(settings: Settings) -> str:
    """The endpoint as messages name it."""
    return (s3_environment(settings).get("MLFLOW_S3_ENDPOINT_URL")
            or os.environ.get("MLFLOW_S3_ENDPOINT_URL") or "AWS S3")


def client_for(settings: Settings) -> Any:
    """A boto3 S3 client with the tracking server's endpoint, region and keys."""
    return _client(s3_environment(settings))


def explain(exc: Exception, uri: str, where: str) -> ObjectStoreError:
    """One clear sentence for a boto3 error: no keys, wrong keys, no bucket, no endpoint."""
    from botocore.exceptions import ClientError, NoCredentialsError

    bucket = split_s3(uri)[0]
    if isinstance(exc, NoCredentialsError):
        return ObjectStoreError(
            f"no S3 keys for {uri}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
            "TRACKGATE_S3_CREDENTIALS_FILE")
    if isinstance(exc, ClientError):
        error = exc.response.get("Error", {})
        code = str(error.get("Code", ""))
        status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if code in ("404", "NoSuchBucket"):
            return ObjectStoreError(
                f"the bucket {bucket!r} does not exist at {where}: create it, or fix "
                "TRACKGATE_ARTIFACTS_DESTINATION")
        if status in (401, 403) or code in ("403", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                                            "AccessDenied"):
            return ObjectStoreError(
                f"{where} refused the S3 keys for bucket {bucket!r} ({code or status}): check "
                "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or TRACKGATE_S3_CREDENTIALS_FILE); "
                "they need read, list, write and delete on the bucket")
        return ObjectStoreError(f"{where} answered {code or status} for bucket {bucket!r}: "
                                f"{error.get('Message', exc)}")
    return ObjectStoreError(
        f"cannot reach the S3 endpoint {where} for {uri}: {exc} (check "
        "TRACKGATE_S3_ENDPOINT_URL)")


# --- in the tracking server -------------------------------------------------------------------


def _repository_class() -> type:
    from mlflow.store.artifact.artifact_repo import ArtifactRepository, StreamUploadMixin
    from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository

    class ProxiedS3Repository(ArtifactRepository, StreamUploadMixin):  # type: ignore[misc]
        """MLflow's S3 repository minus multipart/presigned transfers (see the module doc)."""

        def __init__(self, artifact_uri: str, tracking_uri: str | None = None,
                     registry_uri: str | None = None) -> None:
            super().__init__(artifact_uri, tracking_uri, registry_uri)
            self._s3 = S3ArtifactRepository(artifact_uri, tracking_uri=tracking_uri,
                                            registry_uri=registry_uri)

        def log_artifact(self, local_file: str, artifact_path: str | None = None) -> None:
            self._s3.log_artifact(local_file, artifact_path)

        def log_artifacts(self, local_dir: str, artifact_path: str | None = None) -> None:
            self._s3.log_artifacts(local_dir, artifact_path)

        def list_artifacts(self, path: str | None = None) -> Any:
            return self._s3.list_artifacts(path)

        def _download_file(self, remote_file_path: str, local_path: str) -> None:
            self._s3._download_file(remote_file_path, local_path)

        def delete_artifacts(self, artifact_path: str | None = None) -> None:
            self._s3.delete_artifacts(artifact_path)

        def key(self, *parts: str | None) -> tuple[str, str]:
            bucket, prefix = self._s3.parse_s3_compliant_uri(self.artifact_uri)
            return bucket, posixpath.join(prefix, *(p for p in parts if p))

        def client(self) -> Any:
            return self._s3._get_s3_client()

        def log_artifact_from_stream(self, stream: BinaryIO, artifact_file_name: str,
                                     artifact_path: str | None = None) -> None:
            """The request body straight into S3 in parts (bounded memory, no temp file)."""
            from boto3.s3.transfer import TransferConfig
            from mlflow.utils.mime_type_utils import _guess_mime_type

            name = posixpath.basename(artifact_file_name)
            bucket, key = self.key(artifact_path, name)
            extra = {"ContentType": _guess_mime_type(name),
                     **(self._s3.get_s3_file_upload_extra_args() or {})}
            config = TransferConfig(multipart_chunksize=16 * CHUNK, max_concurrency=4)
            self.client().upload_fileobj(stream, bucket, key, ExtraArgs=extra, Config=config)

        async def log_artifact_from_async_stream(self, chunks: Any, artifact_file_name: str,
                                                 artifact_path: str | None = None) -> None:
            raise NotImplementedError("trackgate serves MLflow under gunicorn (WSGI)")

        def __getattr__(self, name: str) -> Any:  # anything else MLflow may call (traces)
            if name.startswith("__") or name == "_s3":
                raise AttributeError(name)
            return getattr(self._s3, name)

    return ProxiedS3Repository


def install(app: Any) -> None:
    """In the tracking server: serve `s3://` with ProxiedS3Repository, and stream single-file
    artifact downloads from S3 instead of copying them to a temp file first."""
    from mlflow.store.artifact.artifact_repository_registry import _artifact_repository_registry

    _artifact_repository_registry.register("s3", _repository_class())
    original = app.view_functions["_download_artifact"]
    app.view_functions["_download_artifact"] = _streaming_download(original)


def _streaming_download(original: Callable[..., Any]) -> Callable[..., Any]:
    def download(artifact_path: str) -> Any:
        from botocore.exceptions import ClientError
        from flask import Response
        from mlflow.server.handlers import (
            _content_disposition_attachment,
            _get_artifact_repo_mlflow_artifacts,
        )
        from mlflow.utils.mime_type_utils import _guess_mime_type
        from mlflow.utils.uri import validate_path_is_safe

        repo = _get_artifact_repo_mlflow_artifacts()
        if not hasattr(repo, "log_artifact_from_stream") or not hasattr(repo, "key"):
            return original(artifact_path)
        try:
            safe = validate_path_is_safe(artifact_path)
        except Exception:
            return original(artifact_path)  # MLflow's own refusal
        bucket, key = repo.key(safe)
        try:
            obj = repo.client().get_object(Bucket=bucket, Key=key)
        except ClientError:
            return original(artifact_path)  # a directory or nothing: MLflow's own answer
        body = obj["Body"]

        def chunks() -> Iterator[bytes]:
            try:
                yield from body.iter_chunks(CHUNK)
            finally:
                body.close()

        mime = _guess_mime_type(safe)
        response = Response(chunks(), mimetype=mime, direct_passthrough=True)
        response.headers["Content-Length"] = str(obj["ContentLength"])
        response.headers["Content-Type"] = mime
        response.headers["Content-Disposition"] = _content_disposition_attachment(
            posixpath.basename(safe))
        response.headers["X-Content-Type-Options"] = "nosniff"
        return response

    return download
