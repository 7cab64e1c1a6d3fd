"""Archives with one flipped byte, for the tests that verify and restore must catch them."""

from __future__ import annotations

import os
import shutil
import tarfile
from pathlib import Path


def tampered_copy(archive: Path, member: str, dest: Path) -> Path:
    """A copy of `archive` at `dest` whose `member` has one bit flipped in its middle byte
    (the tar headers stay valid, so only a content check can notice)."""
    shutil.copyfile(archive, dest)
    with tarfile.open(dest) as tar:
        info = tar.getmember(member)
    with open(dest, "r+b") as f:
        f.seek(info.offset_data + info.size // 2)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))
    return dest
