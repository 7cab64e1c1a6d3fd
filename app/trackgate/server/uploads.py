"""Artifact uploads at close to nginx's own speed (issue 18: uploads >= 0.8x direct).

Two ways, both behind the policy layer (roles, owners, grants are checked before either runs) and
both leaving MLflow's own path checks and gunicorn's access log line as they were:

- **nginx hands over a file** (``NginxUploads``; local artifact store, nginx on the same machine:
  ``Settings.nginx_upload_dir``). nginx writes the PUT body to a file in that directory (beside
  the artifact root: same filesystem, and no artifact path names it) and passes only its name in
  ``X-Trackgate-Upload-File``, a header nginx always sets itself (nginx/snippets/proxy-headers:
  a client's copy never passes). Here the name is checked (that directory, nginx's digits-only
  names), the file opened without following links and checked (a regular file of this account,
  one link), and MLflow's upload handler runs as always with that file as its body; where
  MLflow's local store would copy the body into its staging file, the open file is hard-linked
  there instead (``linkat`` of the descriptor: no copy, no second look-up of the name) and
  renamed into place by MLflow's own code path. nginx removes its name when the request ends.
  1 GiB: nginx's TLS and one file write, instead of nginx's file, the upstream socket and
  Python's reads and writes.
- **gunicorn's body read in large pieces** (``fast_body``; S3 stores, the 'tracking' setting,
  several hosts): MLflow copies an upload in 1 MiB reads, but gunicorn's request body answers
  each with 1,024 reads of 1 KiB over 8 KiB ``recv()``s, a million Python-level rounds per GiB
  on the cores where nginx decrypts TLS. Here the body is read straight from gunicorn's
  length-bounded reader with ``recv()`` of up to ``RECV_CHUNK``.
"""

from __future__ import annotations

import errno
import io
import json
import os
import re
import secrets
import stat
from collections.abc import Callable, Iterable
from typing import Any

from .downloads import DOWNLOAD_PREFIXES

StartResponse = Callable[..., Any]
UPLOAD_PREFIXES = DOWNLOAD_PREFIXES
# recv() size on the upstream socket (gunicorn's default: 8 KiB).
RECV_CHUNK = 1024 * 1024


class LengthBody:
    """``wsgi.input`` for one request: reads go to gunicorn's LengthReader in full."""

    def __init__(self, reader: Any) -> None:
        self._reader = reader

    def read(self, size: int | None = -1) -> bytes:
        if size is None or size < 0:
            size = self._reader.length
        return self._reader.read(size) if size else b""

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def readline(self, size: int | None = -1) -> bytes:
        raise OSError("an artifact upload is read in blocks, not lines")


def fast_body(environ: dict[str, Any]) -> LengthBody | None:
    """A faster ``wsgi.input`` for gunicorn's length-bounded body, or None to keep the original."""
    try:
        from gunicorn.http.body import Body, LengthReader
        from gunicorn.http.unreader import SocketUnreader
    except ImportError:
        return None
    body = environ.get("wsgi.input")
    if not isinstance(body, Body) or not isinstance(body.reader, LengthReader):
        return None
    if body.buf.tell():  # someone read part of it already: keep the one reader
        return None
    unreader = body.reader.unreader
    if isinstance(unreader, SocketUnreader):
        unreader.mxchunk = max(unreader.mxchunk, RECV_CHUNK)
    return LengthBody(body.reader)


UPLOAD_FILE_HEADER = "HTTP_X_TRACKGATE_UPLOAD_FILE"
_NGINX_TEMP_NAME = re.compile(r"[0-9]{10}")  # nginx's temp files, with no `levels`


class NginxBody(io.FileIO):
    """The body file nginx wrote, open by descriptor: what MLflow reads, or links into place."""


class UploadFileError(Exception):
    """The file nginx named is not one nginx wrote (a misconfiguration): answered 500 with
    the reason, and nothing is stored."""


class FastUploads:
    """WSGI wrapper around MLflow's app (inside the policy layer, which checks first).
    `upload_dir`: where nginx writes upload bodies (None: nginx passes the bodies)."""

    def __init__(self, app: Any, upload_dir: str | None = None) -> None:
        self.app = app
        self.upload_dir = None if upload_dir is None else os.path.abspath(upload_dir)

    def __call__(self, environ: dict[str, Any], start_response: StartResponse) -> Iterable[bytes]:
        named = environ.pop(UPLOAD_FILE_HEADER, None)
        if environ.get("REQUEST_METHOD") != "PUT" or not environ.get("PATH_INFO", "").startswith(
            UPLOAD_PREFIXES
        ):
            return self.app(environ, start_response)  # no upload: no body file either
        if not named:
            body = fast_body(environ)
            if body is not None:
                environ["wsgi.input"] = body
            return self.app(environ, start_response)
        try:
            file = self._open(named)
        except UploadFileError as exc:
            return _error(start_response, str(exc))
        try:
            environ["wsgi.input"] = file
            environ["CONTENT_LENGTH"] = str(os.fstat(file.fileno()).st_size)
            environ["wsgi.input_terminated"] = True
            result = self.app(environ, start_response)
            try:  # MLflow's answer to an upload is a small JSON: built before the file closes
                return list(result)
            finally:
                close = getattr(result, "close", None)
                if close is not None:
                    close()
        finally:
            file.close()

    def _open(self, named: str) -> NginxBody:
        """Open the body file nginx named, checking it is one nginx wrote: in the upload
        directory (this account's alone), an nginx temp name, a regular file of this account
        with one link. Opened without following links, relative to the directory."""
        if self.upload_dir is None:
            raise UploadFileError(
                "nginx handed this upload over as a file, but this tracking server does not "
                "take uploads from nginx: TRACKGATE_ARTIFACT_UPLOADS (or the artifact store, "
                "internal_transport) differs between nginx and the tracking server")
        folder, name = os.path.split(named)
        if folder != self.upload_dir or not _NGINX_TEMP_NAME.fullmatch(name):
            raise UploadFileError(f"nginx named an upload file outside {self.upload_dir}")
        flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY
        me = os.geteuid()
        try:
            folder_fd = os.open(self.upload_dir, flags | os.O_DIRECTORY)
        except OSError as exc:
            raise UploadFileError(f"the upload directory: {exc.strerror}") from None
        try:
            info = os.fstat(folder_fd)
            if info.st_uid != me or info.st_mode & 0o077:
                raise UploadFileError(f"{self.upload_dir} must be this account's alone (0700)")
            try:
                fd = os.open(name, flags | os.O_NONBLOCK, dir_fd=folder_fd)
            except OSError as exc:
                raise UploadFileError(f"the upload file: {exc.strerror}") from None
        finally:
            os.close(folder_fd)
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_uid != me or info.st_nlink != 1:
            os.close(fd)
            raise UploadFileError("the upload file is not a file nginx wrote")
        return NginxBody(fd, "r")


