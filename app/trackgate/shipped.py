"""Where the files trackgate ships beside its code live: the wheel carries nginx/ and
monitoring/ inside the package (trackgate/nginx, trackgate/monitoring); a checkout has them at
the top of the tree."""

from __future__ import annotations

from pathlib import Path


def shipped_dir(name: str, marker: str) -> Path:
    """The directory NAME that holds MARKER, inside the package or at the checkout's top."""
    here = Path(__file__).resolve().parent
    for candidate in (here / name, here.parents[1] / name):
        if (candidate / marker).is_file():
            return candidate
    raise FileNotFoundError(f"{name} templates not found next to {here}")
