"""The privacy stamp (access.PrivateExperiments) is created by `trackgate serve tracking` before
its workers start; if it cannot be, the server says so in one line instead of letting other
workers fall back, silently, to a 2 s stale window for new private experiments."""

from __future__ import annotations

import stat
from pathlib import Path

from trackgate.server.tracking import prepare_privacy_stamp
from trackgate.settings import Settings


def test_the_tracking_server_creates_the_privacy_stamp_readable_by_its_account_only(
        tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    assert prepare_privacy_stamp(settings) is None
    mode = settings.privacy_stamp.stat().st_mode
    assert stat.S_ISREG(mode) and stat.S_IMODE(mode) == 0o600
    settings.privacy_stamp.write_bytes(b"..")
    assert prepare_privacy_stamp(settings) is None  # a restart keeps what is there
    assert settings.privacy_stamp.read_bytes() == b".."


def test_a_privacy_stamp_that_cannot_be_written_is_one_clear_warning(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    settings.privacy_stamp.mkdir()  # os.open fails on a directory, even as root
    warning = prepare_privacy_stamp(settings)
    assert warning is not None and "\n" not in warning
    assert str(settings.privacy_stamp) in warning
    assert f"make {tmp_path} writable for the tracking server's account" in warning
