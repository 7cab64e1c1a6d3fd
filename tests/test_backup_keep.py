"""`trackgate backup --keep N`: the retention the Ansible timer relies on."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from trackgate.backup import BackupError, prune


def test_prune_keeps_the_newest_archives_and_touches_nothing_else(tmp_path: Path) -> None:
    archives = [tmp_path / f"trackgate-2026010{i}-000000.tar" for i in range(1, 6)]
    for age, path in enumerate(reversed(archives)):
        path.write_bytes(b"x")
        os.utime(path, (1_700_000_000 - age * 3600, 1_700_000_000 - age * 3600))
    other = tmp_path / "notes.tar"
    other.write_bytes(b"keep me")
    deleted = prune(tmp_path, 2)
    assert sorted(deleted) == archives[:3]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [archives[3].name, archives[4].name, other.name]
    )
    assert prune(tmp_path, 2) == []


def test_prune_refuses_to_keep_nothing(tmp_path: Path) -> None:
    with pytest.raises(BackupError, match="at least 1"):
        prune(tmp_path, 0)