def _error(start_response: StartResponse, message: str) -> list[bytes]:
    body = json.dumps({"error_code": "INTERNAL_ERROR", "message": message}).encode()
    start_response("500 Internal Server Error", [("Content-Type", "application/json"),
                                                 ("Content-Length", str(len(body)))])
    return [body]


def install_linking() -> None:
    """MLflow's local store links an nginx body file into place instead of copying it."""
    from mlflow.store.artifact import local_artifact_repo as local

    repo = local.LocalArtifactRepository
    if getattr(repo.log_artifact_from_stream, "_trackgate_links", False):
        return
    copy = repo.log_artifact_from_stream

    def log_artifact_from_stream(self: Any, stream: Any, artifact_file_name: str,
                                 artifact_path: str | None = None) -> None:
        body = stream if isinstance(stream, NginxBody) else getattr(stream, "_stream", None)
        if not isinstance(body, NginxBody) or body.tell() != 0:
            return copy(self, stream, artifact_file_name, artifact_path)
        # MLflow's own checks: a safe name, inside the artifact root after resolving links.
        folder, destination = self._get_destination_artifact_path(artifact_file_name,
                                                                  artifact_path)
        staging = f"{local._TEMP_ARTIFACT_PREFIX}{secrets.token_hex(8)}"
        folder_fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            try:  # dst_dir_fd: linkat(AT_SYMLINK_FOLLOW) of the descriptor, not the name
                os.link(f"/proc/self/fd/{body.fileno()}", staging, dst_dir_fd=folder_fd)
            except OSError as exc:
                if exc.errno not in (errno.EXDEV, errno.EPERM, errno.ENOENT, errno.EMLINK):
                    raise
                return copy(self, body, artifact_file_name, artifact_path)  # another filesystem
            try:
                os.chmod(staging, 0o666 & ~_umask(), dir_fd=folder_fd)  # as MLflow's own files
                os.replace(staging, os.path.basename(destination), src_dir_fd=folder_fd,
                           dst_dir_fd=folder_fd)
            except BaseException:
                os.unlink(staging, dir_fd=folder_fd)
                raise
        finally:
            os.close(folder_fd)

    log_artifact_from_stream._trackgate_links = True  # type: ignore[attr-defined]
    repo.log_artifact_from_stream = log_artifact_from_stream


def _umask() -> int:
    from mlflow.store.artifact import local_artifact_repo as local

    with local._UMASK_LOCK:
        current = os.umask(0)
        os.umask(current)
    return current


def sweep_orphans(directory: str | os.PathLike[str]) -> tuple[int, int]:
    """Delete the body files a dead nginx left in its upload directory: (names removed, bytes
    freed: the sizes of files that had no other name).

    Only for the moment before nginx starts (the supervisor of `trackgate up`): with no nginx
    running, every file there is one of a killed nginx (SIGKILL, OOM), which had no chance to
    remove it, and no client was told its upload succeeded (its connection died with nginx): it
    retries. Only the upload name goes: an artifact already linked into the store keeps its own,
    and a tracking server that had opened the file keeps its descriptor. Removed: regular files
    and symbolic links (the link, never what it names); directories and anything else stay.
    Nothing is followed: the directory is opened without following a link, entries relative to
    it. A missing directory holds nothing to remove."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        folder = os.open(directory, flags)
    except FileNotFoundError:
        return 0, 0
    removed = freed = 0
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    info = entry.stat(follow_symlinks=False)
                    if not (stat.S_ISREG(info.st_mode) or stat.S_ISLNK(info.st_mode)):
                        continue
                    os.unlink(entry.name, dir_fd=folder)  # unlink never follows a link
                except (FileNotFoundError, IsADirectoryError):  # gone, or replaced meanwhile
                    continue
                removed += 1
                if stat.S_ISREG(info.st_mode) and info.st_nlink == 1:
                    freed += info.st_size
    finally:
        os.close(folder)
    return removed, freed
