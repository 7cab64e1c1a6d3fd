"""Upload body files a killed nginx left behind are removed before nginx starts again
(server/uploads.py sweep_orphans, called by the supervisor of `trackgate up`; issue 18): files
and links go, what a link names stays, directories and the artifact root are never touched."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from trackgate.local.supervisor import Child, _before_start
from trackgate.server.uploads import sweep_orphans
from trackgate.settings import Settings


def test_files_and_links_are_removed_but_not_what_a_link_names_nor_directories(
    tmp_path: Path,
) -> None:
    uploads = tmp_path / "artifacts.uploads"
    uploads.mkdir(mode=0o700)
    (uploads / "0000000001").write_bytes(b"x" * 1000)  # a whole body
    (uploads / "0000000002").write_bytes(b"y" * 24)  # a partial one
    (uploads / "0000000003").write_bytes(b"")
    outside = tmp_path / "precious.bin"
    outside.write_bytes(b"keep me")
    (uploads / "0000000004").symlink_to(outside)
    (uploads / "dangling").symlink_to(tmp_path / "nothing-here")
    (uploads / "nested").mkdir()
    (uploads / "nested" / "0000000005").write_bytes(b"z" * 10)  # never descended into
    (uploads / "to-a-dir").symlink_to(tmp_path)

    assert sweep_orphans(uploads) == (6, 1024)
    assert sorted(p.name for p in uploads.iterdir()) == ["nested"]
    assert (uploads / "nested" / "0000000005").read_bytes() == b"z" * 10
    assert outside.read_bytes() == b"keep me"
    assert sweep_orphans(uploads) == (0, 0)


def test_an_artifact_already_linked_into_the_store_keeps_its_name(tmp_path: Path) -> None:
    """nginx killed after the tracking server linked its file into place: only nginx's name
    goes, the stored artifact stays (and no byte is counted as freed)."""
    uploads = tmp_path / "artifacts.uploads"
    uploads.mkdir(mode=0o700)
    stored = tmp_path / "artifacts" / "1" / "model.bin"
    stored.parent.mkdir(parents=True)
    stored.write_bytes(b"m" * 512)
    os.link(stored, uploads / "0000000009")
    assert sweep_orphans(uploads) == (1, 0)
    assert not any(uploads.iterdir())
    assert stored.read_bytes() == b"m" * 512


def test_a_missing_upload_directory_is_nothing_to_remove(tmp_path: Path) -> None:
    assert sweep_orphans(tmp_path / "never-created") == (0, 0)


def test_an_upload_directory_that_is_a_link_is_not_followed(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "0000000001").write_bytes(b"not nginx's")
    (tmp_path / "artifacts.uploads").symlink_to(elsewhere)
    with pytest.raises(OSError):
        sweep_orphans(tmp_path / "artifacts.uploads")
    assert (elsewhere / "0000000001").read_bytes() == b"not nginx's"


def test_the_supervisor_clears_nginxs_upload_dir_before_nginx_and_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    settings = Settings(data_dir=tmp_path)
    uploads = settings.nginx_upload_dir
    assert uploads is not None
    uploads.mkdir(mode=0o700)
    (uploads / "0000000007").write_bytes(os.urandom(4096))
    artifact = Path(settings.artifacts_uri, "1", "model.bin")
    artifact.parent.mkdir(parents=True)
    artifact.write_bytes(b"stored")

    _before_start(settings, Child("tracking", [], None))  # not nginx: nothing to do
    assert any(uploads.iterdir()) and capsys.readouterr().out == ""
    _before_start(settings, Child("nginx", [], None))
    said = capsys.readouterr().out
    assert "removed 1 upload file(s)" in said and "(4096 bytes)" in said, said
    assert not any(uploads.iterdir())
    assert artifact.read_bytes() == b"stored"
    _before_start(settings, Child("nginx", [], None))  # nothing left: nothing said
    assert capsys.readouterr().out == ""
